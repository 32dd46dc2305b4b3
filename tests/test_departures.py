"""A caller that left is an ordinary event: no answer is sent to its call, nothing is logged above
debug level, and gRPC's own error for an answer that raced the departure is kept at debug."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from lrnserve.server.errors import DeadlineExceeded, InvalidArgument
from lrnserve.server.transport.service import QuietDepartures, _wrap_unary


class FakeContext:
    """What the wrapper asks of a call: is it over on the caller's side, and abort."""

    def __init__(self, remaining: float | None, done: bool = False) -> None:
        self._remaining = remaining
        self._done = done
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self._remaining

    def done(self) -> bool:
        return self._done

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def run(handler: Any, context: FakeContext) -> object:
    async def main() -> object:
        return await _wrap_unary("Test.Method", handler)(object(), context)  # type: ignore[arg-type]

    return asyncio.run(main())


async def answers(request: object, context: object) -> bytes:
    return b"answer"


async def fails(request: object, context: object) -> bytes:
    raise DeadlineExceeded("model 'lrn': the answer was ready after the caller's deadline")


async def refuses(request: object, context: object) -> bytes:
    raise InvalidArgument("parameters.alpha must be a number")


async def breaks(request: object, context: object) -> bytes:
    raise RuntimeError("a bug")


def test_a_live_call_gets_its_answer_or_its_status() -> None:
    assert run(answers, FakeContext(remaining=5.0)) == b"answer"
    context = FakeContext(remaining=None)
    with pytest.raises(grpc.aio.AbortError):
        run(refuses, context)
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "parameters.alpha must be a number")


@pytest.mark.parametrize("handler", [answers, fails, refuses, breaks], ids=["answer", "deadline", "refusal", "bug"])
@pytest.mark.parametrize(
    "context", [FakeContext(remaining=0.0), FakeContext(remaining=3.0, done=True)], ids=["deadline passed", "cancelled"]
)
def test_nothing_is_sent_to_a_call_whose_caller_left(
    handler: Any, context: FakeContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(asyncio.CancelledError):
        run(handler, context)
    assert context.aborted is None
    departed = [r for r in caplog.records if "caller left" in r.getMessage()]
    assert departed and all(r.levelno == logging.DEBUG for r in departed)
    if handler is not breaks:  # a bug is still logged as one, with its traceback
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_grpcs_error_for_an_answer_to_a_departed_caller_is_kept_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    grpc_logger = logging.getLogger("test-grpc-core")
    grpc_logger.addFilter(QuietDepartures())
    try:
        with caplog.at_level(logging.DEBUG):
            try:
                raise RuntimeError("ExecuteBatchError")
            except RuntimeError:
                grpc_logger.exception("ExecuteBatchError raised in core by servicer method [%s]", "/x/ModelInfer")
            grpc_logger.error("Unexpected [ValueError] raised by servicer method [/x/ModelInfer]")
    finally:
        grpc_logger.filters.clear()
    errors = [r for r in caplog.records if r.name == "test-grpc-core"]
    assert [r.getMessage() for r in errors] == ["Unexpected [ValueError] raised by servicer method [/x/ModelInfer]"]
    assert any("caller left before its answer" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
