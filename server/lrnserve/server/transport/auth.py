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
# Operator RPCs: with a model-control token they need it, and the inference token is refused.
CONTROL_METHODS = ("/inference.GRPCInferenceService/Repository",)


class TokenAuth(grpc.aio.ServerInterceptor):
    """``token``: what every RPC but health needs (None: no token); ``control_token``: what the
    Repository* RPCs need instead (None: the same as the others)."""

    def __init__(
        self, token: str | None, on_reject: Callable[[], None] | None = None, control_token: str | None = None
    ) -> None:
        self._expected = f"Bearer {token}".encode() if token is not None else None
        self._control = f"Bearer {control_token}".encode() if control_token is not None else None
        self._on_reject = on_reject

    @staticmethod
    def _matches(metadata: Any, expected: bytes | None) -> bool:
        if expected is None:
            return True
        for key, value in metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else str(value).encode()
                return hmac.compare_digest(given, expected)
        return False

    def _authorized(self, metadata: Any) -> bool:
        return self._matches(metadata, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._control is not None and method.startswith(CONTROL_METHODS):
            if self._matches(metadata, self._control):
                return handler
            if self._expected is not None and self._matches(metadata, self._expected):
                logger.info("refused %s: the inference token cannot control models", method)
                return _denying(handler, _forbid)
        elif self._authorized(metadata):
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


async def _forbid(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED, "model control needs the model-control token, not the inference token"
    )


def _denying(handler: Handler, deny: Any = _deny) -> Handler:
    """The same kind of handler as ``handler``, answering UNAUTHENTICATED (or what ``deny`` says)."""
    replace = cast(Any, handler)._replace
    if handler.unary_unary is not None:
        return cast(Handler, replace(unary_unary=deny))
    if handler.unary_stream is not None:
        return cast(Handler, replace(unary_stream=_deny_stream))
    if handler.stream_unary is not None:
        return cast(Handler, replace(stream_unary=_deny))
    return cast(Handler, replace(stream_stream=_deny_stream))
