"""Networks end to end on CUDA (``bench/networks.py --device cuda``): lrnserve against torch.

For each network, dtype and batch size, on the same weights and inputs (already on the device,
outputs left there: this is the compute the executor's copies wrap), taking turns, medians of
``--reps`` samples of at least ``MIN_SAMPLE_S`` each:

- ``lrnserve``: ``NetworkServable`` loaded on CUDA as the server loads it (cuDNN autotuning,
  warmed-up batch buckets, TF32 off, the Triton LRN kernel), called as the executor calls it;
- ``torch``: torch eager, the same network with ``torch.nn.LocalResponseNorm``, cuDNN autotuning
  on as well;
- ``compile``: ``torch.compile`` of ``torch`` (at ``--compile-batches`` only: each batch size
  compiles anew, which costs tens of seconds).

Prints one markdown table; "err" is the largest |out - lrnserve| relative to the spread of
lrnserve's output (seeded random weights give nearly uniform probabilities).

    python bench/networks.py --device cuda [--networks alexnet,googlenet] [--dtypes float32,float16]
        [--batches 1,8,32,128] [--compile-batches 128] [--reps 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lrnserve.server.models import create_network
from lrnserve.server.ops import LRNParams
from lrnserve.server.servables import NetworkServable
from lrnserve.server.settings import BatchingPolicy, ModelConfig

MIN_SAMPLE_S = 0.05

Fn = Callable[[torch.Tensor], torch.Tensor]


def stock_lrn(p: LRNParams) -> nn.Module:
    """torch's own LRN (across channels); within-channel as its avg_pool2d composition."""
    if p.mode == "across":
        return nn.LocalResponseNorm(p.size, p.alpha, p.beta, p.k)

    class Within(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean = nn.functional.avg_pool2d(x * x, p.size, stride=1, padding=p.size // 2, count_include_pad=True)
            return x * (p.k + p.alpha * mean).pow(-p.beta)

    return Within()


def engines(name: str, dtype: str, max_batch: int, compile_: bool) -> tuple[dict[str, Fn], tuple[int, ...], float]:
    device = torch.device("cuda")
    config = ModelConfig(name=name, kind=name, dtype=dtype, batching=BatchingPolicy(max_batch_size=max_batch))
    servable = NetworkServable(config)
    start = time.perf_counter()
    servable.load(device)
    load_s = time.perf_counter() - start
    torch_dtype = getattr(torch, dtype)
    reference = create_network(name, lrn_layer=stock_lrn).to(device=device, dtype=torch_dtype).eval()
    fns: dict[str, Fn] = {
        "lrnserve": lambda x: servable.run((), x, {}),
        "torch": reference,
    }
    if compile_:
        fns["compile"] = torch.compile(reference, dynamic=False)  # type: ignore[assignment]
    return fns, servable.sample_shape, load_s


def timed(fn: Fn, x: torch.Tensor, repeat: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn(x)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def spread_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.double().reshape(ref.shape[0], -1)
    spread = (ref64 - ref64.mean(dim=1, keepdim=True)).abs().max().item()
    return float((out.double().reshape(ref64.shape) - ref64).abs().max().item() / (spread or 1.0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--networks", default="alexnet,googlenet")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--compile-batches", default="128", help="batch sizes torch.compile is measured at")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/networks.py --device cuda: no CUDA device")
    batches = [int(b) for b in args.batches.split(",")]
    compile_at = {int(b) for b in args.compile_batches.split(",") if b}
    print(
        f"Networks on {torch.cuda.get_device_name()}: images/s, inputs and outputs on the device, "
        f"torch {torch.__version__}, medians of {args.reps}, engines alternating\n"
    )
    print("| network | dtype | batch | lrnserve | torch eager | torch.compile | vs eager | vs compile | err |")
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.networks.split(","):
            for dtype in args.dtypes.split(","):
                fns, sample_shape, _ = engines(name, dtype, max(batches), bool(compile_at & set(batches)))
                for batch in batches:
                    x = torch.randn(batch, *sample_shape, device="cuda").to(getattr(torch, dtype))
                    names = [n for n in fns if n != "compile" or batch in compile_at]
                    reference = fns["lrnserve"](x)
                    error = max(spread_error(fns[n](x), reference) for n in names)
                    repeat = {n: max(1, math.ceil(MIN_SAMPLE_S / max(timed(fns[n], x, 1), 1e-6))) for n in names}
                    samples: dict[str, list[float]] = {n: [] for n in names}
                    for rep in range(args.reps):
                        for n in names[rep % len(names) :] + names[: rep % len(names)]:
                            samples[n].append(repeat[n] * batch / timed(fns[n], x, repeat[n]))
                    ips = {n: statistics.median(v) for n, v in samples.items()}
                    compiled = ips.get("compile")
                    compiled_ips = f"{compiled:,.0f}" if compiled else ""
                    vs_compiled = f"{ips['lrnserve'] / compiled:.2f}x" if compiled else ""
                    print(
                        f"| {name} | {dtype} | {batch} | {ips['lrnserve']:,.0f} | {ips['torch']:,.0f} | "
                        f"{compiled_ips} | {ips['lrnserve'] / ips['torch']:.2f}x | {vs_compiled} | {error:.1e} |",
                        flush=True,
                    )
    print("\ntarget (H100/H200): AlexNet float16 at batch 128 >= 2x torch eager with the stock LRN")


if __name__ == "__main__":
    main()
