"""The one converter between protobuf messages and the domain objects of ``inference``.

It judges nothing: what it cannot convert (a parameter without a value, typed
contents in several fields) it passes on as such, for ``validate`` to refuse.
ModelInfer's tensor bytes travel as views and one copy each way (``wire``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lrnserve.client._tensors import set_parameter
from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.protocol import CONTENTS_FIELDS  # typed contents fields -> numpy type of their values

from ..catalog import VersionPolicy
from ..configuration import ModelConfiguration, TensorConfig
from ..inference import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    ModelMetadata,
    ParameterValue,
    ServerMetadata,
)
from ..shared_memory import Region
from ..statistics import Duration, ModelStatistics
from .calls import current_call
from .wire import InferRequestWire, encode_infer_response


def parameters_from_proto(params: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue | None]:
    """None stands for a parameter sent without a value; the data plane refuses it."""
    return {name: _parameter_value(param) for name, param in params.items()}


def _parameter_value(param: pb.InferParameter) -> ParameterValue | None:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def _contents(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """The typed contents as an array, with the fields that carried values (the array only when
    exactly one did; bytes_contents never makes a numeric tensor, the data plane says why)."""
    if not tensor.HasField("contents"):
        return None, ()
    present = tuple(name for name in CONTENTS_FIELDS if len(getattr(tensor.contents, name)))
    if len(tensor.contents.bytes_contents):
        present += ("bytes_contents",)
    if len(present) != 1 or present[0] == "bytes_contents":
        return None, present
    field = present[0]
    return np.array(getattr(tensor.contents, field), dtype=CONTENTS_FIELDS[field]), present


def _in_process() -> bool:
    return True


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string names this host: a unix socket, or a loopback address."""
    return peer.startswith(("unix:", "ipv4:127.", "ipv6:[::1]", "ipv6:%5B::1%5D"))


def request_from_wire(
    wire: InferRequestWire, time_remaining: float | None, local: Callable[[], bool] | None = None
) -> InferenceRequest:
    message = wire.message
    call = current_call()
    raw = wire.raw_input_contents
    inputs = []
    for i, tensor in enumerate(message.inputs):
        contents, fields = _contents(tensor)
        inputs.append(
            InputTensor(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=tuple(tensor.shape),
                raw=raw[i] if i < len(raw) else None,
                contents=contents,
                contents_fields=fields,
                parameters=parameters_from_proto(tensor.parameters) if tensor.parameters else {},
            )
        )
    outputs = message.outputs
    return InferenceRequest(
        model=message.model_name,
        version=message.model_version,
        id=message.id,
        inputs=tuple(inputs),
        parameters=parameters_from_proto(message.parameters) if message.parameters else {},
        requested_outputs=tuple(output.name for output in outputs) if outputs else (),
        output_parameters=tuple(parameters_from_proto(output.parameters) for output in outputs) if outputs else (),
        time_remaining=time_remaining,
        raw_count=len(raw),
        started=wire.received if wire.received is not None else None if call is None else call.started,
        lease=wire.lease if wire.lease is not None else None if call is None else call.lease,
        local=local if local is not None else _in_process,
    )


def response_to_wire(response: InferenceResponse) -> bytes:
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for output in response.outputs:
        tensor = message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        for name, value in output.parameters.items():  # an output written to shared memory says where
            set_parameter(tensor.parameters[name], name, value)
    return encode_infer_response(message, [output.raw for output in response.outputs if output.raw is not None])


def shared_memory_status_to_proto(regions: list[Region]) -> pb.SystemSharedMemoryStatusResponse:
    response = pb.SystemSharedMemoryStatusResponse()
    for region in regions:
        entry = response.regions[region.name]
        entry.name, entry.key, entry.offset, entry.byte_size = region.name, region.key, region.offset, region.byte_size
    return response


def model_metadata_to_proto(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs],
    )


def _data_type(wire: str) -> pb.DataType.ValueType:
    """Triton's enum for a wire datatype name (BYTES is its TYPE_STRING)."""
    return pb.DataType.Value("TYPE_STRING" if wire == "BYTES" else f"TYPE_{wire}")


def _input_to_proto(tensor: TensorConfig) -> pb.ModelInput:
    layout = pb.ModelInput.Format.Value(f"FORMAT_{tensor.format}") if tensor.format else pb.ModelInput.FORMAT_NONE
    return pb.ModelInput(name=tensor.name, data_type=_data_type(tensor.datatype), format=layout, dims=tensor.dims)


def _output_to_proto(tensor: TensorConfig) -> pb.ModelOutput:
    return pb.ModelOutput(
        name=tensor.name, data_type=_data_type(tensor.datatype), dims=tensor.dims, label_filename=tensor.label_filename
    )


def _version_policy_to_proto(policy: VersionPolicy) -> pb.ModelVersionPolicy:
    """Triton's oneof: latest {num_versions}, all {}, or specific {versions}."""
    if policy.kind == "all":
        return pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())
    if policy.kind == "specific":
        return pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=policy.specific))
    return pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=policy.latest))


def model_config_to_proto(config: ModelConfiguration) -> pb.ModelConfigResponse:
    message = pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        input=[_input_to_proto(t) for t in config.inputs],
        output=[_output_to_proto(t) for t in config.outputs],
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=config.preferred_batch_sizes,
            max_queue_delay_microseconds=config.max_queue_delay_us,
        ),
        instance_group=[
            pb.ModelInstanceGroup(
                name=f"{config.name}_0",  # Triton's name for a model's first (unnamed) group
                count=config.instance_count,
                kind=pb.ModelInstanceGroup.Kind.Value(f"KIND_{config.instance_kind}"),
                gpus=config.gpus,
            )
        ],
        version_policy=_version_policy_to_proto(config.version_policy),
        parameters={key: pb.ModelParameter(string_value=value) for key, value in config.parameters.items()},
    )
    return pb.ModelConfigResponse(config=message)


def server_metadata_to_proto(metadata: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_to_proto(models: list[tuple[str, str, ModelStatistics]]) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    for name, version, stats in models:
        entry = response.model_stats.add(
            name=name,
            version=version,
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
