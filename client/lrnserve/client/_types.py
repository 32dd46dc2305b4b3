"""What the client returns besides tensors: metadata and statistics as plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .pb import grpc_predict_v2_pb2 as pb


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    @classmethod
    def from_proto(cls, m: pb.ModelMetadataResponse) -> ModelMetadata:
        def tensors(ts: object) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in ts)  # type: ignore[attr-defined]

        return cls(m.name, tuple(m.versions), m.platform, tensors(m.inputs), tensors(m.outputs))


class Classification(NamedTuple):
    """One of an image's top classes, as ``classify`` returns them (best first)."""

    label: str | None  # None when the model has no labels
    index: int  # type: ignore[assignment]  # shadows tuple.index, as (label, index, score) reads
    score: float


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]

    @classmethod
    def from_proto(cls, m: pb.ServerMetadataResponse) -> ServerMetadata:
        return cls(m.name, m.version, tuple(m.extensions))


@dataclass(frozen=True)
class ModelStatistics:
    """Cumulative counters of one model (durations in nanoseconds)."""

    name: str
    version: str
    last_inference_ms: int
    inference_count: int  # samples inferred successfully
    execution_count: int  # batches executed
    success_count: int
    success_ns: int
    fail_count: int
    fail_ns: int
    queue_count: int
    queue_ns: int
    compute_count: int
    compute_ns: int
    batch_sizes: dict[int, int]  # batch size (samples) -> executions

    @classmethod
    def from_proto(cls, m: pb.ModelStatistics) -> ModelStatistics:
        s = m.inference_stats
        return cls(
            name=m.name,
            version=m.version,
            last_inference_ms=m.last_inference,
            inference_count=m.inference_count,
            execution_count=m.execution_count,
            success_count=s.success.count,
            success_ns=s.success.ns,
            fail_count=s.fail.count,
            fail_ns=s.fail.ns,
            queue_count=s.queue.count,
            queue_ns=s.queue.ns,
            compute_count=s.compute_infer.count,
            compute_ns=s.compute_infer.ns,
            batch_sizes={b.batch_size: b.compute_infer.count for b in m.batch_stats},
        )
