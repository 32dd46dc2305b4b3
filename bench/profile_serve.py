"""Where a served request's time goes: py-spy samples the server under closed-loop load.

Starts ``lrnserve serve`` as bench/serve.py does (batching server, lrn and alexnet models), drives
it with lrnserve's load generator (ModelInfer calls, or one ModelStreamInfer stream with
``--stream``; ``--concurrency`` in flight, ``--shape`` FP32 inputs to the ``lrn`` model) and
meanwhile records the server with py-spy for ``--seconds`` (``--gil``: only the thread holding
the GIL, i.e. the Python work that serialises the server).
Prints the functions with the most samples, by own time and by time including callees, as
percentages of all samples, plus the load's throughput during the recording.

    python bench/profile_serve.py [--shape 1,16,8,8] [--concurrency 16] [--stream] [--seconds 10] [--rate 200]
        [--py-spy PATH] [--top 25] [--raw out.txt]

py-spy is not a dependency of lrnserve: ``pip install py-spy`` (it needs ptrace rights over the
server process, which a process has over its own children).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import serve as serve_bench

from lrnserve.client.loadgen import run_load


def collapse(raw: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Own and inclusive samples per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
        frames = [frame for frame in frames if not frame.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return own, inclusive, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1,16,8,8")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="the load over one ModelStreamInfer stream")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy executable")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="also keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    if not args.py_spy:
        raise SystemExit("py-spy not found: pip install py-spy, or pass --py-spy PATH")
    shape = tuple(int(d) for d in args.shape.split(","))
    case = serve_bench.Case(f"lrn {list(shape)}", "lrn", shape)
    request = serve_bench.request_for(case)
    with serve_bench.server(32) as target, tempfile.TemporaryDirectory() as tmp:
        pid = serve_bench.SERVER_PIDS[target]
        out = Path(tmp) / "raw.txt"
        box: dict[str, object] = {}
        started = threading.Event()
        total = args.seconds + 6.0

        def progress(fraction: float, ok: int, errors: int) -> None:
            if fraction * total >= 2.0 and ok:  # past the warm-up, answers coming back
                started.set()

        load = threading.Thread(
            target=lambda: box.update(
                result=run_load(
                    target, request, args.concurrency, total - 1.0, warmup=1.0, progress=progress, stream=args.stream
                )
            )
        )
        load.start()
        record = [args.py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration"]
        record += [str(int(args.seconds)), "--format", "raw", "--output", str(out), "--nonblocking", "--gil"]
        started.wait(timeout=60)  # the load generator's first answers: past its start-up
        subprocess.run(record, check=True, capture_output=True)
        load.join()
        raw = out.read_text()
        if args.raw:
            args.raw.write_text(raw)
    own, inclusive, total = collapse(raw)
    result = box["result"]
    print(f"lrn {list(shape)}, concurrency {args.concurrency}: {result.throughput:.0f} req/s over the run")  # type: ignore[attr-defined]
    print(f"py-spy --gil, {total} samples at {args.rate}/s over {args.seconds:g} s")
    for title, counter in (("own time", own), ("including callees", inclusive)):
        print(f"\n{title}:")
        for frame, count in counter.most_common(args.top):
            print(f"{100 * count / max(total, 1):6.1f}%  {frame}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
