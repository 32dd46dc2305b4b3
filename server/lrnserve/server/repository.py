"""The model repository: loads every configured model and owns what serves it.

Each ``ServedModel`` is the one owner of its servable, executor and batcher. Models load in
worker threads after the server is already answering (live but not ready), so orchestrators
can tell "starting" from "dead". Each load logs one line: device, dtype, where the weights
came from, and how long it took. How a servable is made is injected (``ServableFactory``):
the server passes ``create_servable``; tests pass one that wraps it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .batching import Batcher
from .catalog import LATEST_ONE, VersionPolicy
from .errors import NotFound
from .eventloop import in_own_thread
from .executor import Executor
from .schema import ConfigError
from .servables import Servable
from .settings import ModelConfig
from .telemetry import Telemetry

ServableFactory = Callable[[ModelConfig], Servable]

logger = logging.getLogger(__name__)


def resolve_devices(models: Sequence[ModelConfig], server_default: str) -> dict[str, torch.device]:
    """Each model's device, known before anything loads (telemetry labels series with it)."""
    return {config.name: resolve_device(config.device, server_default) for config in models}


def resolve_device(requested: str, server_default: str) -> torch.device:
    """auto -> the server's device -> cuda when available, else cpu."""
    name = requested if requested != "auto" else server_default
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} requested but this torch build sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device


@dataclass
class ServedModel:
    """One configured model; ``servable``, ``executor`` and ``batcher`` are set once it loaded."""

    config: ModelConfig
    device: torch.device
    servable: Servable | None = None
    executor: Executor | None = None
    batcher: Batcher | None = None
    ready: bool = False
    load_seconds: float = 0.0
    version: str = "1"
    policy: VersionPolicy = LATEST_ONE  # the repository folder's version policy

    @property
    def name(self) -> str:
        return self.config.name


class ModelRepository:
    """The served models by name. Contract: ``load_all`` once, on the event loop; ``close``,
    ``drain`` and ``stop`` in that order when shutting down."""

    def __init__(
        self,
        models: Sequence[ModelConfig],
        devices: Mapping[str, torch.device],
        telemetry: Telemetry,
        servables: ServableFactory,
        server_device: str = "auto",
    ) -> None:
        # name -> version -> model: what requests are routed to (``swap`` replaces a name's entry).
        self._models = {config.name: {"1": ServedModel(config, devices[config.name])} for config in models}
        self._telemetry = telemetry
        self._servables = servables
        self._server_device = server_device
        self._stopping = False
        self._retiring: set[asyncio.Task[None]] = set()
        # Loads run in worker threads, several at once (model control). Making a servable draws
        # from torch's global RNG under a fixed seed, and an executor sets torch's process-wide
        # thread count for a moment: one thread at a time does those; the heavy part of a load
        # (moving weights, prepacking, the warm-up run) runs concurrently.
        self._construct = threading.Lock()

    def names(self) -> list[str]:
        return list(self._models)

    def models(self) -> list[ServedModel]:
        return [model for versions in self._models.values() for model in versions.values()]

    def versions(self, name: str) -> list[str]:
        """The versions of ``name`` routed to now, oldest first."""
        return sorted(self._models.get(name, {}), key=_version_order)

    def get(self, name: str, version: str = "") -> ServedModel:
        """The model serving ``name`` at ``version``; "" is the newest ready version."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(n for n, v in self._models.items() if v) or "none"
            raise NotFound(f"model '{name}' is not served here; models: {known}")
        if version == "":
            ready = [v for v, m in versions.items() if m.ready] or list(versions)
            return versions[max(ready, key=_version_order)]
        model = versions.get(version)
        if model is None:
            raise NotFound(f"model '{name}' has no version '{version}'; versions: {', '.join(self.versions(name))}")
        return model

    @property
    def all_ready(self) -> bool:
        return all(m.ready for m in self.models())

    async def build(self, config: ModelConfig, version: str, policy: VersionPolicy = LATEST_ONE) -> ServedModel:
        """A new, started instance of ``config`` that nothing routes to yet (``swap`` does);
        loads in a worker thread, so the event loop keeps serving. Raises what the load raised."""
        device = resolve_device(config.device, self._server_device)
        model = ServedModel(config, device, version=version, policy=policy)
        self._telemetry.add_model(config.name, device, config.batching.max_queue_size, version)
        start = time.perf_counter()
        loading = partial(self._build, model)
        servable, description, executor = await in_own_thread(loading, f"lrnserve-load-{model.name}")
        model.load_seconds = time.perf_counter() - start
        model.servable, model.executor = servable, executor
        model.batcher = Batcher(model.name, executor, config.batching, self._telemetry.model(model.name, version))
        model.batcher.start()
        model.ready = True
        logger.info(
            "model %s version %s (%s): device=%s instances=%d loaded in %.2fs; %s",
            model.name, version, config.kind, device, executor.instances, model.load_seconds, description,
        )  # fmt: skip
        self._telemetry.model_loaded(model.name, model.load_seconds)
        return model

    def _build(self, model: ServedModel) -> tuple[Servable, str, Executor]:
        servable, description = self._load(model)
        with self._construct:
            executor = Executor(servable, model.device, model.config.instances, model.config.threads)
        return servable, description, executor

    def swap(self, name: str, versions: Mapping[str, ServedModel]) -> list[ServedModel]:
        """Route ``name`` to exactly ``versions`` (empty: the model is gone) at once; returns
        the instances no longer routed to, for ``retire``. Requests already queued on them stay."""
        old = self._models.get(name, {})
        if versions:
            self._models[name] = dict(versions)
        else:
            self._models.pop(name, None)
        kept = {id(m) for m in versions.values()}
        retired = [m for m in old.values() if id(m) not in kept]
        for model in retired:
            model.ready = False
            if model.batcher is not None:
                model.batcher.close()  # nothing new reaches it; what is queued still runs
        return retired

    async def retire(self, models: Sequence[ServedModel], timeout: float) -> bool:
        """Let ``models``' queued and running requests finish (within ``timeout``), then stop
        them and drop every reference to their servables; False when time ran out first."""
        deadline = time.monotonic() + timeout
        drained = True
        for model in models:
            if model.batcher is not None:
                try:
                    await asyncio.wait_for(model.batcher.wait_idle(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    drained = False
                await model.batcher.stop(max(0.0, deadline - time.monotonic()))
            if model.executor is not None:
                # Idle: its threads end at once; joined off the loop, so that their references to
                # the servable are gone when this returns. Not idle: leave them to finish.
                idle = model.batcher is None or model.batcher.queue_depth == 0
                await asyncio.to_thread(model.executor.close, idle and drained)
            model.servable = model.executor = model.batcher = None
        return drained

    async def load_all(self) -> None:
        """Load models one after another (each may use every core), starting each batcher."""
        for model in self.models():
            if self._stopping:
                return
            start = time.perf_counter()
            try:
                servable, description = await in_own_thread(partial(self._load, model), f"lrnserve-load-{model.name}")
            except Exception as exc:
                logger.error("model %s: failed to load: %s", model.name, exc)
                raise
            model.load_seconds = time.perf_counter() - start
            if self._stopping:  # stop() ran while this model loaded: do not start it
                return
            executor = Executor(servable, model.device, model.config.instances, model.config.threads)
            model.servable = servable
            model.executor = executor
            telemetry = self._telemetry.model(model.name, model.version)
            model.batcher = Batcher(model.name, executor, model.config.batching, telemetry)
            model.batcher.start()
            model.ready = True
            b = model.config.batching
            logger.info(
                "model %s (%s): device=%s dtype=%s instances=%d%s max_batch_size=%d max_queue_delay_us=%d "
                "loaded in %.2fs; %s",
                model.name,
                model.config.kind,
                model.device,
                model.config.dtype if model.config.kind != "lrn" else "input's",
                executor.instances,
                f" threads={executor.threads}" if model.device.type == "cpu" else "",
                b.max_batch_size,
                b.max_queue_delay_us,
                model.load_seconds,
                description,
            )
            self._telemetry.model_loaded(model.name, model.load_seconds)

    def _load(self, model: ServedModel) -> tuple[Servable, str]:
        with self._construct:
            servable = self._servables(model.config)
        return servable, servable.load(model.device)

    def close(self) -> None:
        """Refuse new requests on every model (queued ones still run); stop loading more."""
        self._stopping = True
        for model in self.models():
            model.ready = False
            if model.batcher is not None:
                model.batcher.close()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued and running request finished; False on timeout."""
        waits = [m.batcher.wait_idle() for m in self.models() if m.batcher is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout=timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every batcher, waiting at most ``timeout`` in all for batches still running;
        worker threads still computing are left to finish on their own."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stopping = True
        for model in self.models():
            if model.batcher is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await model.batcher.stop(remaining)
            if model.executor is not None:
                model.executor.close(wait=False)


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
