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
from harness import join_all, output_array, serve_process, stub, wait_until
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
    root = tmp_path / "models"
    root.mkdir()
    args = ("--model-repository", str(root), "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    with serve_process(*args) as (_, target), grpc.insecure_channel(target) as channel:

        def answer() -> np.ndarray:
            return output_array(stub(channel).ModelInfer(request("polled", ""), timeout=10))

        lrn_model(root, "polled", {1: 1.0})  # added
        wait_until(lambda: index(channel).get(("polled", "1"), ("",))[0] == "READY", "new folder loaded", 10)
        np.testing.assert_allclose(answer(), expected(1.0), rtol=1e-6)
        write(root / "polled" / "1" / "config.toml", "k = 2.5\n")  # changed
        wait_until(lambda: np.allclose(answer(), expected(2.5), rtol=1e-6), "changed folder reloaded", 10)
        write(root / "polled" / "config.toml", 'kind = "lrn"\nk = [')  # broken: the old one keeps serving
        wait_until(lambda: "invalid TOML" in index(channel)[("polled", "1")][1], "broken config reported", 10)
        assert index(channel)[("polled", "1")][0] == "READY"
        np.testing.assert_allclose(answer(), expected(2.5), rtol=1e-6)
        write(root / "polled" / "config.toml", 'kind = "lrn"\nbeta = 1.0\n')  # repaired
        wait_until(lambda: index(channel)[("polled", "1")] == ("READY", ""), "repaired config loaded", 10)
        want = expected(2.5, beta=1.0)
        np.testing.assert_allclose(answer(), want, rtol=1e-6)
        shutil.rmtree(root / "polled")  # removed
        wait_until(lambda: not any(n == "polled" for n, _ in index(channel)), "removed folder unloaded", 10)
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
