"""Triton's system shared memory extension: tensors a same-host client passes through POSIX shared
memory instead of the message.

A client creates a region with ``shm_open(key)`` (tritonclient's ``shared_memory`` helpers, or
the SDK) and registers it by name; a request's input then names a region, an offset and a byte
size instead of carrying bytes, and is read in place from the mapping; a requested output naming
a region is written straight into it, and the answer carries no bytes for it.

Only files directly under ``/dev/shm`` can be mapped (a key is one path component, symbolic
links are not followed), and only when the server allows it (``allow_shared_memory``). Every use
is checked: the region is registered, the window lies inside it, the byte size is the tensor's.
A region unregistered while a request reads or writes it stays mapped until that request is done
(the request holds a view of the mapping); later requests naming it are refused.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import InvalidArgument, NotFound, ServingError
from .inference import ParameterValue

ROOT = Path("/dev/shm")
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = (REGION, BYTE_SIZE, OFFSET)
_KEY = re.compile(r"/?([A-Za-z0-9_.\-]{1,255})")
FLAG = "--allow-shared-memory"


class AlreadyExists(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Region:
    """A registered region: ``view`` is its window [offset, offset + byte_size) of the mapping."""

    name: str
    key: str
    offset: int
    byte_size: int
    view: memoryview


@dataclass(frozen=True)
class Window:
    """Where a tensor lives: ``region``'s bytes [offset, offset + byte_size)."""

    region: str
    offset: int
    byte_size: int


def window(parameters: Mapping[str, ParameterValue | None], field: str) -> Window | None:
    """The shared memory a tensor's ``parameters`` name (None: none); ``field`` prefixes errors."""
    if REGION not in parameters:
        for key in (BYTE_SIZE, OFFSET):
            if key in parameters:
                raise InvalidArgument(f"{field}.{key}: given without {field}.{REGION}")
        return None
    region = parameters[REGION]
    if not isinstance(region, str) or not region:
        raise InvalidArgument(f"{field}.{REGION}: expected the name of a registered region, got {region!r}")
    sizes = []
    for key, required in ((BYTE_SIZE, True), (OFFSET, False)):
        value = parameters.get(key, None if required else 0)
        if value is None and required:
            raise InvalidArgument(f"{field}.{BYTE_SIZE}: required with {field}.{REGION}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{field}.{key}: expected an integer >= 0, got {value!r}")
        sizes.append(value)
    return Window(region, offset=sizes[1], byte_size=sizes[0])


class SharedMemory:
    """The registered regions. Contract: used on the event loop thread only."""

    def __init__(self, enabled: bool, root: Path = ROOT) -> None:
        self.enabled = enabled
        self.root = root
        self._regions: dict[str, Region] = {}

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise FailedPrecondition(f"system shared memory is not enabled on this server (start it with {FLAG})")

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise InvalidArgument("name: give the region a name")
        if name in self._regions:
            raise AlreadyExists(f"name: shared memory region '{name}' is already registered; unregister it first")
        match = _KEY.fullmatch(key)
        if match is None or match.group(1) in (".", ".."):
            raise InvalidArgument(f"key: '{key}' is not a shared memory key (one name under {self.root}, e.g. /input0)")
        path = self.root / match.group(1)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidArgument(f"key: cannot open shared memory '{key}' ({exc.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size or byte_size == 0:
                raise InvalidArgument(
                    f"byte_size: region '{name}' of {byte_size} bytes at offset {offset} does not fit "
                    f"shared memory '{key}' of {size} bytes"
                )
            mapping = mmap.mmap(fd, offset + byte_size)
        finally:
            os.close(fd)
        view = memoryview(mapping)[offset : offset + byte_size]
        self._regions[name] = Region(name, key, offset, byte_size, view)

    def status(self, name: str) -> list[Region]:
        """One region, or all when ``name`` is empty."""
        self._check_enabled()
        if not name:
            return list(self._regions.values())
        if name not in self._regions:
            raise NotFound(f"name: no shared memory region '{name}' is registered")
        return [self._regions[name]]

    def unregister(self, name: str) -> None:
        """One region, or all when ``name`` is empty; a region not registered is no error. Requests
        using it keep their view of the mapping until they are done."""
        self._check_enabled()
        if name:
            self._regions.pop(name, None)
        else:
            self._regions.clear()

    def slice(self, where: Window, field: str) -> memoryview:
        """The window's bytes, checked against its region (``field`` names the tensor's parameters)."""
        if not self.enabled:
            raise InvalidArgument(f"{field}.{REGION}: system shared memory is not enabled on this server ({FLAG})")
        region = self._regions.get(where.region)
        if region is None:
            raise InvalidArgument(f"{field}.{REGION}: no shared memory region '{where.region}' is registered")
        if where.offset + where.byte_size > region.byte_size:
            raise InvalidArgument(
                f"{field}.{BYTE_SIZE}: {where.byte_size} bytes at offset {where.offset} overrun region "
                f"'{where.region}' of {region.byte_size} bytes"
            )
        return region.view[where.offset : where.offset + where.byte_size]
