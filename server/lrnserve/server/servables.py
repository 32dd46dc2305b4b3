"""What a served model is: its tensors, its request parameters, and how a batch runs.

Two kinds: the configurable LRN op (``LRNServable``) and the classic networks
(``NetworkServable``). A servable checks what only it can judge (sample shape,
parameter names, types and ranges) and says which requests may share a batch
(``Resolved.group``) and which values vary per request inside one
(``Resolved.scalars``, broadcast per sample).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from lrnserve.client.datatypes import DATATYPES, DataType, from_torch_name

from . import cuda
from .errors import InvalidArgument
from .importers import built_in_network, read_caffe, read_onnx
from .inference import ModelMetadata, ParameterValue, TensorMetadata
from .models import LRNNetwork, chain
from .models.ir import ModelLoadError
from .models.runtime import GraphNetwork
from .ops import Mode, local_response_norm, local_response_norm_checked, native, prepare, triton_lrn
from .ops.params import BOUNDS, check_mode, check_size
from .preprocess import Preprocessor
from .settings import ModelConfig
from .work import Abandonment, BatchAbandoned

logger = logging.getLogger(__name__)

PLATFORM = "pytorch"
FLOAT_DATATYPES = tuple(name for name, d in DATATYPES.items() if getattr(torch, d.torch).is_floating_point)
# LRN batches computed on the event loop thread (``Servable.cheap``). Measured on the 2-core
# machine: the hand-off of a batch to an instance thread and back cost that thread 75-180 us of
# CPU per batch (mostly taking the GIL from the busy event loop thread), while the kernel took 40
# us for 8 x [16, 8, 8] and 75 / 158 us (across / within) for 32 x [16, 8, 8]. At most 16384
# elements: below the kernel's threshold for running in parallel (32768, csrc/lrn.cpp), so an
# inline batch runs on the event loop thread alone and never starts a thread team there; and at
# most 16 window additions per element on average (the size-5 windows of the LRN layers are 5
# across, 10 within), so a large ``size`` cannot hold the event loop.
INLINE_ELEMENTS = 16384
INLINE_WINDOW_TERMS = 16 * INLINE_ELEMENTS


@dataclass(frozen=True)
class Resolved:
    """A request's parameters after validation."""

    group: Hashable
    scalars: Mapping[str, float]


class Servable(ABC):
    input_name = "input"
    output_name = "output"
    parameter_names: tuple[str, ...] = ()
    threads = 1  # CPU threads one instance computes with (set by its executor)
    # On CUDA, the batch sizes a batch is padded up to (``cuda``); empty: batches run as they come.
    batch_buckets: tuple[int, ...] = ()
    labels: tuple[str, ...] | None = None  # one per class, from the model's labels file

    @property
    def classes(self) -> int | None:
        """The class count when the output is [N, classes] (classification needs it), else None."""
        return None

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.name = config.name

    @abstractmethod
    def load(self, device: torch.device) -> str:
        """Build weights and kernels on ``device`` and warm up; returns a log description."""

    @abstractmethod
    def check_sample_shape(self, shape: tuple[int, ...]) -> str | None:
        """Why a per-sample shape (C, H, W) is unacceptable, or None."""

    layout = "NCHW"  # the input's dimensions as the client sends them

    def input_datatypes(self) -> tuple[str, ...]:
        """The wire datatypes a request's input may have."""
        return FLOAT_DATATYPES

    def output_datatype(self, input_datatype: DataType) -> DataType:
        """The answer's datatype for an input of ``input_datatype``: the same, unless overridden."""
        return input_datatype

    @abstractmethod
    def resolve(self, parameters: Mapping[str, ParameterValue]) -> Resolved:
        """Validate request parameters (reserved protocol ones already removed)."""

    def check_cost(self, shape: tuple[int, ...], resolved: Resolved) -> str | None:
        """Why computing this request would take unreasonably long, or None."""
        return None

    def cheap(self, shape: tuple[int, ...], group: Hashable) -> bool:
        """Whether a batch of ``shape`` costs less to compute than to hand to an instance thread
        and back: the executor then computes a batch of several requests with ``run_raw`` on the
        event loop thread. Only for a batch ``run_raw`` computes on the calling thread alone, in
        microseconds."""
        return False

    def default_cpu_instances(self, cores: int) -> int:
        """Instances to run on a CPU of ``cores`` threads when the configuration leaves it open."""
        return 1

    @abstractmethod
    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]: ...

    @abstractmethod
    def run(
        self,
        group: Hashable,
        x: torch.Tensor,
        scalars: Mapping[str, torch.Tensor],
        abandonment: Abandonment | None = None,
    ) -> torch.Tensor:
        """One batch of ``group`` on the model's device; scalars: one float64 CPU value per sample.
        A servable that computes in stages stops between them (``BatchAbandoned``) once
        ``abandonment`` is set."""

    def run_raw(
        self,
        group: Hashable,
        parts: Sequence[np.ndarray],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        scalars: Mapping[str, np.ndarray],
    ) -> np.ndarray | None:
        """``run`` without torch: ``parts`` are the batch's requests' bytes (uint8, C order) in
        order, ``shape`` the whole batch's; returns the output's bytes, or None where the servable
        cannot (then ``run`` gets the parts joined as a tensor). Each torch call releases the GIL
        and must take it back from a busy event loop thread, which costs far more than a small
        batch's compute."""
        return None

    @abstractmethod
    def metadata(self) -> ModelMetadata: ...

    def _unknown_parameters(self, parameters: Mapping[str, ParameterValue]) -> None:
        unknown = sorted(set(parameters) - set(self.parameter_names))
        if unknown:
            accepted = ", ".join(self.parameter_names) or "none besides timeout and priority"
            raise InvalidArgument(
                f"parameters.{unknown[0]}: unknown parameter for model '{self.name}'; accepted: {accepted}"
            )


class LRNServable(Servable):
    """The LRN op; request parameters override the configured defaults per request."""

    parameter_names = ("mode", "size", "alpha", "beta", "k")
    # The op takes any size; a served one is capped so that one request cannot ask for absurd work.
    max_size = 4096
    # Window additions one request may cost (about 2 s of a 2-core CPU); windows are clipped to
    # the tensor first, so only windows that really overlap the data count.
    max_window_terms = 2**33
    _kernel: native.NativeKernel | None = None  # set by load() on the CPU when the fused kernel builds
    _defaults: Resolved | None = None  # what a request without parameters resolves to (set by resolve)
    gather_bytes = 256 * 1024  # batches up to this size are gathered into one kernel call

    def load(self, device: torch.device) -> str:
        self.device = device
        implementation = prepare(device)
        self._kernel = native.kernel() if device.type == "cpu" else None
        p = self.config.lrn
        warm = torch.randn(2, 8, 4, 4, device=device)
        local_response_norm(warm, p.size, p.alpha, p.beta, p.k, p.mode)
        if device.type == "cuda" and triton_lrn.available():
            implementation += f", {triton_lrn.warm_up(device, p.size, p.alpha, p.beta, p.k)} kernels warmed up"
        return f"{implementation}; defaults size={p.size} alpha={p.alpha} beta={p.beta} k={p.k} mode={p.mode}"

    def check_sample_shape(self, shape: tuple[int, ...]) -> str | None:
        return None

    def resolve(self, parameters: Mapping[str, ParameterValue]) -> Resolved:
        if parameters:
            return self._resolve(parameters)
        if self._defaults is None:  # the configured defaults, checked once
            self._defaults = self._resolve(parameters)
        return self._defaults

    def _resolve(self, parameters: Mapping[str, ParameterValue]) -> Resolved:
        self._unknown_parameters(parameters)
        p = self.config.lrn
        try:
            mode = check_mode(parameters.get("mode", p.mode), "parameters.mode")
            size = check_size(parameters.get("size", p.size), self.max_size, "parameters.size")
            scalars = {
                name: bound.check(parameters.get(name, getattr(p, name)), f"parameters.{name}")
                for name, bound in BOUNDS.items()
            }
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return Resolved(group=(mode, size), scalars=scalars)

    @staticmethod
    def window_terms(shape: tuple[int, ...], group: Hashable) -> int:
        """Window additions a tensor of ``shape`` costs; windows are clipped to the tensor."""
        mode, size = cast(tuple[Mode, int], group)

        def clipped(extent: int) -> int:
            return min(size // 2, extent - 1) + min((size - 1) // 2, extent - 1) + 1

        n, c, h, w = shape
        return n * c * h * w * (clipped(c) if mode == "across" else clipped(h) + clipped(w))

    def check_cost(self, shape: tuple[int, ...], resolved: Resolved) -> str | None:
        mode, size = cast(tuple[Mode, int], resolved.group)
        terms = self.window_terms(shape, resolved.group)
        if terms > self.max_window_terms:
            return (
                f"parameters.size: a {mode} window of {size} over {list(shape)} needs {terms:.3g} additions, "
                f"over the limit of {self.max_window_terms:.3g} per request; use a smaller size or tensor"
            )
        return None

    def cheap(self, shape: tuple[int, ...], group: Hashable) -> bool:
        return (
            self._kernel is not None
            and math.prod(shape) <= INLINE_ELEMENTS
            and self.window_terms(shape, group) <= INLINE_WINDOW_TERMS
        )

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def run(
        self,
        group: Hashable,
        x: torch.Tensor,
        scalars: Mapping[str, torch.Tensor],
        abandonment: Abandonment | None = None,
    ) -> torch.Tensor:
        mode, size = cast(tuple[Mode, int], group)
        return local_response_norm_checked(x, size, scalars["alpha"], scalars["beta"], scalars["k"], mode)

    def run_raw(
        self,
        group: Hashable,
        parts: Sequence[np.ndarray],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        scalars: Mapping[str, np.ndarray],
    ) -> np.ndarray | None:
        """Samples are independent, so a batch of large requests needs no gathering copy: each
        request is normalized straight from its own bytes into its place in the output. Small
        requests are gathered first: one kernel call costs less than several."""
        kernel = self._kernel
        if kernel is None:
            return None
        mode, size = cast(tuple[Mode, int], group)
        out = np.empty(sum(part.nbytes for part in parts), np.uint8)
        alpha, beta, k = scalars["alpha"], scalars["beta"], scalars["k"]
        if len(parts) > 1 and out.nbytes <= self.gather_bytes:
            parts = [np.concatenate(parts)]
        sample_bytes = out.nbytes // shape[0]
        first_sample = offset = 0
        for part in parts:
            samples = part.nbytes // sample_bytes
            scalar_offset = first_sample * alpha.itemsize
            kernel.forward_raw(
                dtype,
                mode,
                part.ctypes.data,
                out.ctypes.data + offset,
                (samples, *shape[1:]),
                size,
                (alpha.ctypes.data + scalar_offset, beta.ctypes.data + scalar_offset, k.ctypes.data + scalar_offset),
                self.threads,
            )
            first_sample += samples
            offset += part.nbytes
        return out

    def metadata(self) -> ModelMetadata:
        variable = (-1, -1, -1, -1)
        return ModelMetadata(
            name=self.name,
            versions=("1",),
            platform=PLATFORM,
            inputs=(TensorMetadata(self.input_name, "FP32", variable),),
            outputs=(TensorMetadata(self.output_name, "FP32", variable),),
        )


def build_network(config: ModelConfig) -> LRNNetwork | GraphNetwork:
    """The model a network config names: a model file through its importer, or a built-in.
    A bad file raises ``ModelLoadError`` with one line naming the file and the layer or node."""
    if config.kind == "caffe":
        assert config.prototxt is not None  # settings require it
        return GraphNetwork(read_caffe(config.prototxt, config.weights, seed=config.seed))
    if config.kind == "onnx":
        assert config.path is not None
        return GraphNetwork(read_onnx(config.path))
    return built_in_network(config.kind, config.weights, seed=config.seed)


def read_labels(path: Path, output: str, sample_shape: tuple[int, ...]) -> tuple[str, ...]:
    """A labels file, one label a line, checked against the output it names: a one-line
    ``ModelLoadError`` naming the file when it cannot be read or does not fit."""
    try:
        labels = tuple(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read the labels file ({exc})") from None
    if len(sample_shape) != 1:
        dims = ", ".join(str(d) for d in sample_shape)
        raise ModelLoadError(f"{path}: labels need an output of shape [N, classes]; output '{output}' is [N, {dims}]")
    if len(labels) != sample_shape[0]:
        raise ModelLoadError(
            f"{path}: {len(labels)} labels, but output '{output}' has {sample_shape[0]} classes; give one label a line"
        )
    return labels


class NetworkServable(Servable):
    """A CNN, built in or from a model file: one input tensor in, one out, computed in the
    configured dtype. An imported model keeps its file's tensor names and shapes."""

    output_name = "probabilities"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.dtype = getattr(torch, config.dtype)
        self.network = build_network(config)
        self.sample_shape = self.network.input_shape
        if isinstance(self.network, GraphNetwork):
            self.input_name = self.network.input_name
            self.output_name = self.network.output_name
            self.output_sample_shape = self.network.output_shape
            self.platform = self.network.format
        else:
            self.output_sample_shape = (self.network.num_classes,)
            self.platform = PLATFORM
        if config.labels is not None:
            self.labels = read_labels(config.labels, self.output_name, self.output_sample_shape)
        # What the client sends, when the server preprocesses (the mean file is read here, at load).
        self.preprocess = Preprocessor(config.preprocess, self.name, self.sample_shape) if config.preprocess else None
        self.client_sample_shape = self.preprocess.client_sample_shape if self.preprocess else self.sample_shape
        self.layout = self.preprocess.layout if self.preprocess else "NCHW"
        self.chain: chain.NativeChain | None = None  # small batches as one native call (CPU, float32)

    @property
    def classes(self) -> int | None:
        return self.output_sample_shape[0] if len(self.output_sample_shape) == 1 else None

    def load(self, device: torch.device) -> str:
        self.device = device
        implementation = prepare(device)
        self.network = self.network.to(device=device, dtype=self.dtype).eval()
        described = ""
        if device.type == "cpu" and self.dtype == torch.float32:
            try:
                self.chain = chain.build(self.network, self.sample_shape)
                described += f"; {self.chain.describe()}"
            except chain.NotChainable as exc:
                logger.debug("%s: runs layer by layer: %s", self.name, exc)
            except Exception:  # a planning fault must not cost a model that runs layer by layer
                logger.warning("%s: native chain not planned; runs layer by layer", self.name, exc_info=True)
            # Conv weights reordered once for oneDNN (for their input shape), Linear layers through
            # the streaming kernel or oneDNN by batch size, each ReLU after them fused, max pools
            # through oneDNN or torch's NHWC kernel by layout (bench/networks.py --unpacked, 2
            # threads, one run, before the last three: AlexNet 1.8x / 1.9x / 1.2x at batch 1 / 8
            # / 32, CaffeNet 2.0x / 1.9x / 1.4x; fc6 alone 4x at batch 8 and 32).
            packed = self.network.prepack_for_cpu()
            described += f"; {packed} convolution and linear layers prepared for the CPU" if packed else ""
        warm_up: tuple[int, ...] = (1,)
        if device.type == "cuda":
            described += f"; {cuda.configure_network(self.name, self.dtype, self.config.allow_tf32)}"
            self.batch_buckets = warm_up = cuda.batch_buckets(self.config.batching.max_batch_size)
            described += f", batch buckets {'/'.join(str(b) for b in warm_up)} warmed up"
        if self.preprocess is not None:
            self.preprocess.to(device, self.dtype)
            self.preprocess(torch.zeros(1, *self.client_sample_shape, device=device, dtype=torch.uint8))
            described += f"; preprocess: {self.preprocess.description}"
        with torch.inference_mode():
            for samples in warm_up:
                self.network(torch.zeros(samples, *self.sample_shape, device=device, dtype=self.dtype))
            if self.chain is not None:
                self.chain(torch.zeros(1, *self.sample_shape, dtype=self.dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return f"weights: {self.network.weights_source}; LRN: {implementation}{described}"

    def default_cpu_instances(self, cores: int) -> int:
        """Up to four instances sharing the cores: a descheduled thread then stalls only its own
        instance's batch, while each instance keeps enough threads and requests to batch well
        (AlexNet on 2 cores at concurrency 32: 43 req/s as 2 x 1 thread, 36 as 1 x 2)."""
        return max(1, min(cores, 4))

    def check_sample_shape(self, shape: tuple[int, ...]) -> str | None:
        if shape != self.client_sample_shape:
            expected = ", ".join(str(d) for d in self.client_sample_shape)
            layout = f" ({self.layout})" if self.preprocess else ""
            return f"expected [N, {expected}]{layout} for model '{self.name}'"
        return None

    def input_datatypes(self) -> tuple[str, ...]:
        if self.preprocess is not None and self.preprocess.uint8:
            return ("UINT8", *FLOAT_DATATYPES)
        return FLOAT_DATATYPES

    def output_datatype(self, input_datatype: DataType) -> DataType:
        """A float input's own datatype (as ever); the model's for a UINT8 image."""
        if input_datatype.wire in FLOAT_DATATYPES:
            return input_datatype
        return from_torch_name(self.config.dtype) or DATATYPES["FP32"]

    def resolve(self, parameters: Mapping[str, ParameterValue]) -> Resolved:
        self._unknown_parameters(parameters)
        return Resolved(group=(), scalars={})

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (input_shape[0], *self.output_sample_shape)

    def run(
        self,
        group: Hashable,
        x: torch.Tensor,
        scalars: Mapping[str, torch.Tensor],
        abandonment: Abandonment | None = None,
    ) -> torch.Tensor:
        """The network stage by stage (feature layers, then the classifier), stopping between
        stages once every request of the batch has gone; a small batch of a small network as one
        native call (``models.chain``) instead."""
        stop = (lambda: abandonment.abandoned) if abandonment is not None else None
        answer_dtype = x.dtype if x.dtype.is_floating_point else self.dtype  # see output_datatype
        if self.preprocess is not None:
            x = self.preprocess(x)
        if self.chain is not None and x.shape[0] <= self.chain.max_batch and x.device.type == "cpu":
            if stop is not None and stop():  # one call: nothing to stop between
                raise BatchAbandoned
            return self.chain(x.to(self.dtype)).to(answer_dtype)
        out = self.network.forward_until(x.to(self.dtype), stop)
        if out is None:
            raise BatchAbandoned
        return out.to(answer_dtype)

    def metadata(self) -> ModelMetadata:
        wire = from_torch_name(self.config.dtype)
        datatype = wire.wire if wire else "FP32"
        sent = "UINT8" if self.preprocess is not None and self.preprocess.uint8 else datatype  # what to send
        return ModelMetadata(
            name=self.name,
            versions=("1",),
            platform=self.platform,
            inputs=(TensorMetadata(self.input_name, sent, (-1, *self.client_sample_shape)),),
            outputs=(TensorMetadata(self.output_name, datatype, (-1, *self.output_sample_shape)),),
        )


def create_servable(config: ModelConfig) -> Servable:
    if config.kind == "lrn":
        return LRNServable(config)
    return NetworkServable(config)
