"""Benchmark the LRN op against torch's implementations and the memory-bound floor.

Prints, per case, the median time of lrnserve's op, of the named baseline and of
``x.clone()`` (the same bytes read and written, no arithmetic), measured
interleaved in one run, with the ratios the targets in the README refer to.
Then AlexNet end to end at batch 32 with lrnserve's LRN, torch's LRN, and no LRN.

    python bench/ops.py [--reps 20] [--warmup 3] [--skip-alexnet] [--device cpu|cuda]

``--device cuda`` prints instead the op on the GPU (both modes; float32, float16, bfloat16)
against the device's ``x.clone()`` and the composed torch version.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrnserve.server.models import create_network
from lrnserve.server.ops import Mode, local_response_norm, prepare
from lrnserve.server.ops.composed import local_response_norm_composed

Fn = Callable[[], object]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Fn], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call; the candidates take turns so drift hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def within_composition(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """The definition as stock ops: square, average pool, scale and shift, power, multiply."""
    mean = F.avg_pool2d(x * x, size, stride=1, padding=size // 2, count_include_pad=True)
    return x * (k + alpha * mean).pow(-beta)


def op_table(device: torch.device, reps: int, warmup: int) -> None:
    cases = [
        ("across", 5, (32, 96, 55, 55)),
        ("across", 5, (32, 256, 27, 27)),
        ("within", 3, (32, 96, 55, 55)),
        ("within", 5, (32, 96, 55, 55)),
    ]
    print(f"LRN op, float32, {device}, threads={torch.get_num_threads()}, medians of {reps}")
    header = (
        f"{'mode':7}{'size':>5}  {'shape':18}{'ours ms':>9}{'baseline':>26}{'base ms':>9}"
        f"{'clone ms':>10}{'speedup':>9}{'ours/clone':>11}"
    )
    print(header)
    print("-" * len(header))
    for mode, size, shape in cases:
        x = torch.randn(shape, device=device)
        fns: dict[str, Fn] = {"ours": lambda x=x, s=size, m=mode: local_response_norm(x, s, 1e-4, 0.75, 1.0, m)}
        if mode == "across":
            baseline = "F.local_response_norm"
            fns["base"] = lambda x=x, s=size: F.local_response_norm(x, s, 1e-4, 0.75, 1.0)
        else:
            baseline = "avg_pool2d composition"
            fns["base"] = lambda x=x, s=size: within_composition(x, s, 1e-4, 0.75, 1.0)
        fns["clone"] = x.clone
        t = measure(fns, reps, warmup, device)
        print(
            f"{mode:7}{size:>5}  {list(shape)!s:18}{t['ours'] * 1e3:9.2f}{baseline:>26}"
            f"{t['base'] * 1e3:9.2f}{t['clone'] * 1e3:10.2f}{t['base'] / t['ours']:8.1f}x"
            f"{t['ours'] / t['clone']:10.2f}x"
        )
    print("targets (2-core CPU): across speedup >= 5x, within >= 3x, ours/clone <= 3x")


def cuda_table(reps: int, warmup: int) -> None:
    """The op on CUDA against the device's copy bandwidth (``x.clone()``) and the composed torch
    version it replaces, per mode, dtype and shape: a markdown table."""
    device = torch.device("cuda")
    print(f"LRN op on {torch.cuda.get_device_name()} ({prepare('cuda')}), size 5, medians of {reps}\n")
    print("| mode | dtype | shape | ours ms | composed ms | clone ms | ours GB/s | clone GB/s | of clone | vs composed")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in ((64, 96, 55, 55), (32, 256, 27, 27)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for mode in ("across", "within"):
                x = torch.randn(shape, device=device).to(dtype)
                params = (torch.tensor([1e-4]), torch.tensor([0.75]), torch.tensor([1.0]))
                scalars = tuple(p.to(device=device, dtype=torch.float64) for p in params)
                checked: Mode = mode  # type: ignore[assignment]
                t = measure(
                    {
                        "ours": lambda x=x, m=mode: local_response_norm(x, 5, 1e-4, 0.75, 1.0, m),
                        "composed": lambda x=x, m=checked, p=scalars: local_response_norm_composed(x, 5, *p, m),
                        "clone": x.clone,
                    },
                    reps,
                    warmup,
                    device,
                )
                moved = 2 * x.numel() * x.element_size()
                ours_bw, clone_bw = moved / t["ours"] / 1e9, moved / t["clone"] / 1e9
                print(
                    f"| {mode} | {str(dtype).removeprefix('torch.')} | {list(shape)} | {t['ours'] * 1e3:.3f} | "
                    f"{t['composed'] * 1e3:.3f} | {t['clone'] * 1e3:.3f} | {ours_bw:,.0f} | {clone_bw:,.0f} | "
                    f"{ours_bw / clone_bw:.0%} | {t['composed'] / t['ours']:.1f}x |",
                    flush=True,
                )
    print("\ntargets at [64,96,55,55], float32 and float16: >= 80% of the clone's bandwidth, >= 5x composed")


def alexnet_table(reps: int, warmup: int) -> None:
    batch = 32
    variants: dict[str, nn.Module] = {
        "lrnserve LRN": create_network("alexnet"),
        "torch.nn.LocalResponseNorm": create_network(
            "alexnet", lrn_layer=lambda p: nn.LocalResponseNorm(p.size, p.alpha, p.beta, p.k)
        ),
        "no LRN layers": create_network("alexnet", lrn_layer=lambda p: nn.Identity()),
    }
    x = torch.randn(batch, 3, 227, 227)
    with torch.inference_mode():
        fns: dict[str, Fn] = {name: (lambda m=model: m(x)) for name, model in variants.items()}
        t = measure(fns, max(5, reps // 4), max(1, warmup), torch.device("cpu"))
    print(f"\nAlexNet end to end, batch {batch}, CPU, threads={torch.get_num_threads()}")
    print(f"{'variant':30}{'ms/batch':>10}{'images/s':>10}{'vs torch LRN':>14}")
    stock = t["torch.nn.LocalResponseNorm"]
    for name, seconds in t.items():
        print(f"{name:30}{seconds * 1e3:10.1f}{batch / seconds:10.1f}{stock / seconds:13.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per candidate (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-alexnet", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench/ops.py --device cuda: no CUDA device")
        cuda_table(args.reps, args.warmup)
        return
    print(f"torch {torch.__version__}; CPU implementation: {prepare('cpu')}\n")
    op_table(torch.device("cpu"), args.reps, args.warmup)
    if not args.skip_alexnet:
        alexnet_table(args.reps, args.warmup)


if __name__ == "__main__":
    main()
