"""What the ModelConfig RPC reports of a served model, as Triton's model configuration.

Built from what the model really runs with (its servable's tensors, the batching policy,
the executor's instances, the device), so that tools written for Triton (perf_analyzer,
image_client) read the truth. Transport-neutral: ``transport.codec`` makes the protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .catalog import VersionPolicy
from .errors import Unavailable
from .repository import ServedModel

# The engine that executes every model, whatever its file's format (``platform``).
BACKEND = "pytorch"


@dataclass(frozen=True)
class TensorConfig:
    name: str
    datatype: str  # the wire name (FP32, ...)
    dims: tuple[int, ...]  # without the batch dimension; -1: any size
    label_filename: str = ""  # outputs only
    format: str = ""  # inputs only: NCHW or NHWC for a network's images, "" for none


@dataclass(frozen=True)
class ModelConfiguration:
    name: str
    platform: str  # the model's format, as ModelMetadata reports it
    backend: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    instance_count: int
    instance_kind: str  # CPU | GPU
    gpus: tuple[int, ...]
    version_policy: VersionPolicy  # the repository folder's; latest 1 for a configured model
    parameters: Mapping[str, str]


def describe(model: ServedModel) -> ModelConfiguration:
    """``model``'s configuration; UNAVAILABLE while it is still loading."""
    servable, executor = model.servable, model.executor
    if servable is None or executor is None:
        raise Unavailable(f"model '{model.name}' is still loading; retry shortly")
    metadata = servable.metadata()
    layout = "" if model.config.kind == "lrn" else servable.layout  # the LRN takes any layout
    labels = model.config.labels.name if model.config.labels is not None else ""
    inputs = tuple(TensorConfig(t.name, t.datatype, t.shape[1:], format=layout) for t in metadata.inputs)
    outputs = tuple(TensorConfig(t.name, t.datatype, t.shape[1:], label_filename=labels) for t in metadata.outputs)
    batching = model.config.batching
    gpu = model.device.type == "cuda"
    return ModelConfiguration(
        name=model.name,
        platform=metadata.platform,
        backend=BACKEND,
        max_batch_size=batching.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        max_queue_delay_us=batching.max_queue_delay_us,
        # None preferred: batches grow up to max_batch_size while more requests are expected.
        preferred_batch_sizes=(),
        instance_count=executor.instances,
        instance_kind="GPU" if gpu else "CPU",
        gpus=(model.device.index or 0,) if gpu else (),
        version_policy=model.policy,
        parameters=_parameters(model),
    )


def _parameters(model: ServedModel) -> dict[str, str]:
    """What else decides the model's answers: its kind, compute dtype or LRN defaults, queue size."""
    config = model.config
    parameters = {"kind": config.kind, "max_queue_size": str(config.batching.max_queue_size)}
    if config.kind == "lrn":
        p = config.lrn
        parameters.update(mode=p.mode, size=str(p.size), alpha=repr(p.alpha), beta=repr(p.beta), k=repr(p.k))
    else:
        parameters["dtype"] = config.dtype
    return parameters
