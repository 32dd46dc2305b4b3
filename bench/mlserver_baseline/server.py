"""The serving benchmark's baseline: Seldon's MLServer 1.7.1 serving torch's stock LRN.

``mlserver(port)`` starts ``.bench-mlserver-venv/bin/mlserver start bench/mlserver_baseline/models``
on loopback, waits until ServerReady and ModelReady("lrn") answer true over gRPC, yields
``"127.0.0.1:PORT"`` and stops it (SIGTERM, then SIGKILL) on exit. The model is ``lrn`` with input
``input`` and output ``output``, so the requests of bench/serve.py (``request_for``) work as they are.
Create the venv first with ``bash bench/mlserver_baseline/setup.sh``.

    from mlserver_baseline.server import mlserver     # from bench/serve.py (bench/ is on sys.path)
    with mlserver() as target:
        run_load(target, request, 16, 5.0)

    python bench/mlserver_baseline/server.py [--port N]      # serve until Ctrl-C

Configuration (models/settings.json, models/lrn/model-settings.json, models/runtime.py):

- MLServer's defaults, plus adaptive batching: ``max_batch_size`` 32 and ``max_batch_time`` 0.002 s,
  the same cap and the same wait for a fuller batch as lrnserve's default policy
  (max_batch_size 32, max_queue_delay_us 2000), so both servers get the same latency budget.
  MLServer's batcher closes a batch only when it is full or that time is up, so at concurrency 16
  every batch waits the full 2 ms.
- ``parallel_workers`` 1: MLServer's default. Inference runs in one worker process beside the
  main process, which does gRPC, decoding and batching; with 2 cores that is one process each.
  ``mlserver(parallel_workers=0)`` runs the model in the main process's event loop instead (no
  pickling of each batch to and from the worker); it is passed as ``MLSERVER_PARALLEL_WORKERS``.
  torch in the worker keeps its default thread count (one per core); the environment is passed
  on, so e.g. ``OMP_NUM_THREADS=1`` reaches it (that was 1.7x faster at [1,16,8,8] here: its two
  OpenMP threads compete with MLServer's main process and the load generator for the 2 cores).
- ``debug`` false: MLServer defaults to true, which only adds a log line per gRPC call (its access
  log); lrnserve logs no access lines either. Nothing else differs from the defaults: metrics stay
  on (as in the batching lrnserve variant of bench/serve.py), tracing and Kafka stay off.
- Ports: gRPC on ``port``; REST (``http_port``) and metrics (``metrics_port``) get free loopback
  ports, since MLServer always starts them. Everything binds to 127.0.0.1 (``MLSERVER_HOST``).
  The ports and host are passed as ``MLSERVER_*`` environment variables; values in settings.json
  would take precedence over them, so settings.json names none.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODELS = HERE / "models"
VENV = Path(os.environ.get("BENCH_MLSERVER_VENV", ROOT / ".bench-mlserver-venv"))
MLSERVER = VENV / "bin" / "mlserver"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def mlserver(
    port: int | None = None, ready_timeout: float = 120.0, log: Path | None = None, parallel_workers: int = 1
) -> Iterator[str]:
    """Serve the baseline on 127.0.0.1:``port`` (a free port when None) and yield that target.

    MLServer's output goes to ``log`` (a file in a temporary folder when None); its tail is in the
    error when the server does not become ready within ``ready_timeout`` seconds."""
    if not MLSERVER.exists():
        raise RuntimeError(f"{MLSERVER} missing: run bash bench/mlserver_baseline/setup.sh first")
    port = port or free_port()
    target = f"{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-mlserver-") as tmp:
        log = log or Path(tmp) / "mlserver.log"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(
            MLSERVER_HOST=HOST,
            MLSERVER_GRPC_PORT=str(port),
            MLSERVER_HTTP_PORT=str(free_port()),
            MLSERVER_METRICS_PORT=str(free_port()),
            MLSERVER_PARALLEL_WORKERS=str(parallel_workers),
            MLSERVER_METRICS_DIR=str(Path(tmp) / "metrics"),  # default: .metrics in the cwd
            PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        )
        with open(log, "wb") as out:
            # Own session, so that MLServer's worker processes can be found and ended with it.
            proc = subprocess.Popen(
                [str(MLSERVER), "start", str(MODELS)],
                cwd=tmp,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_ready(proc, target, ready_timeout, log)
            yield target
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], target: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                if (
                    stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
                    and stub.ModelReady(pb.ModelReadyRequest(name="lrn"), timeout=1).ready
                ):
                    return
            except grpc.RpcError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mlserver exited with {proc.returncode}:\n{_tail(log)}")
            if b"stopped unexpectedly" in log.read_bytes():  # its inference worker died; it restarts it forever
                raise RuntimeError(f"mlserver's inference worker died:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlserver not ready after {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # Whatever MLServer left of its session (worker processes) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--parallel-workers", type=int, default=1, help="MLServer's parallel_workers (default 1, its own)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    with mlserver(
        args.port, parallel_workers=args.parallel_workers, log=Path(tempfile.gettempdir()) / "bench-mlserver.log"
    ) as target:
        print(
            f"MLServer baseline serving model lrn on {target} (log {tempfile.gettempdir()}/bench-mlserver.log)",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
