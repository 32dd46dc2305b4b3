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
(the request holds a view of the mapping, taken when the request was validated); later requests
naming it are refused. Regions are for callers on the server's host (the transport refuses the
others), and only files of the server's own user are mapped. A client that shrinks its file
while a request uses it can still crash the server (a read or write past the end of a mapping is
SIGBUS), as with Triton: each use checks the size first, which leaves only that request's window.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
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
    """A registered region: ``view`` is its window [offset, offset + byte_size) of the mapping;
    ``fd`` stays open while it is registered, so that each use can check the file still holds
    the window (a client that shrank it would make a read or write past its end kill the server)."""

    name: str
    key: str
    offset: int
    byte_size: int
    view: memoryview
    fd: int

    def still_fits(self) -> bool:
        try:
            return os.fstat(self.fd).st_size >= self.offset + self.byte_size
        except OSError:
            return False


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
            mapping = self._map(fd, name, key, offset, byte_size)
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(mapping)[offset : offset + byte_size]
        self._regions[name] = Region(name, key, offset, byte_size, view, fd)

    @staticmethod
    def _map(fd: int, name: str, key: str, offset: int, byte_size: int) -> mmap.mmap:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"key: shared memory '{key}' is not a regular file")
        if info.st_uid != os.geteuid():
            raise InvalidArgument(f"key: shared memory '{key}' belongs to another user than the server's")
        if offset + byte_size > info.st_size or byte_size == 0:
            raise InvalidArgument(
                f"byte_size: region '{name}' of {byte_size} bytes at offset {offset} does not fit "
                f"shared memory '{key}' of {info.st_size} bytes"
            )
        try:
            return mmap.mmap(fd, offset + byte_size)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"key: cannot map shared memory '{key}' ({exc})") from None

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
        names = [name] if name else list(self._regions)
        for gone in names:
            region = self._regions.pop(gone, None)
            if region is not None:
                os.close(region.fd)  # the mapping itself lives on in the views requests still hold

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
        if not region.still_fits():
            raise InvalidArgument(
                f"{field}.{REGION}: shared memory '{region.key}' no longer holds region '{where.region}' "
                "(it was shrunk); register it again"
            )
        return region.view[where.offset : where.offset + where.byte_size]
