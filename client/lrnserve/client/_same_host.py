"""The blocking client's same-host mode: tensors through system shared memory, not the message.

A client on the server's machine (``Client(..., same_host=True)``, the server started with
``--allow-shared-memory``) keeps two POSIX shared memory regions, one for its requests' inputs
and one for the answers, registered with the server under names unique to the client. They are
made on first use, grown (made anew and registered again) when a tensor does not fit, and
unregistered and removed when the client closes. An input is copied once into its region (the
server reads it in place); the answer is copied once out of its region. Calls in this mode are
made one at a time per client (the regions are the client's); use one client per thread.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

from ._base import Operation
from ._tensors import Decoder
from ._types import ModelMetadata
from .datatypes import from_wire
from .pb import grpc_predict_v2_pb2 as pb
from .protocol import method

MIN_REGION_BYTES = 64 * 1024


def _rounded(nbytes: int) -> int:
    return max(MIN_REGION_BYTES, 1 << max(0, nbytes - 1).bit_length())


def register_op(segment: shared_memory.SharedMemory) -> Operation[None]:
    request = pb.SystemSharedMemoryRegisterRequest(name=segment.name, key=f"/{segment.name}", byte_size=segment.size)
    return Operation(method("SystemSharedMemoryRegister"), request, pb.SystemSharedMemoryRegisterResponse, _none)


def unregister_op(name: str) -> Operation[None]:
    request = pb.SystemSharedMemoryUnregisterRequest(name=name)
    return Operation(method("SystemSharedMemoryUnregister"), request, pb.SystemSharedMemoryUnregisterResponse, _none)


def _buffer(segment: shared_memory.SharedMemory) -> memoryview:
    buffer = segment.buf
    assert buffer is not None  # None only once closed
    return buffer


def _none(response: Any) -> None:
    return None


def answer_bytes(metadata: ModelMetadata, input_shape: tuple[int, ...], input_datatype: str) -> int:
    """The most bytes the answer to an input of ``input_shape`` can take: the output's declared
    dims (the batch, and any variable dim, as the input's) in the larger of the two datatypes."""
    output = metadata.outputs[0]
    dims = [
        input_shape[i] if (i == 0 or d < 0) and i < len(input_shape) else max(d, 1) for i, d in enumerate(output.shape)
    ]
    itemsizes = [t.itemsize for t in (from_wire(output.datatype), from_wire(input_datatype)) if t is not None]
    return math.prod(dims) * max(itemsizes, default=8)


@dataclass(frozen=True)
class SharedDecoder:
    """The answer from the output region (its metadata from the response)."""

    segment: shared_memory.SharedMemory
    decoder: Decoder

    def decode(self, response: pb.ModelInferResponse) -> Any:
        if not response.outputs:
            raise ValueError("the server's response holds no output tensor")
        output = response.outputs[0]
        datatype = from_wire(output.datatype)
        if datatype is None:
            raise ValueError(f"the server answered with datatype {output.datatype!r}")
        nbytes = math.prod(output.shape) * datatype.itemsize
        response.raw_output_contents.append(bytes(_buffer(self.segment)[:nbytes]))  # the region is reused
        return self.decoder.decode(response)


class SameHost:
    """The two regions of one client. Each region made gets a name of its own (a generation
    number), so a server that still holds an old one (an unregistration that never arrived, an
    answer still on its way) can never write into a newer one."""

    def __init__(self) -> None:
        self.prefix = f"lrnserve_{os.getpid()}_{secrets.token_hex(4)}"
        self._segments: dict[str, shared_memory.SharedMemory] = {}  # only those the server accepted
        self._made = 0

    @staticmethod
    def region(segment: shared_memory.SharedMemory) -> str:
        """A segment's region name: its own name (unique to this client and generation)."""
        return segment.name

    def fits(self, role: str, nbytes: int) -> bool:
        segment = self._segments.get(role)
        return segment is not None and segment.size >= nbytes

    def make(self, role: str, nbytes: int) -> shared_memory.SharedMemory:
        """A new segment for ``role``, to register before ``adopt``."""
        self._made += 1
        return shared_memory.SharedMemory(name=f"{self.prefix}_{role}{self._made}", create=True, size=_rounded(nbytes))

    def adopt(self, role: str, segment: shared_memory.SharedMemory) -> list[str]:
        """``segment`` (registered) becomes ``role``'s region; returns the region it replaces, to unregister."""
        replaced = self._segments.get(role)
        self._segments[role] = segment
        if replaced is None:
            return []
        name = self.region(replaced)
        discard(replaced)
        return [name]

    def place(
        self, bare: pb.ModelInferRequest, raw: bytes, decoder: Decoder, output_name: str
    ) -> tuple[pb.ModelInferRequest, SharedDecoder]:
        """A copy of ``bare`` (a request without its tensor bytes) whose input, ``raw``, is in the
        input region and whose answer is asked into the output region (both must fit)."""
        request = pb.ModelInferRequest()
        request.CopyFrom(bare)
        source, answer = self._segments["input"], self._segments["output"]
        _buffer(source)[: len(raw)] = raw
        tensor = request.inputs[0]
        tensor.parameters["shared_memory_region"].string_param = self.region(source)
        tensor.parameters["shared_memory_byte_size"].int64_param = len(raw)
        output = request.outputs.add(name=output_name)
        output.parameters["shared_memory_region"].string_param = self.region(answer)
        output.parameters["shared_memory_byte_size"].int64_param = answer.size
        return request, SharedDecoder(answer, decoder)

    def forget(self) -> list[str]:
        """Drop every region (they are removed here); returns their names, to unregister."""
        names = [self.region(segment) for segment in self._segments.values()]
        for segment in self._segments.values():
            discard(segment)
        self._segments.clear()
        return names


def discard(segment: shared_memory.SharedMemory) -> None:
    """Unmap and remove a segment (a server that still maps it keeps its pages until it lets go)."""
    segment.close()
    segment.unlink()
