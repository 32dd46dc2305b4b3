"""Bearer-token authentication for every RPC except health checks.

Installed only when a token is configured. The token is compared in constant time and
never logged; a missing or wrong token is UNAUTHENTICATED before any handler runs.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc

logger = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes and load balancers carry no token


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_reject: Callable[[], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else str(value).encode()
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        if self._on_reject is not None:
            self._on_reject()
        logger.debug("rejected %s: missing or wrong bearer token", method)
        return _denying(handler)


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (metadata 'authorization')")


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await _deny(request, context)
    yield  # pragma: no cover - unreachable; makes this an async generator


def _denying(handler: Handler) -> Handler:
    """The same kind of handler as ``handler``, answering UNAUTHENTICATED."""
    replace = cast(Any, handler)._replace
    if handler.unary_unary is not None:
        return cast(Handler, replace(unary_unary=_deny))
    if handler.unary_stream is not None:
        return cast(Handler, replace(unary_stream=_deny_stream))
    if handler.stream_unary is not None:
        return cast(Handler, replace(stream_unary=_deny))
    return cast(Handler, replace(stream_stream=_deny_stream))
