"""The transport-neutral data plane: route, validate, admit, submit, answer.

A ModelInfer call goes route (``ModelRepository.get``) -> ``validate`` (pure: every check,
before anything is queued) -> admit (the in-flight byte budget) -> the model's batcher ->
the answer. Its outcome is reported to telemetry in one place, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import grpc

from lrnserve.client.datatypes import from_wire
from lrnserve.client.version import __version__

from . import shared_memory
from .admission import Budget, Lease
from .classification import BYTES, classify
from .configuration import ModelConfiguration, describe
from .control import ModelControl, ModelState
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServingError,
    Unavailable,
)
from .inference import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    OutputTensor,
    ParameterValue,
    ServerMetadata,
)
from .repository import ModelRepository, ServedModel
from .servables import Servable
from .settings import ServerSettings
from .shared_memory import SharedMemory
from .statistics import ModelStatistics
from .telemetry import Telemetry
from .validate import Limits, Validated, bytes_text, validate

SERVER_NAME = "lrnserve"
# Triton's names for the extensions this server implements (ServerMetadata lists them).
EXTENSIONS = ("parameters", "statistics", "model_configuration", "classification", "model_repository")


# gRPC cancels a call's handler a few milliseconds before the deadline this server computes
# from the call's time_remaining() (measured: 2-10 ms): a cancellation that close to the
# deadline is the deadline's.
DEADLINE_MARGIN_SECONDS = 0.05
# Classification answers up to this many strings (about 10 ms to format) are made on the event loop.
INLINE_CLASSES = 4096


def outcome(exc: BaseException, deadline: float | None) -> grpc.StatusCode:
    """The status a failed call ends with. A cancelled call is DEADLINE_EXCEEDED when the
    caller's deadline had (all but) passed (gRPC cancels the handler then too), else CANCELLED."""
    if isinstance(exc, ServingError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        expired = deadline is not None and time.monotonic() >= deadline - DEADLINE_MARGIN_SECONDS
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class DataPlane:
    """What the protocol's RPCs do, free of any wire format.

    Contract: used from the event loop thread only. ``infer`` raises ``ServingError`` (with
    its status) for anything the caller did or must retry, and reports every call's outcome
    to ``telemetry``; ``draining`` refuses new requests with UNAVAILABLE.
    """

    def __init__(
        self,
        repository: ModelRepository,
        telemetry: Telemetry,
        settings: ServerSettings,
        extensions: tuple[str, ...] = EXTENSIONS,
        control: ModelControl | None = None,
        shared_memory: SharedMemory | None = None,
    ) -> None:
        self.repository = repository
        self.shared_memory = shared_memory if shared_memory is not None else SharedMemory(enabled=False)
        self.control = control
        self.telemetry = telemetry
        self.extensions = extensions
        self.draining = False
        # Calls that began before this (time.monotonic()) are still served while draining.
        self.drain_started = -math.inf
        self.budget = Budget(settings.max_inflight_bytes)
        self._settings = settings
        # Limits depend on the server's settings and a model's max_request_samples only; models
        # loaded later (model control) get theirs on their first request.
        self._limits: dict[int, Limits] = {}

    # ---- health and metadata ----

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.repository.all_ready

    def model_ready(self, name: str, version: str) -> bool:
        return not self.draining and self.repository.get(name, version).ready

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, __version__, self.extensions)

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        model = self.repository.get(name, version)
        versions = tuple(v for v in self.repository.versions(name) if self.repository.get(name, v).ready)
        return replace(self._servable(model).metadata(), versions=versions or (model.version,))

    # ---- model control (the repository extension) ----

    @property
    def repository_root(self) -> Path | None:
        return self.control.root if self.control is not None else None

    def _control(self) -> ModelControl:
        if self.control is None:
            raise Unavailable("model control is not enabled on this server")
        return self.control

    def repository_index(self, ready_only: bool) -> list[ModelState]:
        return self._control().index(ready_only)

    async def load_model(self, name: str, config: str | None, files: Mapping[str, bytes]) -> None:
        """RepositoryModelLoad: ``config`` is JSON with config.toml's keys (it replaces config.toml)."""
        control = self._control()
        control.check_explicit()
        if not name:
            raise InvalidArgument("model_name: give the model to load")
        table = None
        if config is not None:
            try:
                table = json.loads(config)
            except ValueError as exc:
                raise InvalidArgument(f"parameters.config: invalid JSON: {exc}") from None
            if not isinstance(table, dict):
                raise InvalidArgument("parameters.config: expected a JSON object of config.toml keys")
        if self.draining:
            raise Unavailable("server is shutting down")
        await control.load(name, table, files)

    async def unload_model(self, name: str) -> None:
        control = self._control()
        control.check_explicit()
        if not name:
            raise InvalidArgument("model_name: give the model to unload")
        await control.unload(name)

    def model_config(self, name: str, version: str) -> ModelConfiguration:
        return describe(self.repository.get(name, version))

    def statistics(self, name: str, version: str) -> list[tuple[str, str, ModelStatistics]]:
        """(model, version, statistics) of each version served: of one model (one version when
        ``version`` names it), or of every model when ``name`` is empty; oldest version first."""
        if not name:
            served = [(n, v) for n in self.repository.names() for v in self.repository.versions(n)]
        elif version:
            served = [(name, self.repository.get(name, version).version)]
        else:
            self.repository.get(name)  # NOT_FOUND for a model not served
            served = [(name, v) for v in self.repository.versions(name)]
        return [(n, v, self.telemetry.statistics(n, v)) for n, v in served]

    @staticmethod
    def _servable(model: ServedModel) -> Servable:
        if model.servable is None:
            raise Unavailable(f"model '{model.name}' is still loading; retry shortly")
        return model.servable

    # ---- inference ----

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        arrival = time.monotonic()
        deadline = None if request.time_remaining is None else arrival + request.time_remaining
        self.telemetry.request_started()
        code = grpc.StatusCode.OK
        lease = request.lease or self.budget.lease()  # in-process callers have no transport's lease
        routed: str | None = None  # the version whose statistics count this request
        try:
            model = self._route(request)
            routed = model.version
            assert model.servable is not None and model.batcher is not None  # ready
            if lease.refused:
                raise self._busy(lease.refused)
            request = self._inputs_from_shared_memory(request)
            valid = validate(request, model.servable, self._limits_of(model), arrival)
            into = self._output_window(request, valid)
            # An answer in shared memory is held once (the batch's buffer), not three times.
            self._admit(lease, valid.nbytes if request.lease is None else 0, valid.output_bytes, 1 if into else 3)
            raw = await model.batcher.submit(valid.work, valid.deadline)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"model '{model.name}': the answer was ready after the caller's deadline")
            return await self._answer(model, request, valid, raw, into)
        except BaseException as exc:
            code = outcome(exc, deadline)
            raise
        finally:
            if request.lease is None:
                lease.release()
            self.telemetry.request_finished(request.model, code, time.monotonic() - arrival, routed)

    def _limits_of(self, model: ServedModel) -> Limits:
        samples = model.config.batching.max_request_samples
        limits = self._limits.get(samples)
        if limits is None:
            s = self._settings
            limits = self._limits[samples] = Limits(s.max_tensor_bytes, s.max_tensor_elements, samples)
        return limits

    def _admit(self, lease: Lease, input_bytes: int, output_bytes: int, copies: int = 3) -> None:
        """Hold the request's input (when not charged on receipt) and ``copies`` times its output:
        the batch's output buffer, the serialized answer and gRPC's copy of it."""
        needed = input_bytes + copies * output_bytes
        if not lease.charge(needed):
            raise self._busy(needed)

    def _busy(self, nbytes: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"server busy: {bytes_text(self.budget.used)} of requests in flight, limit "
            f"{bytes_text(self.budget.limit)}, {bytes_text(nbytes)} more asked; retry later"
        )

    @property
    def inflight_bytes(self) -> int:
        """Bytes held for requests in flight (``admission``)."""
        return self.budget.used

    def begin_drain(self) -> None:
        """Refuse calls that begin from now on; those already begun (even if their message is
        still arriving) are served."""
        self.drain_started = time.monotonic()
        self.draining = True

    def _route(self, request: InferenceRequest) -> ServedModel:
        if self.draining and (request.started is None or request.started >= self.drain_started):
            raise Unavailable("server is shutting down; retry on another replica")
        model = self.repository.get(request.model, request.version)
        if not model.ready or model.batcher is None or model.servable is None:
            raise Unavailable(f"model '{model.name}' is not ready; retry shortly")
        return model

    # ---- system shared memory (the extension) ----

    def _inputs_from_shared_memory(self, request: InferenceRequest) -> InferenceRequest:
        """Inputs that name a shared memory window, read from it in place (a view of the mapping)."""
        if not any(tensor.parameters for tensor in request.inputs):
            return request
        inputs = []
        for i, tensor in enumerate(request.inputs):
            field = f"inputs[{i}].parameters"
            where = shared_memory.window(tensor.parameters, field)
            if where is None:
                inputs.append(tensor)
                continue
            self._check_same_host(request, field)
            if tensor.raw is not None or tensor.contents_fields:
                raise InvalidArgument(
                    f"{field}.{shared_memory.REGION}: the tensor's data is also in the message; send it one way"
                )
            datatype = from_wire(tensor.datatype)
            if datatype is not None and tensor.shape and all(d >= 1 for d in tensor.shape):
                needed = math.prod(tensor.shape) * datatype.itemsize
                if where.byte_size != needed:
                    raise InvalidArgument(
                        f"{field}.{shared_memory.BYTE_SIZE}: {where.byte_size} bytes, but {list(tensor.shape)} "
                        f"{datatype.wire} is {needed} bytes"
                    )
            inputs.append(replace(tensor, raw=self.shared_memory.slice(where, field)))
        raw_count = len(inputs) if all(tensor.raw is not None for tensor in inputs) else request.raw_count
        return replace(request, inputs=tuple(inputs), raw_count=raw_count)

    @staticmethod
    def _check_same_host(request: InferenceRequest, field: str) -> None:
        if not request.local():
            raise PermissionDenied(
                f"{field}.{shared_memory.REGION}: shared memory is only for callers on the server's host"
            )

    def _output_window(
        self, request: InferenceRequest, valid: Validated
    ) -> tuple[shared_memory.Window, memoryview] | None:
        """Where the answer goes when the request asks for shared memory, checked before compute:
        the window, and its bytes (a view this request keeps, even if the region is unregistered)."""
        field = "outputs[0].parameters"
        where = shared_memory.window(request.output_parameters[0], field) if request.output_parameters else None
        if where is None:
            return None
        self._check_same_host(request, field)
        if where.byte_size < valid.output_bytes:
            raise InvalidArgument(
                f"{field}.{shared_memory.BYTE_SIZE}: {where.byte_size} bytes, but the output "
                f"{list(valid.output_shape)} {valid.datatype.wire} is {valid.output_bytes} bytes"
            )
        return where, self.shared_memory.slice(where, field)

    async def _answer(
        self,
        model: ServedModel,
        request: InferenceRequest,
        valid: Validated,
        raw: bytes | memoryview,
        into: tuple[shared_memory.Window, memoryview] | None = None,
    ) -> InferenceResponse:
        assert model.servable is not None
        name = model.servable.output_name
        if into is not None:
            where, target = into
            written = memoryview(raw).cast("B")
            target[: written.nbytes] = written
            written_to: dict[str, ParameterValue] = {
                shared_memory.REGION: where.region,
                shared_memory.BYTE_SIZE: written.nbytes,
                shared_memory.OFFSET: where.offset,
            }
            output = OutputTensor(name, valid.datatype.wire, valid.output_shape, None, written_to)
            return InferenceResponse(model=model.name, version=model.version, id=request.id, outputs=(output,))
        if valid.classification is not None:
            k, labels = valid.classification, model.servable.labels
            if valid.output_shape[0] * k <= INLINE_CLASSES:
                shape, text = classify(raw, valid.datatype, valid.output_shape, k, labels)
            else:  # formatting each string costs ~2 us: keep a large answer off the event loop
                shape, text = await asyncio.to_thread(classify, raw, valid.datatype, valid.output_shape, k, labels)
            output = OutputTensor(name, BYTES, shape, text)
        else:
            output = OutputTensor(name, valid.datatype.wire, valid.output_shape, raw)
        return InferenceResponse(model=model.name, version=model.version, id=request.id, outputs=(output,))
