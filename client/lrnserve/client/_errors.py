"""One exception family for everything a server can answer, mapped from gRPC status codes
in one table. Every error keeps the status (``.code``) and the server's message (``.details``)
and is raised ``from`` the original ``grpc.RpcError``."""

from __future__ import annotations

import grpc


class LrnserveError(Exception):
    """A call to an lrnserve (or any Open Inference Protocol v2) server failed."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class Cancelled(LrnserveError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(LrnserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(LrnserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LrnserveError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(LrnserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LrnserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LrnserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(LrnserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LrnserveError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(LrnserveError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(LrnserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


ERRORS: dict[grpc.StatusCode, type[LrnserveError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Unimplemented,
        Internal,
        Unavailable,
        Unauthenticated,
    )
}


def error_from_rpc(error: grpc.RpcError) -> LrnserveError:
    """The LrnserveError for a failed call (LrnserveError itself for codes without a subclass)."""
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details: str = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = ERRORS.get(code, LrnserveError)
    return cls(details, code)
