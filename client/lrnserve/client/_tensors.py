"""Turning arrays and parameters into a ModelInferRequest and the answer back into an array.

numpy arrays and torch tensors go in; torch is imported only when a tensor is
given. float32, float16 and float64 come back as numpy arrays of the same dtype;
bfloat16 (torch tensors only: numpy has none) comes back as a torch tensor. A
3-D input is one sample: it is sent as N=1 and the batch dimension is dropped
from the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._types import Classification
from .datatypes import from_numpy, from_torch_name, from_wire, wire_names
from .pb import grpc_predict_v2_pb2 as pb

Parameter = bool | int | float | str


def _is_torch_tensor(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "dtype") and hasattr(x, "detach")


@dataclass(frozen=True)
class Decoder:
    """How to turn the response back into what the caller gave."""

    single: bool  # the input was one 3-D sample

    def decode(self, response: pb.ModelInferResponse) -> Any:
        if not response.outputs or not response.raw_output_contents:
            raise ValueError("the server's response holds no output tensor")
        output = response.outputs[0]
        raw = response.raw_output_contents[0]
        shape = tuple(output.shape)
        if output.datatype == "BF16":
            import torch

            result: Any = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(shape)
        else:
            datatype = from_wire(output.datatype)
            if datatype is None:
                raise ValueError(f"the server answered with datatype {output.datatype!r}; known: {wire_names()}")
            result = np.frombuffer(raw, dtype=datatype.numpy_storage).reshape(shape)
        return result[0] if self.single else result


def _tensor_bytes(x: Any) -> tuple[str, tuple[int, ...], bytes]:
    if isinstance(x, np.ndarray):
        datatype = from_numpy(x.dtype)
        if datatype is None or datatype.numpy is None:
            raise TypeError(f"x: numpy dtype {x.dtype} is not supported; use float32, float16 or float64")
        array = np.ascontiguousarray(x, dtype=datatype.numpy)
        return datatype.wire, array.shape, array.tobytes()
    if _is_torch_tensor(x):
        import torch

        datatype = from_torch_name(str(x.dtype))
        if datatype is None:
            raise TypeError(f"x: torch dtype {x.dtype} is not supported; use float32, float16, float64 or bfloat16")
        tensor = x.detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return datatype.wire, tuple(tensor.shape), raw
    raise TypeError(f"x must be a numpy array or a torch tensor, got {type(x).__name__}")


def set_parameter(target: pb.InferParameter, name: str, value: object) -> None:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(f"parameter {name}: expected bool, int, float or str, got {type(value).__name__}")


def encode(
    model: str, x: Any, parameters: Mapping[str, object], input_name: str = "input"
) -> tuple[pb.ModelInferRequest, Decoder]:
    wire, shape, raw = _tensor_bytes(x)
    single = len(shape) == 3
    if single:
        shape = (1, *shape)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype=wire, shape=shape)
    request.raw_input_contents.append(raw)
    for name, value in parameters.items():
        if value is not None:
            set_parameter(request.parameters[name], name, value)
    return request, Decoder(single)


def encode_classify(
    model: str, x: Any, top: int, input_name: str, output_name: str
) -> tuple[pb.ModelInferRequest, ClassDecoder]:
    """A request for ``output_name``'s ``top`` classes of each image (the classification extension)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    request, decoder = encode(model, x, {}, input_name)
    output = request.outputs.add(name=output_name)
    output.parameters["classification"].int64_param = top
    return request, ClassDecoder(decoder.single)


@dataclass(frozen=True)
class ClassDecoder:
    """The BYTES answer [N, k] of ``"score:index[:label]"`` as each image's ``Classification`` list."""

    single: bool

    def decode(self, response: pb.ModelInferResponse) -> Any:
        if not response.outputs or not response.raw_output_contents:
            raise ValueError("the server's response holds no output tensor")
        output = response.outputs[0]
        if output.datatype != "BYTES" or len(output.shape) != 2:
            raise ValueError(f"expected a BYTES [N, k] classification, got {output.datatype} {list(output.shape)}")
        n, k = output.shape
        elements = bytes_elements(response.raw_output_contents[0])
        if len(elements) != n * k:
            raise ValueError(f"the classification holds {len(elements)} elements, its shape [{n}, {k}] needs {n * k}")
        rows = [[_classification(e) for e in elements[i * k : (i + 1) * k]] for i in range(n)]
        return rows[0] if self.single else rows


def bytes_elements(raw: bytes) -> list[bytes]:
    """A BYTES tensor's elements: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError("a BYTES tensor ends inside an element's length")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(raw):
            raise ValueError("a BYTES tensor ends inside an element")
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def _classification(element: bytes) -> Classification:
    score, index, *label = element.decode("utf-8").split(":", 2)
    return Classification(label[0] if label else None, int(index), float(score))


def lrn_parameters(
    mode: str, size: int | None, alpha: float | None, beta: float | None, k: float | None
) -> dict[str, Parameter | None]:
    return {"mode": mode, "size": size, "alpha": alpha, "beta": beta, "k": k}
