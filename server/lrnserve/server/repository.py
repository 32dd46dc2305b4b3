"""The model repository: loads every configured model and owns its batcher.

Models load in worker threads after the server is already answering (live but
not ready), so orchestrators can tell "starting" from "dead". Each load logs one
line: device, dtype, where the weights came from, and how long it took.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .batching import Batcher, BatchListener
from .errors import NotFound
from .executor import Executor
from .servables import Servable, create_servable
from .settings import ConfigError, ModelConfig, ServerSettings

logger = logging.getLogger(__name__)


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
    config: ModelConfig
    device: torch.device
    servable: Servable | None = None
    batcher: Batcher | None = None
    ready: bool = False
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name


class ModelRepository:
    def __init__(
        self,
        settings: ServerSettings,
        on_batch: Callable[[str], BatchListener | None] | None = None,
        on_loaded: Callable[[ServedModel], None] | None = None,
    ) -> None:
        self._models = {
            config.name: ServedModel(config, resolve_device(config.device, settings.device))
            for config in settings.models
        }
        self._on_batch = on_batch
        self._on_loaded = on_loaded
        self._stopping = False

    def names(self) -> list[str]:
        return list(self._models)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, name: str, version: str = "") -> ServedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(self._models) or "none"
            raise NotFound(f"model '{name}' is not served here; models: {known}")
        if version not in ("", "1"):
            raise NotFound(f"model '{name}' has no version '{version}'; versions: 1")
        return model

    @property
    def all_ready(self) -> bool:
        return all(m.ready for m in self._models.values())

    async def load_all(self) -> None:
        """Load models one after another (each may use every core), starting each batcher."""
        loop = asyncio.get_running_loop()
        for model in self._models.values():
            if self._stopping:
                return
            start = time.perf_counter()
            try:
                servable, description = await loop.run_in_executor(None, self._load, model)
            except Exception as exc:
                logger.error("model %s: failed to load: %s", model.name, exc)
                raise
            model.load_seconds = time.perf_counter() - start
            if self._stopping:  # stop() ran while this model loaded: do not start it
                return
            executor = Executor(servable, model.device, model.config.instances, model.config.threads)
            listener = self._on_batch(model.name) if self._on_batch else None
            model.servable = servable
            model.batcher = Batcher(model.name, executor, model.config.batching, listener)
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
            if self._on_loaded is not None:
                self._on_loaded(model)

    @staticmethod
    def _load(model: ServedModel) -> tuple[Servable, str]:
        servable = create_servable(model.config)
        return servable, servable.load(model.device)

    def close(self) -> None:
        """Refuse new requests on every model (queued ones still run); stop loading more."""
        self._stopping = True
        for model in self._models.values():
            model.ready = False
            if model.batcher is not None:
                model.batcher.close()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued and running request finished; False on timeout."""
        waits = [m.batcher.wait_idle() for m in self._models.values() if m.batcher is not None]
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
        for model in self._models.values():
            if model.batcher is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await model.batcher.stop(remaining)
                model.batcher.executor.close(wait=False)
