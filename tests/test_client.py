"""The client SDK against real servers: values, dtypes, errors, retries, round robin."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
import torch
from harness import (
    ServerThread,
    Worker,
    free_port,
    gated_server,
    lrn_model,
    requests_counted,
    settings,
    wait_until,
)

import lrnserve.client as client_module
from lrnserve.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LrnserveError,
    NotFound,
    ResourceExhausted,
    Retry,
    Unavailable,
)
from lrnserve.server.models import create_network
from lrnserve.server.ops import local_response_norm
from lrnserve.server.settings import ModelConfig


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = settings(
        lrn_model("lrn"),
        ModelConfig(name="cifar10_full", kind="cifar10_full"),
        max_message_bytes=32 * 1024 * 1024,
    )
    with ServerThread(config) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target, timeout=30) as c:
        yield c


def expected_lrn(x: torch.Tensor, **p: object) -> torch.Tensor:
    return local_response_norm(
        x, p.get("size", 5), p.get("alpha", 1e-4), p.get("beta", 0.75), p.get("k", 1.0), p.get("mode", "across")
    )  # type: ignore[arg-type]


NUMPY_DTYPES = [np.float32, np.float16, np.float64]
TORCH_DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_in_numpy_out_same_dtype(client: Client, dtype: type) -> None:
    x = (np.random.default_rng(0).standard_normal((2, 8, 5, 5)) * 30).astype(dtype)
    y = client.lrn(x, mode="within", size=3, alpha=0.5, beta=0.6, k=2.0)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
    expected = expected_lrn(torch.from_numpy(x), mode="within", size=3, alpha=0.5, beta=0.6, k=2.0)
    np.testing.assert_array_equal(y, expected.numpy())


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_inputs(client: Client, dtype: torch.dtype) -> None:
    x = (torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1)) * 30).to(dtype)
    y = client.lrn(x, size=3, alpha=0.1)
    expected = expected_lrn(x, size=3, alpha=0.1)
    if dtype == torch.bfloat16:  # numpy has no bfloat16: a torch tensor comes back
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
        assert torch.equal(y, expected)
    else:
        assert isinstance(y, np.ndarray) and y.dtype == np.dtype(str(dtype).removeprefix("torch."))
        np.testing.assert_array_equal(y, expected.numpy())


def test_one_sample_in_3d_comes_back_3d(client: Client) -> None:
    x = np.random.default_rng(2).standard_normal((8, 6, 6)).astype(np.float32)
    y = client.lrn(x)
    assert y.shape == (8, 6, 6)
    np.testing.assert_array_equal(y, expected_lrn(torch.from_numpy(x[None]))[0].numpy())
    image = np.random.default_rng(3).standard_normal((3, 32, 32)).astype(np.float32)
    probabilities = client.infer("cifar10_full", image)
    assert probabilities.shape == (10,)
    with torch.inference_mode():
        reference = create_network("cifar10_full")(torch.from_numpy(image[None]))[0].numpy()
    np.testing.assert_allclose(probabilities, reference, rtol=1e-5, atol=1e-7)


def test_health_metadata_and_statistics(client: Client) -> None:
    assert client.live() and client.ready() and client.ready("lrn") and client.health() and client.health("lrn")
    server = client.server_metadata()
    assert server.name == "lrnserve" and "statistics" in server.extensions
    meta = client.metadata("cifar10_full")
    assert meta.inputs[0].shape == (-1, 3, 32, 32) and meta.outputs[0].name == "probabilities"
    before = client.statistics("lrn").success_count
    client.lrn(np.ones((3, 4, 2, 2), np.float32))
    after = client.statistics("lrn")
    assert after.success_count == before + 1 and after.inference_count >= 3


def test_async_client(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.target, timeout=30) as c:
            assert await c.live() and await c.ready("lrn") and await c.health()
            assert (await c.server_metadata()).name == "lrnserve"
            assert (await c.metadata("lrn")).platform == "pytorch"
            xs = [np.full((1, 4, 3, 3), float(i), np.float32) for i in range(16)]
            ys = await asyncio.gather(*(c.lrn(x, alpha=float(i)) for i, x in enumerate(xs)))
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                np.testing.assert_array_equal(y, expected_lrn(torch.from_numpy(x), alpha=float(i)).numpy())
            bf16 = torch.randn(1, 4, 3, 3).bfloat16()
            assert torch.equal(await c.lrn(bf16), expected_lrn(bf16))
            assert (await c.statistics("lrn")).success_count >= 16
            with pytest.raises(InvalidArgument):
                await c.lrn(xs[0], size=0)
            with pytest.raises(NotFound):
                await c.infer("vgg", xs[0])

    asyncio.run(main())


# ---- every exception class, from real server answers ----


def test_infer_stream_answers_every_input_by_position(client: Client, server: ServerThread) -> None:
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal((1, 6, 5, 5)).astype(np.float32) * (i + 1) for i in range(10)]
    before = client.statistics("lrn").success_count
    results = list(client.infer_stream("lrn", iter(inputs), size=3, k=2.0))
    assert sorted(r.index for r in results) == list(range(10))
    for r in results:
        assert r.error is None
        expected = local_response_norm(torch.from_numpy(inputs[r.index]), 3, 1e-4, 0.75, 2.0).numpy()
        np.testing.assert_allclose(r.result(), expected, rtol=1e-6)
    assert client.statistics("lrn").success_count == before + 10
    # a request that fails is answered with its error, and the stream goes on
    mixed = list(client.infer_stream("lrn", [inputs[0], inputs[1][0, :2]], size=3, alpha=-1.0))
    assert sorted(r.index for r in mixed) == [0, 1]
    for r in mixed:
        assert isinstance(r.error, LrnserveError) and "parameters.alpha" in r.error.details
        with pytest.raises(LrnserveError):
            r.result()


def test_async_infer_stream_takes_an_async_iterable(server: ServerThread) -> None:
    inputs = [np.full((1, 4, 3, 3), float(i + 1), np.float32) for i in range(6)]

    async def produce() -> AsyncIterator[np.ndarray]:
        for x in inputs:
            yield x

    async def stream() -> list[tuple[int, np.ndarray]]:
        async with AsyncClient(server.target, timeout=30) as aclient:
            return [(r.index, r.result()) async for r in aclient.infer_stream("lrn", produce())]

    results = asyncio.run(stream())
    assert sorted(i for i, _ in results) == list(range(6))
    for index, y in results:
        expected = local_response_norm(torch.from_numpy(inputs[index]), 5).numpy()
        np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_invalid_argument(client: Client) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.lrn(np.ones((1, 2, 3, 3), np.float32), alpha=-1.0)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "parameters.alpha" in error.details
    assert isinstance(error, LrnserveError) and isinstance(error.__cause__, grpc.RpcError)
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.shape"):
        client.infer("cifar10_full", np.ones((1, 3, 8, 8), np.float32))


def test_not_found(client: Client) -> None:
    with pytest.raises(NotFound, match="model 'vgg'"):
        client.infer("vgg", np.ones((1, 3, 8, 8), np.float32))
    with pytest.raises(NotFound):
        client.metadata("vgg")


def test_resource_exhausted(client: Client) -> None:
    x = np.zeros((1, 1, 3000, 3000), np.float32)  # 36 MB > the server's 32 MiB limit
    with pytest.raises(ResourceExhausted):
        Client(client.target, max_message_bytes=64 * 1024 * 1024).lrn(x)


def test_deadline_exceeded(client: Client) -> None:
    x = np.zeros((16, 96, 55, 55), np.float32)
    with pytest.raises(DeadlineExceeded):
        client.lrn(x, timeout=0.001)


def test_internal() -> None:
    running, probes = gated_server(settings(lrn_model("lrn")))
    with running, Client(running.target, timeout=30, retries=0) as client:
        probes["lrn"].failure = RuntimeError("boom")
        with pytest.raises(Internal, match="internal server error") as info:
            client.lrn(np.ones((1, 2, 2, 2), np.float32))
        assert "boom" not in str(info.value)
        assert len(probes["lrn"].batches) == 1  # it failed inside the batch, not before
        probes["lrn"].failure = None
        assert client.lrn(np.ones((1, 2, 2, 2), np.float32)).shape == (1, 2, 2, 2)


def test_unavailable_when_draining_and_when_down(server: ServerThread, client: Client) -> None:
    server.server.dataplane.draining = True
    try:
        with pytest.raises(Unavailable, match="shutting down"):
            Client(server.target, retries=0).lrn(np.ones((1, 2, 2, 2), np.float32))
    finally:
        server.server.dataplane.draining = False
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as down, pytest.raises(Unavailable):
        down.live()


def test_local_argument_errors(client: Client) -> None:
    with pytest.raises(TypeError, match="numpy dtype int64"):
        client.lrn(np.ones((1, 2, 2, 2), np.int64))
    with pytest.raises(TypeError, match="parameter alpha"):
        client.lrn(np.ones((1, 2, 2, 2), np.float32), alpha=[1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Client("localhost:1", timeout=0)


# ---- retries, deadlines, several servers ----


def test_retry_reaches_a_server_that_starts_late() -> None:
    port = free_port()
    config = settings(lrn_model(), grpc_port=port)
    box: dict[str, ServerThread] = {}

    def start_later() -> None:
        time.sleep(1.0)
        box["server"] = ServerThread(config).__enter__()

    starter = threading.Thread(target=start_later)
    begin = time.monotonic()
    starter.start()
    try:
        retry = Retry(attempts=100, initial_backoff=0.05, max_backoff=0.3)
        with Client(f"127.0.0.1:{port}", timeout=30, retries=retry) as c:
            y = c.lrn(np.ones((1, 2, 2, 2), np.float32))
        assert y.shape == (1, 2, 2, 2)
        assert time.monotonic() - begin >= 1.0
    finally:
        starter.join(timeout=60)
        if "server" in box:
            box["server"].stop()


def test_retries_never_overrun_the_deadline() -> None:
    retry = Retry(attempts=1000, initial_backoff=0.2, max_backoff=0.5)
    with Client(f"127.0.0.1:{free_port()}", timeout=1.0, retries=retry) as c:
        begin = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            c.live()
        elapsed = time.monotonic() - begin
    assert elapsed <= 1.2, elapsed


def test_resource_exhausted_is_retried_when_asked() -> None:
    running, probes = gated_server(settings(lrn_model("lrn", max_batch_size=1, max_queue_size=1)))
    with running:
        gated = probes["lrn"]
        batcher = running.server.repository.get("lrn").batcher
        assert batcher is not None and running.server.metrics_port
        port = running.server.metrics_port
        x = np.ones((1, 2, 2, 2), np.float32)
        gated.gate.clear()
        try:
            with Client(running.target, timeout=30, retries=0) as first:
                busy = Worker(first.lrn, x)
                assert gated.started.wait(10), "the first request never started computing"
                queued = Worker(first.lrn, x)
                wait_until(lambda: batcher.queue_depth == 1, "the second request queued")
                with pytest.raises(ResourceExhausted, match="queue full"):
                    Client(running.target, retries=0).lrn(x)
                assert requests_counted(port, "lrn", "RESOURCE_EXHAUSTED") == 1
                retrying = Retry(attempts=1000, initial_backoff=0.01, max_backoff=0.05, resource_exhausted=True)
                with Client(running.target, timeout=30, retries=retrying) as patient:
                    waiting = Worker(patient.lrn, x)
                    # The patient caller is refused at least twice while the queue stays full ...
                    wait_until(
                        lambda: requests_counted(port, "lrn", "RESOURCE_EXHAUSTED") >= 3,
                        "the patient client retried after RESOURCE_EXHAUSTED",
                    )
                    assert waiting.thread.is_alive(), "answered while the queue was full"
                    gated.gate.set()
                    # ... and gets its answer once the queue has room.
                    assert waiting.result(timeout=30).shape == x.shape
                assert busy.result().shape == x.shape and queued.result().shape == x.shape
        finally:
            gated.gate.set()
        assert requests_counted(port, "lrn", "OK") == 3


def test_round_robin_over_two_servers() -> None:
    with ServerThread(settings(lrn_model())) as a, ServerThread(settings(lrn_model())) as b:
        with Client([a.target, b.target], timeout=30) as c:
            for _ in range(20):
                c.lrn(np.ones((1, 2, 2, 2), np.float32))
        counts = []
        for running in (a, b):
            with Client(running.target) as direct:
                counts.append(direct.statistics("lrn").success_count)
    assert sum(counts) == 20
    assert min(counts) >= 5, counts


# ---- the package itself ----


def test_public_api_is_exactly_all() -> None:
    public = {name for name in dir(client_module) if not name.startswith("_")} | {"__version__"}
    modules = {"allocator", "cli", "datatypes", "loadgen", "pb", "protocol", "version"}  # public submodules
    assert set(client_module.__all__) == public - modules
    assert client_module.__all__ == sorted(client_module.__all__, key=lambda n: (not n.isupper(), n))
    for name in client_module.__all__:
        assert getattr(client_module, name) is not None


def test_client_imports_without_torch() -> None:
    code = (
        "import sys; import lrnserve.client, lrnserve.client.cli, lrnserve.client.loadgen; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
