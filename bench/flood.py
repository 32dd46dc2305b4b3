"""The issue-scale flood: resident memory of ``lrnserve serve`` while many callers send large
tensors at once, against the memory model (README, "Memory").

Starts ``lrnserve serve`` (an LRN model, the given settings), then runs ``--floods`` floods on
that one server: ``--callers`` callers (one connection each, spread over ``--processes``
client processes), each sending one ``--mib`` MiB FP32 tensor back to back for ``--seconds``.
Before each flood the server's peak resident size is reset (``/proc/PID/clear_refs``); after
it, the resident size is sampled for 5 s. Prints one row per flood, and the two bounds:

- the README's formula, idle + activations + 2 x W + allocator_cache_bytes, with
  W = max_inflight_bytes + 2 x receives x message + calls x window;
- the issue's, 3 x max_inflight_bytes + the idle server + 1.5 GiB.

    python bench/flood.py [--callers 24] [--mib 96] [--seconds 20] [--floods 3]
        [--max-inflight-mib 1024] [--receives 8] [--max-concurrent-rpcs 128] [--warmup 0]

Linux only (reads /proc). Needs about callers x mib x 2 of memory for the clients.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

MIB = 1 << 20
# What HTTP/2 flow control lets a waiting caller send ahead: the stream window gRPC announces,
# measured at up to 8 MiB on loopback (it grows with the connection's bandwidth-delay product).
WINDOW = 8 * MIB
ALLOCATOR_CACHE = 256 * MIB  # the server's default allocator_cache_bytes


def resident(pid: int) -> tuple[int, int]:
    """(current, peak since the last reset) resident bytes of ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_bytes(mib: int) -> bytes:
    import numpy as np

    from lrnserve.client.pb import grpc_predict_v2_pb2 as pb

    x = np.ones((1, mib // 4, 1024, 1024), np.float32)
    request = pb.ModelInferRequest(model_name="lrn")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def callers(target: str, count: int, mib: int, start: float, stop: float, out: multiprocessing.Queue) -> None:
    """One client process: ``count`` threads, one connection each, sending until ``stop``."""
    import threading

    import grpc

    request = request_bytes(mib)
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    options = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]

    def caller() -> None:
        with grpc.insecure_channel(target, options=options) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            grpc.channel_ready_future(channel).result(timeout=30)
            time.sleep(max(0.0, start - time.time()))
            while time.time() < stop:
                try:
                    call(request, timeout=120)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=caller) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(dict(codes))


def flood(target: str, args: argparse.Namespace) -> Counter[str]:
    start = time.time() + 5.0  # every process connected and its request built
    stop = start + args.seconds
    out: multiprocessing.Queue = multiprocessing.Queue()
    shares = [args.callers // args.processes + (i < args.callers % args.processes) for i in range(args.processes)]
    procs = [multiprocessing.Process(target=callers, args=(target, n, args.mib, start, stop, out)) for n in shares if n]
    for p in procs:
        p.start()
    codes: Counter[str] = Counter()
    for _ in procs:
        codes.update(out.get(timeout=args.seconds + 300))
    for p in procs:
        p.join(timeout=60)
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=24)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--mib", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--floods", type=int, default=3)
    parser.add_argument("--max-inflight-mib", type=int, default=1024)
    parser.add_argument("--receives", type=int, default=8, help="max_concurrent_receives")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=0, help="requests of that size sent one by one first")
    args = parser.parse_args()

    port, metrics_port = free_port(), free_port()
    config = Path(tempfile.mkdtemp()) / "flood.toml"
    config.write_text('[models.lrn]\nkind = "lrn"\n')
    env = {
        **os.environ,
        "LRNSERVE_MAX_INFLIGHT_BYTES": str(args.max_inflight_mib * MIB),
        "LRNSERVE_MAX_CONCURRENT_RECEIVES": str(args.receives),
        "LRNSERVE_MAX_CONCURRENT_RPCS": str(args.max_concurrent_rpcs),
    }
    command = [sys.executable, "-m", "lrnserve.client.cli", "serve", "--plaintext", "--host", "127.0.0.1"]
    command += ["--grpc-port", str(port), "--metrics-port", str(metrics_port), "--config", str(config)]
    server = subprocess.Popen([*command, "--log-level", "warning"], env=env)
    target = f"127.0.0.1:{port}"
    try:
        import grpc

        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        request = request_bytes(args.mib)
        message = len(request)
        cold = resident(server.pid)[0]
        options = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
        with grpc.insecure_channel(target, options=options) as channel:
            for _ in range(args.warmup):
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(request, timeout=120)
        del request
        time.sleep(3.0 if args.warmup else 0.0)  # past idle_trim_seconds
        receiving = min(args.callers, args.receives)
        working_set = args.max_inflight_mib * MIB + 2 * receiving * message + args.callers * WINDOW
        print(
            f"{args.callers} callers x {args.mib} MiB for {args.seconds:g} s, max_inflight_bytes "
            f"{args.max_inflight_mib} MiB, max_concurrent_receives {args.receives}, "
            f"max_concurrent_rpcs {args.max_concurrent_rpcs}; W = {working_set // MIB} MiB; cold server "
            f"{cold // MIB} MiB, after {args.warmup} warm-up requests {resident(server.pid)[0] // MIB} MiB"
        )
        columns = ["flood", "idle before (MiB)", "peak (MiB)", "formula bound (MiB)", "issue bound (MiB)"]
        columns += ["lowest in 5 s after (MiB)", "within 10 % of idle", "answered / refused"]
        print("| " + " | ".join(columns) + " |")
        print("|---|---|---|---|---|---|---|---|")
        for round_ in range(1, args.floods + 1):
            before = resident(server.pid)[0]
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            codes = flood(target, args)
            peak = resident(server.pid)[1]
            after = []
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                after.append(resident(server.pid)[0])
                time.sleep(0.25)
            settled = min(after)
            formula = before + 2 * working_set + ALLOCATOR_CACHE
            issue = before + 3 * args.max_inflight_mib * MIB + 1536 * MIB
            refused = sum(n for code, n in codes.items() if code != "OK")
            others = sorted(set(codes) - {"OK", "RESOURCE_EXHAUSTED"})
            print(
                f"| {round_} | {before // MIB:,} | {peak // MIB:,} | {formula // MIB:,} | {issue // MIB:,} | "
                f"{settled // MIB:,} | {'yes' if settled <= before * 1.1 else 'no'} | "
                f"{codes.get('OK', 0)} / {refused}{' (' + ', '.join(others) + ')' if others else ''} |",
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
