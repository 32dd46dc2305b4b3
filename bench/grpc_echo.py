"""The transport's limit: a grpc.aio server (on uvloop, as lrnserve) that answers every
ModelInfer with a canned response as large as the request, without reading it.

bench/serve.py runs it beside lrnserve for the lrn cases: no Python server speaking this
protocol over grpc.aio can answer faster on the same machine with the same load generator.

    python bench/grpc_echo.py      # prints the port it listens on (127.0.0.1), serves until SIGTERM
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc
import uvloop

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.protocol import DEFAULT_MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES

SERVICE = "inference.GRPCInferenceService"


def canned_response(request_bytes: int) -> bytes:
    """A well-formed ModelInferResponse whose FP32 output is about as large as the request."""
    elements = max(1, (request_bytes - 64) // 4)
    response = pb.ModelInferResponse(model_name="lrn", model_version="1")
    response.outputs.add(name="output", datatype="FP32", shape=[elements])
    response.raw_output_contents.append(bytes(4 * elements))
    return response.SerializeToString()


async def serve() -> None:
    responses: dict[int, bytes] = {}

    async def infer(request: bytes, context: Any) -> bytes:
        size = len(request)
        if size not in responses:
            responses[size] = canned_response(size)
        return responses[size]

    async def ready(request: bytes, context: Any) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerReady": grpc.unary_unary_rpc_method_handler(ready),
    }
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    uvloop.run(serve())
    sys.exit(0)
