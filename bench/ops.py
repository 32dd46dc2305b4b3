"""Benchmark the LRN op against torch's implementations and the memory-bound floor.

Prints, per case, the median time of lrnserve's op, of the named baseline and of
``x.clone()`` (the same bytes read and written, no arithmetic), measured
interleaved in one run, with the ratios the targets in the README refer to.
Then AlexNet end to end at batch 32 with lrnserve's LRN, torch's LRN, and no LRN.

    python bench/ops.py [--reps 20] [--warmup 3] [--skip-alexnet]
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
from lrnserve.server.ops import local_response_norm, prepare

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


def bandwidth_table(reps: int, warmup: int) -> None:
    device = torch.device("cuda")
    shape = (64, 96, 55, 55)
    print(f"\nLRN op on {torch.cuda.get_device_name()} at {list(shape)}: effective bandwidth (read + write)")
    print(f"{'dtype':10}{'mode':8}{'ours ms':>9}{'clone ms':>10}{'ours GB/s':>11}{'clone GB/s':>12}{'ratio':>8}")
    for dtype in (torch.float32, torch.float16):
        for mode in ("across", "within"):
            x = torch.randn(shape, device=device, dtype=dtype)
            t = measure(
                {"ours": lambda x=x, m=mode: local_response_norm(x, 5, 1e-4, 0.75, 1.0, m), "clone": x.clone},
                reps,
                warmup,
                device,
            )
            moved = 2 * x.numel() * x.element_size()
            ours_bw, clone_bw = moved / t["ours"] / 1e9, moved / t["clone"] / 1e9
            print(
                f"{str(dtype).removeprefix('torch.'):10}{mode:8}{t['ours'] * 1e3:9.3f}{t['clone'] * 1e3:10.3f}"
                f"{ours_bw:11.0f}{clone_bw:12.0f}{ours_bw / clone_bw:7.0%}"
            )
    print("target: >= 80% of the clone's bandwidth")


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
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; CPU implementation: {prepare('cpu')}\n")
    op_table(torch.device("cpu"), args.reps, args.warmup)
    if torch.cuda.is_available():
        print(f"CUDA implementation: {prepare('cuda')}")
        bandwidth_table(args.reps, args.warmup)
    if not args.skip_alexnet:
        alexnet_table(args.reps, args.warmup)


if __name__ == "__main__":
    main()
