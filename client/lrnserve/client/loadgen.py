"""Closed-loop load generation over gRPC: the engine of ``lrnserve bench`` and bench/serve.py.

``concurrency`` workers each keep exactly one ModelInfer call outstanding for
``duration`` seconds (after an untimed warm-up). The request is serialized once
and responses are not parsed, so the client spends as little CPU as possible
on a machine it may share with the server. With ``stream``, one ModelStreamInfer
stream keeps ``concurrency`` requests outstanding instead (each request's id
appended to the serialized bytes; answers parsed for their id).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from ._config import open_channel
from .pb import grpc_predict_v2_pb2 as pb
from .protocol import DEFAULT_MAX_MESSAGE_BYTES, method


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of successful calls, seconds
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> count

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile(sorted(self.latencies), q)

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.latencies)
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "requests": self.ok,
            "throughput": self.throughput,
            "p50_ms": percentile(ordered, 50) * 1e3,
            "p90_ms": percentile(ordered, 90) * 1e3,
            "p99_ms": percentile(ordered, 99) * 1e3,
            "max_ms": (ordered[-1] if ordered else math.nan) * 1e3,
            "errors": dict(self.errors),
        }


Progress = Callable[[float, int, int], None]  # (fraction done, ok so far, errors so far)


def _options(channel_options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        *channel_options,
    ]


async def _report(result: LoadResult, start: float, total: float, progress: Progress | None) -> None:
    """Tell ``progress`` how far the run is, every half second, until cancelled."""
    while True:
        await asyncio.sleep(0.5)
        if progress is not None:
            fraction = min(1.0, max(0.0, (time.perf_counter() - start) / total))
            progress(fraction, result.ok, sum(result.errors.values()))


async def _run(
    target: str,
    payloads: Sequence[bytes],
    concurrency: int,
    duration: float,
    warmup: float,
    timeout: float | None,
    progress: Progress | None,
    channel_options: Sequence[tuple[str, object]],
    credentials: grpc.ChannelCredentials | None,
    metadata: Sequence[tuple[str, str]],
) -> LoadResult:
    async with open_channel(target, _options(channel_options), credentials, aio=True) as channel:
        # bytes in, bytes out: no (de)serialization
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method("ModelInfer"))
        result = LoadResult(concurrency, 0.0)
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration

        async def worker(payload: bytes) -> None:
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                try:
                    await call(payload, timeout=timeout, metadata=metadata)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                done = time.perf_counter()
                if sent >= measure_from:
                    if code == "OK":
                        result.latencies.append(done - sent)
                    else:
                        result.errors[code] += 1

        reporter = asyncio.create_task(_report(result, start, warmup + duration, progress))
        try:
            await asyncio.gather(*(worker(payloads[i % len(payloads)]) for i in range(concurrency)))
        finally:
            reporter.cancel()
        # Calls that started before the deadline finish after it; count the time they took.
        result.seconds = max(time.perf_counter(), stop_at) - measure_from
        if progress is not None:
            progress(1.0, result.ok, sum(result.errors.values()))
        return result


def _with_id(payload: bytes, request_id: int) -> bytes:
    """``payload`` (a serialized ModelInferRequest without an id) with ``id`` = str(request_id):
    a field appended to a serialized message is read as if it had been set."""
    text = str(request_id).encode()
    return payload + bytes((ID_KEY, len(text))) + text


ID_KEY = (pb.ModelInferRequest.ID_FIELD_NUMBER << 3) | 2  # field 3, length-delimited


async def _run_stream(
    target: str,
    payloads: Sequence[bytes],
    concurrency: int,
    duration: float,
    warmup: float,
    timeout: float | None,
    progress: Progress | None,
    channel_options: Sequence[tuple[str, object]],
    credentials: grpc.ChannelCredentials | None,
    metadata: Sequence[tuple[str, str]],
) -> LoadResult:
    """One ModelStreamInfer stream with ``concurrency`` requests outstanding on it."""
    async with open_channel(target, _options(channel_options), credentials, aio=True) as channel:
        stream: grpc.aio.StreamStreamMultiCallable[bytes, pb.ModelStreamInferResponse] = channel.stream_stream(
            method("ModelStreamInfer"), response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        call = stream(timeout=None if timeout is None else timeout + warmup + duration, metadata=metadata)
        result = LoadResult(concurrency, 0.0)
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration
        slots = asyncio.Semaphore(concurrency)
        sent_at: dict[str, float] = {}

        async def send() -> None:
            for request_id in range(2**62):
                await slots.acquire()
                now = time.perf_counter()
                if now >= stop_at:
                    break
                sent_at[str(request_id)] = now
                await call.write(_with_id(payloads[request_id % len(payloads)], request_id))
            await call.done_writing()

        async def receive() -> None:
            async for answer in call:
                done = time.perf_counter()
                sent = sent_at.pop(answer.infer_response.id, done)
                slots.release()
                if sent >= measure_from:
                    if answer.error_message:
                        result.errors["STREAM_ERROR"] += 1
                    else:
                        result.latencies.append(done - sent)

        reporter = asyncio.create_task(_report(result, start, warmup + duration, progress))
        try:
            await asyncio.gather(send(), receive())
        except grpc.aio.AioRpcError as exc:  # the stream itself failed: what it still held is lost
            result.errors[exc.code().name] += len(sent_at)
        finally:
            reporter.cancel()
        result.seconds = max(time.perf_counter(), stop_at) - measure_from
        if progress is not None:
            progress(1.0, result.ok, sum(result.errors.values()))
        return result


def run_load(
    target: str,
    request: pb.ModelInferRequest | Sequence[pb.ModelInferRequest],
    concurrency: int,
    duration: float,
    *,
    warmup: float = 1.0,
    timeout: float | None = 60.0,
    progress: Progress | None = None,
    channel_options: Sequence[tuple[str, object]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    stream: bool = False,
) -> LoadResult:
    """Closed-loop load at one concurrency; blocks for ``warmup + duration`` seconds.

    ``stream``: one ModelStreamInfer stream with ``concurrency`` requests outstanding on it
    (each answer lets the next request go), instead of ``concurrency`` ModelInfer calls at a
    time. ``credentials`` (TLS) and ``metadata`` (e.g. a bearer token) are used as given.
    Several requests: worker i sends request i (modulo their number), e.g. one per worker when
    each names its own shared memory regions; on a stream, they take turns."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    requests = [request] if isinstance(request, pb.ModelInferRequest) else list(request)
    if not requests:
        raise ValueError("no request to send")
    payloads = []
    for each in requests:
        without_id = pb.ModelInferRequest()
        without_id.CopyFrom(each)
        without_id.ClearField("id")
        payloads.append(without_id.SerializeToString())
    engine = _run_stream if stream else _run
    settings = (channel_options, credentials, metadata)
    return asyncio.run(engine(target, payloads, concurrency, duration, warmup, timeout, progress, *settings))
