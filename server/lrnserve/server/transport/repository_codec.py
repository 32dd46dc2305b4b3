"""Protobuf <-> domain objects for Triton's model repository extension (RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload).

KServe's proto numbers the load/unload request's ``model_name`` 1, which is Triton's
``repository_name``: a request with an empty ``model_name`` whose ``repository_name`` is not the
name of this server's repository (its folder's name) is read as KServe's, field 1 being the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb

from ..control import ModelState
from ..errors import InvalidArgument

FILE_PREFIX = "file:"


@dataclass(frozen=True)
class LoadRequest:
    model: str
    config: str | None  # JSON
    files: dict[str, bytes]  # "<version>/<name>" -> contents


def model_name(
    message: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest, repository: Path | None
) -> str:
    """The model a load/unload request names, under Triton's numbering or KServe's."""
    if message.model_name:
        return message.model_name
    own = repository.name if repository is not None else ""
    if message.repository_name and message.repository_name != own:
        return message.repository_name  # KServe: model_name = 1
    return ""


def load_from_proto(message: pb.RepositoryModelLoadRequest, repository: Path | None) -> LoadRequest:
    config: str | None = None
    files: dict[str, bytes] = {}
    for key, param in message.parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if key == "config":
            if kind != "string_param":
                raise InvalidArgument("parameters.config: expected a string (JSON)")
            config = param.string_param
        elif key.startswith(FILE_PREFIX):
            if kind != "bytes_param":
                raise InvalidArgument(f"parameters.{key}: expected bytes (the file's contents)")
            files[key.removeprefix(FILE_PREFIX)] = param.bytes_param
        else:
            raise InvalidArgument(f"parameters.{key}: unknown load parameter; expected config or file:<version>/<name>")
    return LoadRequest(model_name(message, repository), config, files)


def index_to_proto(states: Sequence[ModelState]) -> pb.RepositoryIndexResponse:
    index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[index(name=s.name, version=s.version, state=s.state, reason=s.reason) for s in states]
    )
