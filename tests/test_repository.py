"""The model repository on disk and the repository extension, through tritonclient.

A folder per model (config.toml, numeric version folders), version policies, routing by
version, a model that fails to load reported without stopping the server, and Triton's
RepositoryIndex / RepositoryModelLoad (config= and files=) / RepositoryModelUnload as
``tritonclient.grpc`` calls them (in a child process: its protobuf messages clash with ours).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from harness import (
    ServerThread,
    Worker,
    gated_server,
    infer_request,
    metric_value,
    output_array,
    scrape,
    serve_process,
    settings,
    stub,
    wait_until,
)
from harness import lrn_model as harness_lrn
from onnx_files import single

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import health_pb2, health_pb2_grpc
from lrnserve.server.catalog import VersionPolicy, read_model, select_versions
from lrnserve.server.schema import ConfigError
from lrnserve.server.servables import LRNServable, Servable, create_servable
from lrnserve.server.settings import ModelConfig

X = np.linspace(0.5, 2.0, 16, dtype=np.float32).reshape(1, 4, 2, 2)


def expected(k: float, beta: float = 0.75) -> np.ndarray:
    """torch's own LRN (the same across-channel convention), not the op being served."""
    return torch.nn.functional.local_response_norm(torch.from_numpy(X), 5, alpha=1e-4, beta=beta, k=k).numpy()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def lrn_model(root: Path, name: str, versions: dict[int, float], policy: str = "") -> Path:
    """An LRN model folder whose version v answers with k = versions[v]."""
    write(root / name / "config.toml", f'kind = "lrn"\n{policy}\n')
    for version, k in versions.items():
        write(root / name / str(version) / "config.toml", f"k = {k}\n")
    return root / name


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    lrn_model(root, "latest", {1: 1.0, 2: 2.0, 3: 3.0}, "latest = 2")
    lrn_model(root, "every", {1: 1.0, 2: 2.0}, 'version_policy = "all"')
    lrn_model(root, "picked", {1: 1.0, 2: 2.0, 3: 3.0}, 'version_policy = "specific"\nspecific = [1, 3]')
    write(root / "plain" / "config.toml", 'kind = "lrn"\nk = 4.0\n')  # no version folder: version 1
    onnx_dir = root / "relu" / "1"
    onnx_dir.mkdir(parents=True)
    (onnx_dir / "model.onnx").write_bytes(single("Relu", [1, 4, 2, 2]).SerializeToString())
    write(root / "relu" / "config.toml", 'kind = "onnx"\n')  # path filled in from 1/model.onnx
    write(root / "broken" / "config.toml", 'kind = "onnx"\n')  # no model.onnx anywhere
    return root


def infer(channel: grpc.Channel, model: str, version: str = "", name: str = "input") -> tuple[str, np.ndarray]:
    request = infer_request(model, X, name=name)
    request.model_version = version
    response = stub(channel).ModelInfer(request, timeout=30)
    return response.model_version, output_array(response)


def index(channel: grpc.Channel) -> dict[tuple[str, str], tuple[str, str]]:
    response = stub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): (m.state, m.reason) for m in response.models}


def test_version_policies_pick_versions() -> None:
    assert select_versions("x", {}, [1, 2, 5]) == [5]
    assert select_versions("x", {"latest": 2}, [1, 2, 5]) == [2, 5]
    assert select_versions("x", {"version_policy": "all"}, [1, 2]) == [1, 2]
    assert select_versions("x", {"version_policy": "specific", "specific": [2]}, [1, 2]) == [2]
    with pytest.raises(ConfigError, match="no version folder"):
        select_versions("x", {"version_policy": "specific", "specific": [9]}, [1, 2])
    with pytest.raises(ConfigError, match="version_policy"):
        select_versions("x", {"version_policy": "newest"}, [1])
    with pytest.raises(ConfigError, match="specific: expected"):
        select_versions("x", {"version_policy": "specific", "specific": [True]}, [1])


def test_plans_carry_the_version_policy(repo: Path) -> None:
    """What ModelConfig reports: the policy config.toml states, Triton's latest 1 without one."""
    assert read_model("picked", repo / "picked").policy == VersionPolicy("specific", specific=(1, 3))
    assert read_model("every", repo / "every").policy == VersionPolicy("all")
    assert read_model("latest", repo / "latest").policy == VersionPolicy("latest", latest=2)
    assert read_model("plain", repo / "plain").policy == VersionPolicy("latest", latest=1)


def test_files_are_filled_in_from_the_version_folder(repo: Path) -> None:
    plan = read_model("relu", repo / "relu")
    assert plan.configs["1"].path == repo / "relu" / "1" / "model.onnx"
    with pytest.raises(ConfigError, match=r"broken.*config\.toml.*models\.broken\.path"):
        read_model("broken", repo / "broken")


def test_mode_none_serves_the_folders_by_version(repo: Path) -> None:
    with ServerThread(settings(model_repository=repo)) as server, server.channel() as channel:
        states = index(channel)
        assert states[("latest", "2")][0] == states[("latest", "3")][0] == "READY"
        assert ("latest", "1") not in states
        assert {v for (n, v) in states if n == "picked"} == {"1", "3"}
        state, reason = states[("broken", "")]
        assert state == "UNAVAILABLE" and "models.broken.path" in reason
        # Newest loaded version without a version; the named one with it.
        for model, version, k in (("latest", "", 3.0), ("latest", "2", 2.0), ("every", "1", 1.0), ("plain", "", 4.0)):
            served, y = infer(channel, model, version)
            assert served == (version or "3" if model == "latest" else version or "1")
            np.testing.assert_allclose(y, expected(k), rtol=1e-6)
        with pytest.raises(grpc.RpcError) as error:
            infer(channel, "latest", "1")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no version '1'" in str(error.value.details()) and "2, 3" in str(error.value.details())
        metadata = stub(channel).ModelMetadata(pb.ModelMetadataRequest(name="every"), timeout=10)
        assert list(metadata.versions) == ["1", "2"]
        _, y = infer(channel, "relu", name="x")
        np.testing.assert_array_equal(y, np.maximum(X, 0))
        health = health_pb2_grpc.HealthStub(channel)
        status = health_pb2.HealthCheckResponse
        assert health.Check(health_pb2.HealthCheckRequest(service="broken")).status == status.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="every")).status == status.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == status.SERVING


def test_strict_model_config_fails_start_up_with_the_reason(repo: Path) -> None:
    args = ("--model-repository", str(repo), "--strict-model-config")
    with (
        pytest.raises(RuntimeError, match=r"exited with 1[\s\S]*models\.broken\.path"),
        serve_process(*args, ready_timeout=60),
    ):
        pass


TRITON = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    target, onnx_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    client = grpcclient.InferenceServerClient(target)
    report = {"before": client.get_model_repository_index(as_json=True).get("models", [])}
    x = np.linspace(0.5, 2.0, 16, dtype=np.float32).reshape(1, 4, 2, 2)

    def infer(model, version=""):
        tensor = grpcclient.InferInput("input" if model != "uploaded" else "x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], model_version=version)
        return result.get_response().model_version, result.as_numpy(result.get_response().outputs[0].name).tolist()

    client.load_model("every")
    report["every"] = [infer("every"), infer("every", "1")]
    client.load_model("every", config=json.dumps({"kind": "lrn", "beta": 1.0}))  # override: latest only
    report["every_override"] = infer("every")
    report["ready_after_override"] = client.get_model_repository_index(as_json=True)["models"]
    with open(onnx_path, "rb") as fh:
        client.load_model("uploaded", config=json.dumps({"kind": "onnx"}), files={"file:1/model.onnx": fh.read()})
    report["uploaded"] = infer("uploaded")
    client.unload_model("uploaded")
    for call in (lambda: client.load_model("absent"), lambda: infer("uploaded"),
                 lambda: client.load_model("bad", config="{not json")):
        try:
            call()
        except Exception as exc:
            report.setdefault("errors", []).append([exc.status(), exc.message()])
    report["after"] = client.get_model_repository_index(as_json=True)["models"]
    with open(out, "w") as fh:
        json.dump(report, fh)
    """
)


@pytest.fixture
def triton_report(repo: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    onnx_path = tmp_path / "upload.onnx"
    onnx_path.write_bytes(single("Relu", [1, 4, 2, 2]).SerializeToString())
    out = tmp_path / "report.json"
    config = settings(model_repository=repo, model_control_mode="explicit")
    with ServerThread(config) as server:
        result = subprocess.run(
            [sys.executable, "-c", TRITON, server.target, str(onnx_path), str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        yield json.loads(out.read_text())


def test_tritonclient_index_load_and_unload(triton_report: dict[str, Any]) -> None:
    report = triton_report
    # Explicit mode: nothing loaded at start; every folder listed without a state.
    assert {m["name"] for m in report["before"]} == {"latest", "every", "picked", "plain", "relu", "broken"}
    assert all("state" not in m for m in report["before"])
    (v_new, y_new), (v_one, y_one) = report["every"]
    assert (v_new, v_one) == ("2", "1")
    np.testing.assert_allclose(np.array(y_new, dtype=np.float32), expected(2.0), rtol=1e-6)
    np.testing.assert_allclose(np.array(y_one, dtype=np.float32), expected(1.0), rtol=1e-6)
    # The JSON replaced config.toml (policy latest, beta 1); version 2's own config.toml still sets k.
    version, y = report["every_override"]
    assert version == "2"
    np.testing.assert_allclose(np.array(y, dtype=np.float32), expected(2.0, beta=1.0), rtol=1e-6)
    every = [m for m in report["ready_after_override"] if m["name"] == "every"]
    assert [(m["version"], m["state"]) for m in every] == [("1", "UNAVAILABLE"), ("2", "READY")]
    np.testing.assert_array_equal(np.array(report["uploaded"][1], dtype=np.float32), np.maximum(X, 0))
    (absent, gone, bad) = report["errors"]
    assert absent[0] == "StatusCode.NOT_FOUND" and "absent" in absent[1]
    assert gone[0] in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE") and "uploaded" in gone[1]
    assert bad[0] == "StatusCode.INVALID_ARGUMENT" and "parameters.config" in bad[1]
    uploaded = [m for m in report["after"] if m["name"] == "uploaded"]
    assert uploaded and all(m["state"] == "UNAVAILABLE" for m in uploaded)


def test_kserve_numbering_names_the_model_in_field_1(repo: Path) -> None:
    config = settings(model_repository=repo, model_control_mode="explicit")
    with ServerThread(config) as server, server.channel() as channel:
        # KServe's RepositoryModelLoadRequest is {model_name = 1}: our repository_name field.
        stub(channel).RepositoryModelLoad(pb.RepositoryModelLoadRequest(repository_name="plain"), timeout=30)
        assert index(channel)[("plain", "1")][0] == "READY"
        stub(channel).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(repository_name="plain"), timeout=30)
        assert index(channel)[("plain", "1")] == ("UNAVAILABLE", "unloaded")
        with pytest.raises(grpc.RpcError) as error:
            stub(channel).RepositoryModelLoad(pb.RepositoryModelLoadRequest(repository_name=repo.name), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_configured_models_reload_and_unload_and_metrics_follow(repo: Path) -> None:
    with ServerThread(settings(harness_lrn(), model_control_mode="explicit")) as server, server.channel() as channel:
        assert index(channel)[("lrn", "1")] == ("READY", "")
        load = pb.RepositoryModelLoadRequest(model_name="lrn")
        load.parameters["config"].string_param = json.dumps({"k": 4.0})  # replaces the configured table
        stub(channel).RepositoryModelLoad(load, timeout=30)
        np.testing.assert_allclose(infer(channel, "lrn")[1], expected(4.0), rtol=1e-6)
        bad = pb.RepositoryModelLoadRequest(model_name="lrn")
        bad.parameters["config"].string_param = json.dumps({"k": -1.0})
        with pytest.raises(grpc.RpcError) as error:
            stub(channel).RepositoryModelLoad(bad, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "models.lrn.k" in str(error.value.details())
        state, reason = index(channel)[("lrn", "1")]
        assert state == "READY" and reason.startswith("reload failed, previous version serving")
        np.testing.assert_allclose(infer(channel, "lrn")[1], expected(4.0), rtol=1e-6)  # still the good one
        stub(channel).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lrn"), timeout=30)
        with pytest.raises(grpc.RpcError) as error:
            infer(channel, "lrn")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert server.server.metrics_port is not None
        text = scrape(server.server.metrics_port)
        assert metric_value(text, "lrnserve_model_state", model="lrn", version="1", state="UNAVAILABLE") == 1
        assert metric_value(text, "lrnserve_model_state", model="lrn", version="1", state="READY") is None
        assert metric_value(text, "lrnserve_model_loads_total", model="lrn") == 2  # start-up, the reload
        assert metric_value(text, "lrnserve_model_load_failures_total", model="lrn") == 1


def test_unload_lets_queued_requests_finish_first() -> None:
    server, probes = gated_server(settings(harness_lrn(), model_control_mode="explicit"))
    with server, server.channel() as channel:
        probe = probes["lrn"]
        probe.gate.clear()  # the next batch waits inside the model
        try:
            running = Worker(infer, channel, "lrn")
            wait_until(probe.started.is_set, "a batch is running")
            unload = pb.RepositoryModelUnloadRequest(model_name="lrn")
            unloading = Worker(lambda: stub(channel).RepositoryModelUnload(unload, timeout=30))
            wait_until(lambda: index(channel)[("lrn", "1")][0] == "UNLOADING", "unload began")
            with pytest.raises(grpc.RpcError) as error:  # routing is gone at once...
                infer(channel, "lrn")
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert running.thread.is_alive() and unloading.thread.is_alive()
        finally:
            probe.gate.set()  # ...while the running request still gets its answer
        version, y = running.result()
        assert version == "1"
        np.testing.assert_allclose(y, expected(1.0), rtol=1e-6)
        unloading.result()
        assert index(channel)[("lrn", "1")] == ("UNAVAILABLE", "unloaded")


def test_control_settings_from_flags_variables_and_file(repo: Path, tmp_path: Path) -> None:
    from lrnserve.server.cli import build_parser, settings_from_args
    from lrnserve.server.settings import load_settings

    flags = ["--load-model", "every", "--load-model", "plain,relu", "--repository-poll-secs", "0.5"]
    args = build_parser().parse_args(
        ["--plaintext", "--model-repository", str(repo), "--model-control-mode", "explicit", *flags]
    )
    loaded = settings_from_args(args)
    assert loaded.model_repository == repo and loaded.model_control_mode == "explicit"
    assert loaded.load_model == ("every", "plain", "relu") and loaded.repository_poll_secs == 0.5
    env = {"LRNSERVE_PLAINTEXT": "1", "LRNSERVE_LOAD_MODEL": "a, b", "LRNSERVE_STRICT_MODEL_CONFIG": "true"}
    assert load_settings(env=env).load_model == ("a", "b") and load_settings(env=env).strict_model_config
    config = write(tmp_path / "server.toml", '[server]\nplaintext = true\nmodel_repository = "models"\n')
    assert load_settings(config).model_repository == tmp_path / "models"
    with pytest.raises(ConfigError, match="LRNSERVE_MODEL_CONTROL_MODE"):
        load_settings(env={**env, "LRNSERVE_MODEL_CONTROL_MODE": "sometimes"})
    with pytest.raises(ConfigError, match=r"LRNSERVE_MODEL_REPOSITORY.*does not exist"):
        load_settings(env={**env, "LRNSERVE_MODEL_REPOSITORY": str(tmp_path / "nowhere")})


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


@pytest.mark.parametrize(("mode", "use_repository"), [("none", True), ("poll", True), ("none", False)])
def test_load_and_unload_are_refused_outside_explicit_mode(repo: Path, mode: str, use_repository: bool) -> None:
    """Triton's rule: only explicit mode lets an operator load and unload; the index stays open."""
    where = {"model_repository": repo} if use_repository else {}
    config = settings(harness_lrn("plain"), model_control_mode=mode, **where)
    with ServerThread(config) as server, server.channel() as channel:
        load, unload = (
            pb.RepositoryModelLoadRequest(model_name="plain"),
            pb.RepositoryModelUnloadRequest(model_name="plain"),
        )
        calls = (
            lambda: stub(channel).RepositoryModelLoad(load, timeout=10),
            lambda: stub(channel).RepositoryModelUnload(unload, timeout=10),
        )
        for call in calls:
            error = refused(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            details = str(error.details())
            assert details.startswith("explicit model load / unload is not allowed") and f"'{mode}'" in details
            assert "--model-control-mode explicit" in details
        assert index(channel)[("plain", "1")] == ("READY", "")  # still served: nothing was unloaded
        assert infer(channel, "plain")[0] == "1"


class GatedLoad(LRNServable):
    """An LRN model whose load waits until ``gate`` opens: the slow model of a repository."""

    def __init__(self, config: ModelConfig, gate: threading.Event) -> None:
        super().__init__(config)
        self._gate = gate

    def load(self, device: torch.device) -> str:
        assert self._gate.wait(timeout=60), "the test never let the slow model load"
        return super().load(device)


class StartingServer(ServerThread):
    """A ServerThread whose start-up is left running, for a test to watch models load."""

    def begin(self) -> Future[None]:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)


def index_now(channel: grpc.Channel) -> dict[tuple[str, str], tuple[str, str]]:
    """The index, or nothing while the server does not answer yet."""
    try:
        return index(channel)
    except grpc.RpcError:
        return {}


@pytest.mark.parametrize("mode", ["none", "explicit"])
def test_a_slow_model_does_not_delay_the_others_at_start(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "models"
    lrn_model(root, "a_slow", {1: 1.0})  # first by name: loaded one after another, it would hold up the rest
    lrn_model(root, "b_fast", {1: 2.0})
    gate = threading.Event()

    def servables(config: ModelConfig) -> Servable:
        return GatedLoad(config, gate) if config.name == "a_slow" else create_servable(config)

    config = settings(model_repository=root, model_control_mode=mode, load_model=("a_slow", "b_fast"))
    server = StartingServer(config, servables=servables)
    try:
        starting = server.begin()
        wait_until(lambda: server.server.grpc_port, "the server listens")
        with server.channel() as channel:

            def fast_ready() -> bool:
                return index_now(channel).get(("b_fast", "1"), ("",))[0] == "READY"

            wait_until(fast_ready, "b_fast ready while a_slow still loads", timeout=30)
            assert index(channel)[("a_slow", "1")][0] == "LOADING"
            np.testing.assert_allclose(infer(channel, "b_fast")[1], expected(2.0), rtol=1e-6)
            assert not starting.done()
            gate.set()
            starting.result(timeout=60)
            assert index(channel)[("a_slow", "1")] == ("READY", "")
            np.testing.assert_allclose(infer(channel, "a_slow")[1], expected(1.0), rtol=1e-6)
    finally:
        gate.set()
        server.stop()


def statistics(channel: grpc.Channel, name: str = "", version: str = "") -> dict[tuple[str, str], Any]:
    request = pb.ModelStatisticsRequest(name=name, version=version)
    return {(s.name, s.version): s for s in stub(channel).ModelStatistics(request, timeout=10).model_stats}


def test_statistics_count_each_served_version_apart(repo: Path) -> None:
    with ServerThread(settings(model_repository=repo)) as server, server.channel() as channel:
        for version in ("1", "1", "2", "2", "2", ""):  # "" goes to the newest, 2
            infer(channel, "every", version)
        bad = infer_request("every", X, {"alpha": -1.0})
        bad.model_version = "1"
        assert refused(lambda: stub(channel).ModelInfer(bad, timeout=10)).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused(lambda: infer(channel, "every", "7")).code() == grpc.StatusCode.NOT_FOUND  # no version's

        every = statistics(channel, "every")
        assert list(every) == [("every", "1"), ("every", "2")]
        counts = {v: (s.inference_stats.success.count, s.inference_stats.fail.count) for (_, v), s in every.items()}
        assert counts == {"1": (2, 1), "2": (4, 0)}
        assert (every["every", "1"].inference_count, every["every", "2"].inference_count) == (2, 4)
        assert (every["every", "1"].execution_count, every["every", "2"].execution_count) == (2, 4)

        (one,) = statistics(channel, "every", "1").values()  # a version named: that version's alone
        assert (one.version, one.inference_stats.success.count) == ("1", 2)
        served = set(statistics(channel))
        assert {("latest", "2"), ("latest", "3"), ("picked", "1"), ("picked", "3"), ("every", "1")} <= served
        assert ("latest", "1") not in served and not any(name == "broken" for name, _ in served)
        assert refused(lambda: statistics(channel, "every", "7")).code() == grpc.StatusCode.NOT_FOUND


def test_unload_logs_the_memory_it_gave_back(caplog: pytest.LogCaptureFixture) -> None:
    config = settings(harness_lrn(), model_control_mode="explicit")
    with caplog.at_level(logging.INFO, logger="lrnserve.server.control"):
        with ServerThread(config) as server, server.channel() as channel:
            stub(channel).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lrn"), timeout=30)
        lines = [r.getMessage() for r in caplog.records if r.name == "lrnserve.server.control"]
    unloaded = [line for line in lines if "unloaded" in line]
    assert len(unloaded) == 1 and re.fullmatch(r"model lrn unloaded; RSS \d+ MiB -> \d+ MiB", unloaded[0]), lines
