"""Model control under load: atomic reloads, versions added and removed, unload freeing memory,
poll mode following the folder, and the model-control token.

The server is ``lrnserve serve`` in a child process (its RSS is the server's alone); callers
are threads with their own channels. Every wait is on a condition (the repository index, an
answer), never a fixed sleep.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import (
    free_port,
    infer_request,
    join_all,
    metric_value,
    output_array,
    scrape,
    serve_process,
    stub,
    wait_until,
)
from onnx_files import single
from test_repository import X, expected, lrn_model, write

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import health_pb2, health_pb2_grpc

CALLERS = 16
LOAD_SECONDS = 10.0
K = {"1": 1.0, "2": 2.0, "3": 3.0}


def request(model: str, version: str) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    message.raw_input_contents.append(X.tobytes())
    return message


def index(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> dict[tuple[str, str], tuple[str, str]]:
    response = stub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10, metadata=metadata)
    return {(m.name, m.version): (m.state, m.reason) for m in response.models}


def load(channel: grpc.Channel, name: str) -> None:
    stub(channel).RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=60)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_reloads_and_versions_under_load_fail_no_request(tmp_path: Path) -> None:
    root = tmp_path / "models"
    lrn_model(root, "lrnm", {1: 1.0, 2: 2.0}, 'version_policy = "all"\nmax_queue_delay_us = 500')
    write(root / "alex" / "config.toml", 'kind = "alexnet"\ninstances = 1\n')
    answers: Counter[str] = Counter()
    failures: list[str] = []
    wrong: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()
    expected_by_version = {v: expected(k) for v, k in K.items()}

    def caller(i: int, target: str) -> None:
        pinned = ("", "1", "2")[i % 3]  # a third ask for the newest version, the rest pin one
        try:
            with grpc.insecure_channel(target) as channel:
                infer = stub(channel).ModelInfer
                while not stop.is_set():
                    try:
                        response = infer(request("lrnm", pinned), timeout=30)
                    except grpc.RpcError as exc:
                        with lock:
                            failures.append(f"{exc.code()}: {exc.details()}")
                        continue
                    served = response.model_version
                    reference = expected_by_version.get(served)
                    correct = reference is not None and np.allclose(output_array(response), reference, rtol=1e-6)
                    with lock:
                        if (pinned and served != pinned) or not correct:
                            wrong.append(f"asked {pinned!r}, served {served}")
                        answers[served] += 1
        except BaseException as exc:  # collected: asserted below
            with lock:
                failures.append(repr(exc))

    args = ("--model-repository", str(root), "--model-control-mode", "explicit", "--load-model", "lrnm")
    with serve_process(*args, "--grace-seconds", "10") as (proc, target), grpc.insecure_channel(target) as control:
        threads = [threading.Thread(target=caller, args=(i, target), daemon=True) for i in range(CALLERS)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: sum(answers.values()) > 100, "callers answered", timeout=30)
            for _ in range(3):  # reload, unchanged: every version rebuilt and swapped
                load(control, "lrnm")
            write(root / "lrnm" / "3" / "config.toml", "k = 3.0\n")  # a new version...
            load(control, "lrnm")
            assert index(control)[("lrnm", "3")][0] == "READY"
            wait_until(lambda: answers["3"] > 50, "version 3 answered", timeout=30)
            shutil.rmtree(root / "lrnm" / "3")  # ...and removed again
            load(control, "lrnm")
            assert index(control)[("lrnm", "3")] == ("UNAVAILABLE", "unloaded")
            remaining = LOAD_SECONDS - (time.monotonic() - start)
            stop.wait(max(0.0, remaining))  # keep the load on for the full 10 s
        finally:
            stop.set()
            join_all(threads, 30)
        print(f"\nanswers per version: {dict(sorted(answers.items()))}; failures: {len(failures)}")
        assert not failures, failures[:5]
        assert not wrong, wrong[:5]
        assert answers["1"] and answers["2"] and answers["3"]

        # Unload frees memory: AlexNet (random weights, ~240 MB of parameters) in and out.
        before_load = rss_bytes(proc.pid)
        load(control, "alex")
        loaded = rss_bytes(proc.pid)
        stub(control).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="alex"), timeout=60)
        unloaded = rss_bytes(proc.pid)
        mib = 1 << 20
        print(
            f"RSS: before load {before_load / mib:.0f} MiB, loaded {loaded / mib:.0f} MiB, "
            f"after unload {unloaded / mib:.0f} MiB"
        )
        assert loaded - before_load > 150 * mib
        assert loaded - unloaded > 150 * mib
        health = health_pb2_grpc.HealthStub(control)
        status = health.Check(health_pb2.HealthCheckRequest(service="alex"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_poll_mode_follows_the_folder(tmp_path: Path) -> None:
    """Every change is applied by the second scan completed after it was made (the first may have
    read the folder before the change): within two poll intervals. Scans are counted by
    ``lrnserve_repository_polls_total``, so nothing here depends on how fast the machine is."""
    root = tmp_path / "models"
    root.mkdir()
    metrics_port = free_port()
    args = ("--model-repository", str(root), "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    with serve_process(*args, metrics_port=metrics_port) as (_, target), grpc.insecure_channel(target) as channel:

        def answer() -> np.ndarray:
            return output_array(stub(channel).ModelInfer(request("polled", ""), timeout=10))

        def two_scans_later() -> None:
            def polls() -> float:
                return metric_value(scrape(metrics_port), "lrnserve_repository_polls_total") or 0.0

            made = polls()  # read after the change was written
            wait_until(lambda: polls() >= made + 2, "two repository scans", 30)

        lrn_model(root, "polled", {1: 1.0})  # added
        two_scans_later()
        assert index(channel)[("polled", "1")] == ("READY", "")
        np.testing.assert_allclose(answer(), expected(1.0), rtol=1e-6)
        write(root / "polled" / "1" / "config.toml", "k = 2.5\n")  # changed
        two_scans_later()
        np.testing.assert_allclose(answer(), expected(2.5), rtol=1e-6)
        write(root / "polled" / "config.toml", 'kind = "lrn"\nk = [')  # broken: the old one keeps serving
        two_scans_later()
        state, reason = index(channel)[("polled", "1")]
        assert state == "READY" and "invalid TOML" in reason, reason
        np.testing.assert_allclose(answer(), expected(2.5), rtol=1e-6)
        write(root / "polled" / "config.toml", 'kind = "lrn"\nbeta = 1.0\n')  # repaired
        two_scans_later()
        assert index(channel)[("polled", "1")] == ("READY", "")
        np.testing.assert_allclose(answer(), expected(2.5, beta=1.0), rtol=1e-6)

        relu = root / "relu" / "1" / "model.onnx"  # a model file that breaks: the old one keeps serving
        relu.parent.mkdir(parents=True)
        relu.write_bytes(single("Relu", [1, 4, 2, 2]).SerializeToString())
        write(root / "relu" / "config.toml", 'kind = "onnx"\n')
        two_scans_later()
        x = infer_request("relu", X, name="x")
        np.testing.assert_array_equal(output_array(stub(channel).ModelInfer(x, timeout=10)), np.maximum(X, 0))
        relu.write_bytes(b"not an onnx file")
        two_scans_later()
        state, reason = index(channel)[("relu", "1")]
        assert state == "READY" and "reload failed, previous version serving" in reason and "model.onnx" in reason
        np.testing.assert_array_equal(output_array(stub(channel).ModelInfer(x, timeout=10)), np.maximum(X, 0))

        shutil.rmtree(root / "polled")  # removed
        two_scans_later()
        assert not any(n == "polled" for n, _ in index(channel))
        with pytest.raises(grpc.RpcError) as error:
            answer()
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_control_token_keeps_inference_callers_out(tmp_path: Path) -> None:
    root = tmp_path / "models"
    lrn_model(root, "lrnm", {1: 1.0})
    env = {"LRNSERVE_TOKEN": "infer-secret", "LRNSERVE_MODEL_CONTROL_TOKEN": "operator-secret"}
    inference = (("authorization", "Bearer infer-secret"),)
    operator = (("authorization", "Bearer operator-secret"),)
    with serve_process("--model-repository", str(root), env=env) as (_, target), grpc.insecure_channel(target) as ch:
        assert index(ch, operator)[("lrnm", "1")][0] == "READY"
        for metadata, code in ((inference, grpc.StatusCode.PERMISSION_DENIED), ((), grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as error:
                index(ch, metadata)
            assert error.value.code() == code
            with pytest.raises(grpc.RpcError) as error:
                unload = pb.RepositoryModelUnloadRequest(model_name="lrnm")
                stub(ch).RepositoryModelUnload(unload, timeout=10, metadata=metadata)
            assert error.value.code() == code
        response = stub(ch).ModelInfer(request("lrnm", ""), timeout=10, metadata=inference)
        np.testing.assert_allclose(output_array(response), expected(1.0), rtol=1e-6)
        with pytest.raises(grpc.RpcError) as error:  # the operator's token is not an inference token
            stub(ch).ModelInfer(request("lrnm", ""), timeout=10, metadata=operator)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
