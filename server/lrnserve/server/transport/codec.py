"""The one converter between protobuf messages and the domain objects of ``inference``.

It checks only what it needs to convert (a parameter without a value, typed
contents in several fields); everything else is the dataplane's to judge.
ModelInfer's tensor bytes travel as views and one copy each way (``wire``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb

from ..errors import InvalidArgument
from ..inference import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    ModelMetadata,
    ParameterValue,
    ServerMetadata,
)
from ..statistics import Duration, ModelStatistics
from .wire import InferRequestWire, encode_infer_response

# Typed contents fields and the numpy dtype their values arrive as.
CONTENTS_FIELDS = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


def parameters_from_proto(where: str, params: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    out: dict[str, ParameterValue] = {}
    for name, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidArgument(f"{where}.{name}: parameter has no value")
        out[name] = getattr(param, kind)
    return out


def _contents(index: int, tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[np.ndarray | None, str | None]:
    if not tensor.HasField("contents"):
        return None, None
    present = [name for name in CONTENTS_FIELDS if len(getattr(tensor.contents, name))]
    if len(tensor.contents.bytes_contents):
        present.append("bytes_contents")
    if not present:
        return None, None
    if len(present) > 1:
        raise InvalidArgument(f"inputs[{index}].contents: values in {' and '.join(present)}; use one field")
    field = present[0]
    if field == "bytes_contents":
        return np.empty(0), field  # never a valid numeric tensor; the dataplane says why
    return np.array(getattr(tensor.contents, field), dtype=CONTENTS_FIELDS[field]), field


def request_from_wire(wire: InferRequestWire, time_remaining: float | None) -> InferenceRequest:
    message = wire.message
    raw = wire.raw_input_contents
    inputs = []
    for i, tensor in enumerate(message.inputs):
        contents, field = _contents(i, tensor)
        inputs.append(
            InputTensor(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=tuple(tensor.shape),
                raw=raw[i] if i < len(raw) else None,
                contents=contents,
                contents_field=field,
            )
        )
    return InferenceRequest(
        model=message.model_name,
        version=message.model_version,
        id=message.id,
        inputs=tuple(inputs),
        parameters=parameters_from_proto("parameters", message.parameters),
        requested_outputs=tuple(output.name for output in message.outputs),
        time_remaining=time_remaining,
        raw_count=len(raw),
    )


def response_to_wire(response: InferenceResponse) -> bytes:
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for output in response.outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
    return encode_infer_response(message, [output.raw for output in response.outputs])


def model_metadata_to_proto(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs],
    )


def server_metadata_to_proto(metadata: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_to_proto(models: list[tuple[str, ModelStatistics]]) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    for name, stats in models:
        entry = response.model_stats.add(
            name=name,
            version="1",
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
        )
        entry.inference_stats.success.CopyFrom(_duration(stats.success))
        entry.inference_stats.fail.CopyFrom(_duration(stats.fail))
        entry.inference_stats.queue.CopyFrom(_duration(stats.queue))
        entry.inference_stats.compute_infer.CopyFrom(_duration(stats.compute_infer))
        for size in sorted(stats.batches):
            batch = entry.batch_stats.add(batch_size=size)
            batch.compute_infer.CopyFrom(_duration(stats.batches[size]))
    return response
