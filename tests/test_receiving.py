"""ModelInfer messages are received a few at a time (``max_concurrent_receives``), against a
real server on loopback: a call waits for a receive slot while another's message arrives, a
sender too slow for ``receive_timeout_seconds`` is refused and frees its slot, and a stream that
carries no message or a malformed one gets INVALID_ARGUMENT. Client-streaming calls on the
ModelInfer path stand in for slow senders: on the wire a unary call is a stream of one message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
from harness import ServerThread, infer_request, lrn_model, settings

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb

PATH = "/inference.GRPCInferenceService/ModelInfer"
X = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
EXPECTED = torch.nn.functional.local_response_norm(torch.from_numpy(X), 5, 1e-4, 0.75, 1.0).numpy()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.005)


def answer(data: bytes) -> np.ndarray:
    response = pb.ModelInferResponse.FromString(data)
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(response.outputs[0].shape)


def held_back(release: threading.Event, message: bytes) -> Iterator[bytes]:
    """A sender that starts its call and sends its message only once ``release`` is set."""
    release.wait(timeout=60)
    yield message


@pytest.fixture
def one_slot() -> Iterator[ServerThread]:
    with ServerThread(settings(lrn_model(), max_concurrent_receives=1, receive_timeout_seconds=30.0)) as server:
        yield server


def test_a_call_waits_for_a_receive_slot_then_is_answered(one_slot: ServerThread) -> None:
    slots = one_slot.server.receive_slots
    assert slots is not None
    request = infer_request("lrn", X).SerializeToString()
    release = threading.Event()
    with one_slot.channel() as channel:
        slow = channel.stream_unary(PATH).future(held_back(release, request), timeout=60)
        try:
            wait_until(lambda: slots.receiving == 1, "the slow sender holds the slot")
            waiting = channel.unary_unary(PATH).future(request, timeout=60)
            wait_until(lambda: slots.waiting == 1, "the second call waits for the slot")
            assert not waiting.done()  # its message is not received while the slot is taken
        finally:
            release.set()
        np.testing.assert_allclose(answer(slow.result(timeout=60)), EXPECTED, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer(waiting.result(timeout=60)), EXPECTED, rtol=1e-5, atol=1e-6)
    assert slots.waiting == 0 and slots.receiving == 0


def test_a_sender_slower_than_the_receive_timeout_is_refused_and_frees_its_slot() -> None:
    with ServerThread(settings(lrn_model(), max_concurrent_receives=1, receive_timeout_seconds=0.2)) as server:
        request = infer_request("lrn", X).SerializeToString()
        release = threading.Event()
        with server.channel() as channel:
            try:
                with pytest.raises(grpc.RpcError) as refused:
                    channel.stream_unary(PATH)(held_back(release, request), timeout=60)
            finally:
                release.set()
            assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "receive_timeout_seconds (0.2 s)" in refused.value.details()
            # The slot is free again: a prompt caller is answered.
            np.testing.assert_allclose(answer(channel.unary_unary(PATH)(request, timeout=30)), EXPECTED, rtol=1e-5)


@pytest.mark.parametrize(
    ("messages", "detail"),
    [
        ([], "the call carried no request message"),
        ([b"\xff\xff\xff"], "the request message is not a ModelInferRequest"),
    ],
)
def test_a_call_without_a_well_formed_message_is_invalid(
    one_slot: ServerThread, messages: list[bytes], detail: str
) -> None:
    with one_slot.channel() as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.stream_unary(PATH)(iter(messages), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail in refused.value.details()
        request = infer_request("lrn", X).SerializeToString()
        np.testing.assert_allclose(answer(channel.unary_unary(PATH)(request, timeout=30)), EXPECTED, rtol=1e-5)
