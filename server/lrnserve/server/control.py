"""Model control: loading, reloading and unloading models while the server serves.

Triton's modes: ``none`` loads every folder of the repository at start; ``explicit`` loads only
``load_model`` names and what RepositoryModelLoad asks for; ``poll`` also rescans the folder
every ``repository_poll_secs`` and loads new, reloads changed and unloads removed models.
RepositoryModelLoad/Unload are refused (UNAVAILABLE, as Triton) except in ``explicit`` mode.
At start the folders load concurrently (``START_LOADS`` at once), so one slow model does not
keep the others from serving. Without a repository the configured models (``[models]`` or the
embedded default) are the ones that can be reloaded or unloaded.

Every change is atomic for callers: the new instances are built first (in a worker thread; the
event loop keeps serving), then ``ModelRepository.swap`` routes to them at once; requests
queued on the old ones finish there (``retire``, within ``grace_seconds``), then the old ones
are stopped and their memory given back. A load that fails leaves what served before serving
and is reported with its reason (the index, the log, health, ``lrnserve_model_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrnserve.client.allocator import release_freed_memory

from .catalog import Plan, model_folders, read_model, write_files
from .errors import InvalidArgument, NotFound, ServingError, Unavailable
from .models.ir import ModelLoadError
from .repository import ModelRepository, ServedModel
from .schema import ConfigError
from .settings import ServerSettings, model_from_table
from .telemetry import Telemetry

logger = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
HealthSetter = Callable[[str, bool], Awaitable[None]]
# Models loaded at once at start: each load is mostly one worker thread, so about a core each;
# at least two, so that one slow load (a big file, a device copy) never holds back all the rest.
START_LOADS = max(2, min(4, os.cpu_count() or 1))
MIB = 1 << 20


@dataclass(frozen=True)
class ModelState:
    """One entry of the repository index (Triton's ModelIndex)."""

    name: str
    version: str
    state: str
    reason: str = ""


class LoadFailed(ServingError):
    """A model that could not be loaded: its reason, for the operator who asked."""


class ModelControl:
    """Contract: on the event loop thread; ``start`` once after the configured models loaded,
    ``stop`` before the repository drains. One change per model at a time (a lock per name)."""

    def __init__(
        self,
        repository: ModelRepository,
        telemetry: Telemetry,
        settings: ServerSettings,
        on_health: HealthSetter | None = None,
    ) -> None:
        self.repository = repository
        self.root = settings.model_repository
        self.mode = settings.model_control_mode
        self._settings = settings
        self._telemetry = telemetry
        self._on_health = on_health
        self._static = {} if self.root is not None else {m.name: m for m in settings.models}
        self._states: dict[str, dict[str, ModelState]] = {}
        self._loaded: dict[str, Plan] = {}  # the plan each served model was built from
        self._tried: dict[str, Mapping[str, str]] = {}  # poll: fingerprints last attempted
        self._temporary: dict[str, Path] = {}  # folders written from load files
        self._overrides: dict[str, Mapping[str, Any]] = {}  # their config
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- start and stop ----

    async def start(self) -> None:
        """Record the configured models' states, then load the repository's as the mode says.
        Raises ``ConfigError`` only in mode none with ``strict_model_config``."""
        for name in self._static:
            for version in self.repository.versions(name):
                self._set(name, version, READY)
        if self.root is None:
            return
        folders = await asyncio.to_thread(model_folders, self.root)
        names = list(folders) if self.mode != "explicit" else list(self._settings.load_model)
        failures = await self._load_at_start(names)
        if failures and self.mode == "none" and self._settings.strict_model_config:
            raise ConfigError(f"strict_model_config: {'; '.join(failures)}")
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll())

    async def _load_at_start(self, names: list[str]) -> list[str]:
        """Load ``names`` concurrently, ``START_LOADS`` at a time; each failure is reported
        (index, log, health) and returned, in ``names`` order."""
        limit = asyncio.Semaphore(START_LOADS)

        async def load_one(name: str) -> str | None:
            async with limit:
                try:
                    await self.load(name, force=False)
                except ServingError as exc:
                    if isinstance(exc, NotFound):  # --load-model naming no folder
                        logger.error("model %s: %s", name, exc.message)
                        self._failed(name, exc.message)
                    return exc.message
            return None

        results = await asyncio.gather(*(load_one(name) for name in names))
        return [reason for reason in results if reason is not None]

    async def stop(self) -> None:
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        for folder in self._temporary.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary.clear()

    # ---- the index ----

    def index(self, ready_only: bool = False) -> list[ModelState]:
        """Every model known (the repository's folders, the configured, and any loaded), each
        version's state; a model never loaded has one entry with no version and no state."""
        names = set(self._static) | set(self._states) | set(self.repository.names())
        if self.root is not None and self.root.is_dir():
            names |= {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        entries = []
        for name in sorted(names):
            states = sorted(self._states.get(name, {}).values(), key=lambda s: (len(s.version), s.version))
            entries += states or [ModelState(name, "", "")]
        return [e for e in entries if e.state == READY] if ready_only else entries

    # ---- load and unload ----

    def check_explicit(self) -> None:
        """RepositoryModelLoad/Unload are the operator's only in explicit mode (as Triton): in
        none the repository is what start-up loaded, in poll the folder decides."""
        if self.mode == "explicit":
            return
        why = " (polling is enabled)" if self.mode == "poll" else ""
        raise Unavailable(
            f"explicit model load / unload is not allowed in model control mode '{self.mode}'{why}; "
            "start the server with --model-control-mode explicit to load and unload models"
        )

    async def load(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        force: bool = True,
    ) -> None:
        """Load ``name`` (reload when served: ``force`` rebuilds even unchanged versions).
        ``config`` replaces its config.toml; ``files`` (``<version>/<name>`` -> bytes) make a
        temporary model folder. Raises ``NotFound`` or ``LoadFailed`` with the reason."""
        async with self._lock(name):
            try:
                plan = await self._plan(name, config, files)
            except ConfigError as exc:
                logger.error("model %s: failed to load: %s", name, exc)
                self._failed(name, str(exc))
                await self._health(name)
                raise LoadFailed(f"failed to load model '{name}': {exc}", InvalidArgument.code) from None
            await self._apply(plan, force)

    async def unload(self, name: str) -> None:
        """Stop routing to ``name``, let its queued requests finish (within the grace), free it."""
        async with self._lock(name):
            if name not in self.repository.names():
                if name in self._states or name in self._static or self._on_disk(name):
                    return  # not loaded: nothing to do (as Triton)
                raise NotFound(f"model '{name}' is not in the repository")
            before = _rss_bytes()
            for version in self.repository.versions(name):
                self._set(name, version, UNLOADING)
            retired = self.repository.swap(name, {})
            await self._health(name)
            await self._retire(name, retired)
            self._loaded.pop(name, None)
            folder = self._temporary.pop(name, None)
            self._overrides.pop(name, None)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            logger.info("model %s unloaded; RSS %s -> %s", name, _mib(before), _mib(_rss_bytes()))

    async def _plan(self, name: str, config: Mapping[str, Any] | None, files: Mapping[str, bytes] | None) -> Plan:
        if files:
            if config is None:
                raise ConfigError("file: parameters need a config parameter too (as Triton's)")
            folder = await asyncio.to_thread(write_files, name, files)
            old = self._temporary.pop(name, None)
            self._temporary[name] = folder
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._overrides[name] = config
            return await asyncio.to_thread(read_model, name, folder, config)
        if name in self._temporary:
            override = config if config is not None else self._overrides.get(name)
            return await asyncio.to_thread(read_model, name, self._temporary[name], override)
        if self.root is not None and self._on_disk(name):
            return await asyncio.to_thread(read_model, name, self.root / name, config)
        if name in self._static:
            static = self._static[name]
            if config is None:
                return Plan(name, {"1": static}, {"1": "configured"})
            # The JSON replaces the configured table (relative paths: the working folder's).
            replaced = model_from_table(name, {"kind": static.kind, **config}, Path.cwd())
            return Plan(name, {"1": replaced}, {"1": repr(sorted(config.items()))})
        known = ", ".join(e.name for e in self.index()) or "none"
        raise NotFound(f"model '{name}' is not in the repository; models: {known}")

    async def _apply(self, plan: Plan, force: bool) -> None:
        """Build what is new or changed, then swap routing at once; on any failure nothing changes."""
        name = plan.name
        self._tried[name] = plan.fingerprints
        current = {v: self.repository.get(name, v) for v in self.repository.versions(name)}
        previous = self._loaded.get(name)
        routing: dict[str, ServedModel] = {}
        built: list[ServedModel] = []
        for version, config in plan.configs.items():
            same = previous is not None and previous.fingerprints.get(version) == plan.fingerprints[version]
            if version in current and same and not force:
                routing[version] = current[version]
                continue
            if version not in current:
                self._set(name, version, LOADING)
            try:
                model = await self.repository.build(config, version, plan.policy)
            except Exception as exc:  # any load failure is reported, never fatal
                reason = str(exc) if isinstance(exc, (ConfigError, ModelLoadError, OSError)) else repr(exc)
                logger.error("model %s version %s: failed to load: %s", name, version, reason)
                await self._retire(name, built, quiet=True)
                self._failed(name, f"version {version}: {reason}", version)
                await self._health(name)
                code = InvalidArgument.code if isinstance(exc, (ConfigError, ModelLoadError)) else None
                raise LoadFailed(f"failed to load model '{name}' version {version}: {reason}", code) from None
            built.append(model)
            routing[version] = model
        if self._stopping:
            await self._retire(name, built, quiet=True)
            return
        retired = self.repository.swap(name, routing)
        self._loaded[name] = plan
        for version in routing:
            self._set(name, version, READY)
        for model in retired:
            if model.version not in routing:
                self._set(name, model.version, UNLOADING)
        await self._health(name)
        await self._retire(name, retired)
        logger.info("model %s: serving versions %s", name, ", ".join(routing))

    async def _retire(self, name: str, models: list[ServedModel], quiet: bool = False) -> None:
        if not models:
            return
        routed = set(self.repository.versions(name))
        drained = await self.repository.retire(models, self._settings.grace_seconds)
        if not drained:
            logger.warning("model %s: the old instance still had requests after the grace period", name)
        if not quiet:
            for model in models:
                if model.version not in routed:
                    self._set(name, model.version, UNAVAILABLE, "unloaded")
        models.clear()
        # The instances' last references are gone: give their memory back now, not at the next idle trim.
        await asyncio.to_thread(_free_memory)

    # ---- poll mode ----

    async def _poll(self) -> None:
        interval = self._settings.repository_poll_secs
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except Exception:  # a scan that failed is retried at the next interval
                logger.exception("repository poll failed")
            else:
                self._telemetry.repository_polled()

    async def poll_once(self) -> None:
        """One scan: load new folders, reload changed ones, unload removed ones."""
        assert self.root is not None
        folders = await asyncio.to_thread(model_folders, self.root)
        for name in folders:
            async with self._lock(name):
                try:
                    plan = await asyncio.to_thread(read_model, name, folders[name])
                except ConfigError as exc:
                    if self._tried.get(name) != {"error": str(exc)}:
                        self._tried[name] = {"error": str(exc)}
                        logger.error("model %s: %s", name, exc)
                        self._failed(name, str(exc))
                        await self._health(name)
                    continue
                if self._tried.get(name) == plan.fingerprints:
                    continue
                with contextlib.suppress(ServingError):  # reported by _apply
                    await self._apply(plan, force=False)
        gone = [n for n in self.repository.names() if n not in folders and n not in self._temporary]
        for name in gone:
            await self.unload(name)
            self._states.pop(name, None)
            self._tried.pop(name, None)

    # ---- state ----

    def _on_disk(self, name: str) -> bool:
        return self.root is not None and (self.root / name).is_dir()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _set(self, name: str, version: str, state: str, reason: str = "", failed: bool = False) -> None:
        states = self._states.setdefault(name, {})
        states.pop("", None)
        states[version] = ModelState(name, version, state, reason)
        self._telemetry.model_state(name, version, state, failed)

    def _failed(self, name: str, reason: str, version: str | None = None) -> None:
        """A load failed: versions still served stay READY with the reason; others UNAVAILABLE."""
        served = set(self.repository.versions(name))
        states = self._states.setdefault(name, {})
        if served:
            for v in list(states):
                if v not in served:  # a version that was being added
                    states[v] = ModelState(name, v, UNAVAILABLE, reason)
            for v in served:
                states[v] = ModelState(name, v, READY, f"reload failed, previous version serving: {reason}")
            self._telemetry.model_state(name, version or next(iter(served)), READY, failed=True)
            return
        states.clear()
        self._set(name, version or "", UNAVAILABLE, reason, failed=True)
        if version:
            states.pop("", None)

    async def _health(self, name: str) -> None:
        if self._on_health is not None:
            serving = any(self.repository.get(name, v).ready for v in self.repository.versions(name))
            await self._on_health(name, serving)


def _free_memory() -> None:
    gc.collect()
    release_freed_memory()


def _rss_bytes() -> int | None:
    """This process's resident memory (VmRSS), None where /proc is not Linux's."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _mib(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / MIB:.0f} MiB"
