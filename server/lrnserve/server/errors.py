"""The server's exception family: each error carries the gRPC status it maps to.

Everything the dataplane, batcher or models reject is raised as one of these;
the transport maps them in exactly one place (``transport.service.Guarded``).
Anything else that escapes becomes INTERNAL with a generic message.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """An error meant for the caller: ``message`` names the field and what was expected."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def copy(self) -> ServingError:
        """The same status and message as a new exception: one per request when a whole batch
        fails, since an exception raised in several tasks would share (and grow) one traceback."""
        return ServingError(self.message, self.code)


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED
