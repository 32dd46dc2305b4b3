"""What Client.infer_stream and AsyncClient.infer_stream share: a ModelStreamInfer session.

Each input becomes one request whose ``id`` is its position among the inputs; answers come back
as they finish, in any order, and are matched to their input by that id. A request that fails
does not end the stream: its ``StreamResult`` carries the error instead of an output. (The
protocol's streamed errors carry a message but no status code: they are ``LrnserveError`` with
code UNKNOWN.)
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ._errors import LrnserveError
from ._tensors import encode
from .pb import grpc_predict_v2_pb2 as pb
from .protocol import method

STREAM_METHOD = method("ModelStreamInfer")


@dataclass(frozen=True)
class StreamResult:
    """One answer of a stream: the input's position, and its output or why it failed."""

    index: int
    output: Any = None
    error: LrnserveError | None = None

    def result(self) -> Any:
        """The output; raises the request's error if it failed."""
        if self.error is not None:
            raise self.error
        return self.output


class StreamSession:
    """Encodes a stream's requests as they are sent and decodes its answers."""

    def __init__(self, model: str, parameters: dict[str, Any], input_name: str) -> None:
        self._model = model
        self._parameters = parameters
        self._input_name = input_name
        self._decoders: dict[str, Any] = {}

    def _request(self, index: int, x: Any) -> pb.ModelInferRequest:
        request, decoder = encode(self._model, x, self._parameters, self._input_name)
        request.id = str(index)
        self._decoders[request.id] = decoder  # before the request can be sent, so before its answer
        return request

    def requests(self, inputs: Iterable[Any]) -> Iterator[pb.ModelInferRequest]:
        for index, x in enumerate(inputs):
            yield self._request(index, x)

    async def async_requests(self, inputs: AsyncIterable[Any]) -> AsyncIterator[pb.ModelInferRequest]:
        index = 0
        async for x in inputs:
            yield self._request(index, x)
            index += 1

    def answer(self, response: pb.ModelStreamInferResponse) -> StreamResult:
        request_id = response.infer_response.id
        decoder = self._decoders.pop(request_id, None)
        index = int(request_id) if request_id.isdigit() else -1
        if response.error_message or decoder is None:
            why = response.error_message or f"an answer for no request sent (id {request_id!r})"
            return StreamResult(index, error=LrnserveError(why))
        return StreamResult(index, output=decoder.decode(response.infer_response))
