"""Triton's system shared memory extension against a real server: tensors in POSIX shared memory
(made here with the standard library, and by tritonclient's own helpers in a child process)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from harness import ServerThread, gated_server, infer_request, lrn_model, output_array, settings, stub, wait_until

from lrnserve.client import Client, FailedPrecondition, InvalidArgument
from lrnserve.client._tensors import set_parameter
from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.server.errors import PermissionDenied
from lrnserve.server.servables import NetworkServable
from lrnserve.server.settings import ModelConfig
from reference import lrn_reference

SHAPE = (2, 8, 5, 6)
NBYTES = int(np.prod(SHAPE)) * 4
WAIT = 30.0


@pytest.fixture
def segment() -> Iterator[shared_memory.SharedMemory]:
    """One POSIX shared memory object with room for an input and an output, unlinked after."""
    shm = shared_memory.SharedMemory(create=True, size=4096 + 2 * NBYTES)
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(settings(lrn_model("lrn"), allow_shared_memory=True)) as running:
        yield running


def reference(x: np.ndarray, size: int, k: float) -> np.ndarray:
    return lrn_reference(x.astype(np.float64), size, 1e-4, 0.75, k, "across")


def register(channel: grpc.Channel, name: str, key: str, offset: int, byte_size: int) -> None:
    request = pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)
    stub(channel).SystemSharedMemoryRegister(request, timeout=WAIT)


def status(channel: grpc.Channel, name: str = "") -> dict[str, tuple[str, int, int]]:
    response = stub(channel).SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name=name), timeout=WAIT)
    return {n: (r.key, r.offset, r.byte_size) for n, r in response.regions.items()}


def shm_request(
    model: str, shape: tuple[int, ...], inputs: dict[str, object], outputs: dict[str, object] | None = None
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=shape)
    for key, value in inputs.items():
        set_parameter(tensor.parameters[key], key, value)
    if outputs is not None:
        output = request.outputs.add(name="output")
        for key, value in outputs.items():
            set_parameter(output.parameters[key], key, value)
    return request


def window(region: str, byte_size: int, offset: int = 0) -> dict[str, object]:
    return {"shared_memory_region": region, "shared_memory_byte_size": byte_size, "shared_memory_offset": offset}


def refused(channel: grpc.Channel, request: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        stub(channel).ModelInfer(request, timeout=WAIT)
    return error.value


def test_inputs_are_read_from_and_outputs_written_to_shared_memory(
    server: ServerThread, segment: shared_memory.SharedMemory
) -> None:
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    place = np.ndarray(SHAPE, np.float32, segment.buf, offset=4096)  # the input at an offset
    place[...] = x
    with server.channel() as channel:
        register(channel, "in", f"/{segment.name}", 4096, NBYTES)
        register(channel, "out", segment.name, 4096 + NBYTES, NBYTES)  # the key with or without "/"
        assert status(channel) == {
            "in": (f"/{segment.name}", 4096, NBYTES),
            "out": (segment.name, 4096 + NBYTES, NBYTES),
        }
        request = shm_request("lrn", SHAPE, window("in", NBYTES), window("out", NBYTES))
        request.parameters["k"].double_param = 2.0
        response = stub(channel).ModelInfer(request, timeout=WAIT)
        assert len(response.raw_output_contents) == 0  # the answer's bytes are in the region
        (output,) = response.outputs
        assert list(output.shape) == list(SHAPE) and output.parameters["shared_memory_region"].string_param == "out"
        written = np.ndarray(SHAPE, np.float32, segment.buf, offset=4096 + NBYTES).copy()
        np.testing.assert_allclose(written, reference(x, 5, 2.0), rtol=1e-6)
        # an input from shared memory, the answer in the message
        plain = stub(channel).ModelInfer(shm_request("lrn", SHAPE, window("in", NBYTES)), timeout=WAIT)
        np.testing.assert_allclose(output_array(plain), reference(x, 5, 1.0), rtol=1e-6)
        stub(channel).SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="in"), timeout=WAIT)
        assert status(channel) == {"out": (segment.name, 4096 + NBYTES, NBYTES)}
        stub(channel).SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=WAIT)  # all
        assert status(channel) == {}
        metadata = stub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=WAIT)
        assert "system_shared_memory" in metadata.extensions


def test_every_use_is_checked(server: ServerThread, segment: shared_memory.SharedMemory) -> None:
    with server.channel() as channel:
        register(channel, "in", segment.name, 0, NBYTES)
        register(channel, "out", segment.name, NBYTES, 16)
        cases: list[tuple[pb.ModelInferRequest, grpc.StatusCode, str]] = [
            (shm_request("lrn", SHAPE, window("in", NBYTES - 4)), grpc.StatusCode.INVALID_ARGUMENT,
             "inputs[0].parameters.shared_memory_byte_size"),
            (shm_request("lrn", SHAPE, window("in", NBYTES, offset=8)), grpc.StatusCode.INVALID_ARGUMENT,
             "overrun region 'in'"),
            (shm_request("lrn", SHAPE, window("nowhere", NBYTES)), grpc.StatusCode.INVALID_ARGUMENT,
             "no shared memory region 'nowhere'"),
            (shm_request("lrn", SHAPE, window("in", NBYTES), window("out", 16)), grpc.StatusCode.INVALID_ARGUMENT,
             "outputs[0].parameters.shared_memory_byte_size"),
            (shm_request("lrn", SHAPE, {"shared_memory_region": "in"}), grpc.StatusCode.INVALID_ARGUMENT,
             "shared_memory_byte_size: required"),
            (shm_request("lrn", SHAPE, {"shared_memory_region": "in", "shared_memory_byte_size": -1}),
             grpc.StatusCode.INVALID_ARGUMENT, "expected an integer >= 0"),
        ]  # fmt: skip
        both = infer_request("lrn", np.ones(SHAPE, np.float32))
        set_parameter(both.inputs[0].parameters["shared_memory_region"], "r", "in")
        set_parameter(both.inputs[0].parameters["shared_memory_byte_size"], "b", NBYTES)
        cases.append((both, grpc.StatusCode.INVALID_ARGUMENT, "also in the message"))
        for request, code, text in cases:
            error = refused(channel, request)
            assert (error.code(), text in str(error.details())) == (code, True), error.details()
        for name, key, offset, size, code, text in (
            ("x", "../etc/passwd", 0, 8, grpc.StatusCode.INVALID_ARGUMENT, "not a shared memory key"),
            ("x", "/dev/shm/a", 0, 8, grpc.StatusCode.INVALID_ARGUMENT, "not a shared memory key"),
            ("x", "/no-such-segment-here", 0, 8, grpc.StatusCode.INVALID_ARGUMENT, "cannot open"),
            ("x", segment.name, 8, segment.size, grpc.StatusCode.INVALID_ARGUMENT, "does not fit"),
            ("in", segment.name, 0, 8, grpc.StatusCode.ALREADY_EXISTS, "already registered"),
        ):
            with pytest.raises(grpc.RpcError) as error:
                register(channel, name, key, offset, size)
            assert error.value.code() == code and text in str(error.value.details()), error.value.details()
        with pytest.raises(grpc.RpcError) as missing:
            status(channel, "x")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert set(status(channel)) == {"in", "out"}  # the refusals changed nothing


def test_a_region_unregistered_while_a_request_uses_it(segment: shared_memory.SharedMemory) -> None:
    running, probes = gated_server(settings(lrn_model("lrn", max_batch_size=1), allow_shared_memory=True))
    x = np.full(SHAPE, 3.0, np.float32)
    np.ndarray(SHAPE, np.float32, segment.buf)[...] = x
    want = reference(x, 5, 1.0)
    with running, running.channel() as channel:
        lrn = probes["lrn"]
        register(channel, "in", segment.name, 0, NBYTES)
        register(channel, "out", segment.name, NBYTES, NBYTES)
        unregister = stub(channel).SystemSharedMemoryUnregister
        # The input region goes while its request computes: the request keeps reading its mapping.
        lrn.gate.clear()
        call = stub(channel).ModelInfer.future(shm_request("lrn", SHAPE, window("in", NBYTES)), timeout=WAIT)
        assert lrn.started.wait(WAIT)
        unregister(pb.SystemSharedMemoryUnregisterRequest(name="in"), timeout=WAIT)
        lrn.gate.set()
        np.testing.assert_allclose(output_array(call.result(timeout=WAIT)), want, rtol=1e-6)
        assert "no shared memory region 'in'" in str(
            refused(channel, shm_request("lrn", SHAPE, window("in", NBYTES))).details()
        )
        # The output region goes while its request computes: the answer still lands in it (the
        # request took its view of the mapping when it was validated), and later requests are refused.
        register(channel, "in", segment.name, 0, NBYTES)
        lrn.started.clear()
        lrn.gate.clear()
        call = stub(channel).ModelInfer.future(
            shm_request("lrn", SHAPE, window("in", NBYTES), window("out", NBYTES)), timeout=WAIT
        )
        assert lrn.started.wait(WAIT)
        unregister(pb.SystemSharedMemoryUnregisterRequest(name="out"), timeout=WAIT)
        lrn.gate.set()
        assert len(call.result(timeout=WAIT).raw_output_contents) == 0
        np.testing.assert_allclose(np.ndarray(SHAPE, np.float32, segment.buf, offset=NBYTES), want, rtol=1e-6)
        late = refused(channel, shm_request("lrn", SHAPE, window("in", NBYTES), window("out", NBYTES)))
        assert "no shared memory region 'out'" in str(late.details())
        wait_until(lambda: running.server.dataplane.budget.used == 0, "both requests ended")


def test_a_shrunk_file_or_another_users_file_is_refused(
    server: ServerThread, segment: shared_memory.SharedMemory
) -> None:
    path = Path("/dev/shm", segment.name)
    with server.channel() as channel:
        register(channel, "in", segment.name, 0, NBYTES)
        os.truncate(path, 64)  # the client shrinks its file (this test then never touches its pages)
        shrunk = refused(channel, shm_request("lrn", SHAPE, window("in", NBYTES)))
        assert shrunk.code() == grpc.StatusCode.INVALID_ARGUMENT and "no longer holds" in str(shrunk.details())
        os.truncate(path, segment.size)
        if os.geteuid() == 0:  # only root can give a file away
            os.chown(path, 65534, 65534)
            with pytest.raises(grpc.RpcError) as foreign:
                register(channel, "theirs", segment.name, 0, NBYTES)
            assert "belongs to another user" in str(foreign.value.details())


def test_only_callers_on_this_host_may_name_shared_memory(
    server: ServerThread, segment: shared_memory.SharedMemory
) -> None:
    from lrnserve.server.inference import InferenceRequest, InputTensor
    from lrnserve.server.transport.codec import is_local_peer

    assert [is_local_peer(p) for p in ("ipv4:127.0.0.1:5", "ipv6:[::1]:5", "unix:/run/x.sock")] == [True] * 3
    assert [is_local_peer(p) for p in ("ipv4:10.1.2.3:5", "ipv6:[2001:db8::1]:5", "ipv4:128.0.0.1:5")] == [False] * 3
    with server.channel() as channel:
        register(channel, "in", segment.name, 0, NBYTES)
    tensor = InputTensor("input", "FP32", SHAPE, parameters=window("in", NBYTES))  # type: ignore[arg-type]
    remote = InferenceRequest("lrn", "", "", (tensor,), local=lambda: False)
    with pytest.raises(PermissionDenied, match="only for callers on the server's host"):
        server.call(server.server.dataplane.infer(remote))


def test_off_unless_allowed(segment: shared_memory.SharedMemory) -> None:
    with ServerThread(settings(lrn_model("lrn"))) as running, running.channel() as channel:
        with pytest.raises(grpc.RpcError) as error:
            register(channel, "in", segment.name, 0, NBYTES)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--allow-shared-memory" in str(error.value.details())
        input_error = refused(channel, shm_request("lrn", SHAPE, window("in", NBYTES)))
        assert input_error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs[0].parameters.shared_memory_region: system shared memory is not enabled" in str(
            input_error.details()
        )
        metadata = stub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=WAIT)
        assert "system_shared_memory" not in metadata.extensions


# tritonclient registers its own ``inference.*`` messages (they clash with lrnserve's): a child process.
TRITON_SHM = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    target, out = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(target)
    x = np.random.default_rng(9).standard_normal((1, 16, 7, 7)).astype(np.float32)
    size = x.nbytes
    handles = [shm.create_shared_memory_region(name, "/lrnserve_test_" + name, size) for name in ("in", "out")]
    try:
        shm.set_shared_memory_region(handles[0], [x])
        client.register_system_shared_memory("in", "/lrnserve_test_in", size)
        client.register_system_shared_memory("out", "/lrnserve_test_out", size)
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("in", size)
        output = grpcclient.InferRequestedOutput("output")
        output.set_shared_memory("out", size)
        result = client.infer("lrn", [tensor], outputs=[output], parameters={"size": 3})
        meta = result.get_output("output")
        y = shm.get_contents_as_numpy(handles[1], np.float32, list(meta.shape))
        status = client.get_system_shared_memory_status(as_json=True)
        client.unregister_system_shared_memory()
        after = client.get_system_shared_memory_status(as_json=True)
        np.savez(out + "/arrays.npz", x=x, y=y)
        with open(out + "/report.json", "w") as fh:
            json.dump({"status": status, "after": after}, fh)
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)
    """
)


def test_tritonclient_shared_memory_helpers_work_unchanged(server: ServerThread, tmp_path: Path) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    done = subprocess.run(
        [sys.executable, "-c", TRITON_SHM, server.target, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    arrays = np.load(tmp_path / "arrays.npz")
    np.testing.assert_allclose(arrays["y"], reference(arrays["x"], 3, 1.0), rtol=1e-6)
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    assert set(report["status"]["regions"]) == {"in", "out"}
    assert report["status"]["regions"]["in"]["key"] == "/lrnserve_test_in"
    assert not report["after"].get("regions")


def test_the_sdk_same_host_mode_passes_tensors_through_shared_memory() -> None:
    config = settings(lrn_model("lrn"), ModelConfig(name="cifar10_full", kind="cifar10_full"), allow_shared_memory=True)
    rng = np.random.default_rng(11)
    with ServerThread(config) as running, running.channel() as channel:
        with Client(running.target, same_host=True, timeout=WAIT) as client:
            for shape in ((1, 4, 3, 3), (4, 16, 32, 32), (2, 4, 3, 3)):  # the regions grow, then serve smaller
                x = rng.standard_normal(shape).astype(np.float32)
                np.testing.assert_allclose(client.lrn(x, size=3, k=2.0), reference(x, 3, 2.0), rtol=1e-6)
            regions = status(channel)
            assert len(regions) == 2 and all(key.startswith("/lrnserve_") for key, _, _ in regions.values())
            assert all(Path("/dev/shm", key.lstrip("/")).exists() for key, _, _ in regions.values())
            # The server forgets every region (as after a restart): the client registers new ones and retries.
            stub(channel).SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=WAIT)
            x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
            np.testing.assert_allclose(client.lrn(x, size=3, k=2.0), reference(x, 3, 2.0), rtol=1e-6)
            assert len(status(channel)) == 2 and set(status(channel)).isdisjoint(regions)  # new names
            with pytest.raises(InvalidArgument, match=r"parameters\.alpha"):
                client.lrn(x, alpha=-1.0)
            np.testing.assert_allclose(client.lrn(x, size=3, k=2.0), reference(x, 3, 2.0), rtol=1e-6)
            regions = status(channel)
            images = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
            probabilities = client.infer("cifar10_full", images)  # an answer of another shape than its input
            network = running.server.repository.get("cifar10_full").servable
            assert isinstance(network, NetworkServable)
            with torch.inference_mode():
                expected = network.network(torch.from_numpy(images)).numpy()
            np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
        assert status(channel) == {}  # closing the client unregistered its regions
        assert not any(Path("/dev/shm", key.lstrip("/")).exists() for key, _, _ in regions.values())
    plain = ServerThread(settings(lrn_model("lrn")))
    with plain, Client(plain.target, same_host=True, timeout=WAIT) as c, pytest.raises(FailedPrecondition) as off:
        c.lrn(np.ones((1, 2, 2, 2), np.float32))
    assert "--allow-shared-memory" in str(off.value)
