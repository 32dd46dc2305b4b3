"""The lrnserve command line, end to end against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import ServerThread, free_port, lrn_model, settings

from lrnserve.server.cli import build_parser, settings_from_args
from lrnserve.server.ops import local_response_norm
from lrnserve.server.settings import SERVER_SETTINGS


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(settings(lrn_model())) as running:
        yield running


def lrnserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lrnserve.client.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_infer_round_trip(server: ServerThread, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = lrnserve(
        "infer", "lrn", "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
        "--target", server.target, "-p", "mode=within", "-p", "size=3", "-p", "alpha=0.5", "-p", "k=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    y = np.load(tmp_path / "y.npy")
    expected = local_response_norm(torch.from_numpy(x), 3, 0.5, 0.75, 2.0, "within").numpy()
    np.testing.assert_array_equal(y, expected)
    assert "y.npy: float32 [2, 8, 5, 5]" in result.stdout


def test_infer_server_error_is_one_line_and_exit_1(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 2, 2, 2), np.float32))
    result = lrnserve("infer", "lrn", "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
                      "--target", server.target, "-p", "alpha=-1")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "INVALID_ARGUMENT" in result.stderr and "parameters.alpha" in result.stderr


def test_health_exit_codes(server: ServerThread) -> None:
    ok = lrnserve("health", "--target", server.target)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    model = lrnserve("health", "--target", server.target, "--model", "lrn")
    assert model.returncode == 0
    unknown = lrnserve("health", "--target", server.target, "--model", "vgg")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    down = lrnserve("health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_health_not_serving_while_draining(server: ServerThread) -> None:
    server.call(server.server.health.set("lrn", False))
    try:
        result = lrnserve("health", "--target", server.target, "--model", "lrn")
        assert result.returncode == 1 and "NOT_SERVING" in result.stdout
    finally:
        server.call(server.server.health.set("lrn", True))


def test_bench_json(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = lrnserve(
        "bench", "lrn", "--target", server.target, "--shape", "1,8,6,6", "--concurrency", "1,4",
        "--duration", "0.5", "--warmup", "0.2", "--json", str(out), "-p", "size=3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "concurrency" in result.stdout and "p99 ms" in result.stdout
    assert "%" in result.stderr  # the progress bar
    document = json.loads(out.read_text())
    assert document["model"] == "lrn" and document["shape"] == [1, 8, 6, 6]
    assert [r["concurrency"] for r in document["results"]] == [1, 4]
    for r in document["results"]:
        assert r["requests"] > 0 and r["throughput"] > 0 and r["errors"] == {}
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]


def test_bench_stream(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = lrnserve(
        "bench", "lrn", "--target", server.target, "--shape", "1,8,6,6", "--concurrency", "1,8", "--stream",
        "--duration", "0.5", "--warmup", "0.2", "--json", str(out), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "one ModelStreamInfer stream" in result.stdout
    runs = json.loads(out.read_text())["results"]
    assert [r["concurrency"] for r in runs] == [1, 8]
    for r in runs:
        assert r["requests"] > 0 and r["errors"] == {}
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    failing = lrnserve(
        "bench", "lrn", "--target", server.target, "--shape", "1,2,2,2", "--concurrency", "2", "--stream",
        "--duration", "0.3", "--warmup", "0", "--json", str(out), "-p", "alpha=-1", "--quiet",
    )  # fmt: skip
    assert failing.returncode == 0, failing.stderr
    (run,) = json.loads(out.read_text())["results"]
    assert run["requests"] == 0 and run["errors"]["STREAM_ERROR"] > 0


def test_bench_counts_errors_by_code(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = lrnserve(
        "bench", "lrn", "--target", server.target, "--shape", "1,2,2,2", "--concurrency", "2",
        "--duration", "0.3", "--warmup", "0", "--json", str(out), "-p", "alpha=-1", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(out.read_text())["results"]
    assert run["requests"] == 0 and run["errors"]["INVALID_ARGUMENT"] > 0
    assert run["p50_ms"] is None


def test_load_generator_sends_each_worker_its_own_request(server: ServerThread) -> None:
    # bench/serve.py's shared memory runs give every worker its own regions this way.
    from lrnserve.client.loadgen import run_load
    from lrnserve.client.pb import grpc_predict_v2_pb2 as pb

    def request(alpha: float) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="lrn")
        message.inputs.add(name="input", datatype="FP32", shape=[1, 2, 2, 2])
        message.raw_input_contents.append(np.ones(8, np.float32).tobytes())
        message.parameters["alpha"].double_param = alpha
        return message

    result = run_load(server.target, [request(1e-4), request(-1.0)], 2, 0.3, warmup=0)
    assert result.ok > 0 and result.errors["INVALID_ARGUMENT"] > 0 and set(result.errors) == {"INVALID_ARGUMENT"}
    with pytest.raises(ValueError, match="no request"):
        run_load(server.target, [], 1, 0.1)


@pytest.mark.parametrize(
    ("given", "expected"),
    [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "active"}, None)],
)
def test_serve_lets_openmp_workers_sleep_unless_told(given: dict[str, str], expected: str | None) -> None:
    # Set by `lrnserve serve` before the server (and torch's libgomp) is imported.
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | given
    script = (
        "import os, sys; from lrnserve.client.cli import quiet_openmp_spin; quiet_openmp_spin(); "
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(expected), "False"]


@pytest.mark.parametrize("command", ["serve", "infer", "health", "bench"])
def test_help(command: str) -> None:
    result = lrnserve(command, "--help")
    assert result.returncode == 0
    assert "usage: lrnserve " + command in result.stdout


def test_serve_flags_are_the_declared_settings() -> None:
    help_text = lrnserve("serve", "--help").stdout
    flags = [flag for declared in SERVER_SETTINGS.values() for flag in declared.flag_names]
    assert {"--grpc-port", "--metrics-port", "--grace-seconds", "--grace", "--plaintext", "--no-metrics"} <= set(flags)
    for flag in flags:
        assert flag in help_text, flag
    parser = build_parser()
    given = settings_from_args(parser.parse_args(["--plaintext", "--grace", "7.5", "--grpc-port", "9100"]))
    assert (given.plaintext, given.grace_seconds, given.grpc_port) == (True, 7.5, 9100)  # --grace: an alias
    assert settings_from_args(parser.parse_args(["--plaintext", "--grace-seconds", "2"])).grace_seconds == 2.0
    assert settings_from_args(parser.parse_args(["--plaintext", "--no-metrics"])).metrics_enabled is False
    bad = lrnserve("serve", "--plaintext", "--grace", "-1")
    assert bad.returncode == 2
    assert "configuration error: --grace-seconds: expected a number >= 0" in bad.stderr, bad.stderr
    assert bad.stderr.strip().count("\n") == 0, bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "lrn", "--shape", "1,x"], "argument --shape: expected comma-separated integers"),
        (["bench", "lrn", "--shape", "1,2,3,4", "--concurrency", "0"], "argument --concurrency"),
        (["bench", "lrn", "--shape", "1,2,3,4", "--duration", "-1"], "argument --duration: expected a number > 0"),
        (["infer", "lrn", "-o", "y.npy"], "the following arguments are required: -i/--input"),
        (["infer", "lrn", "-i", "x.npy", "-o", "y.npy", "--top", "5"], "argument --top: not allowed with argument -o"),
        (["infer", "alexnet", "-i", "x.npy", "--top", "0"], "argument --top: expected an integer >= 1, got 0"),
        (["infer", "lrn", "-i", "x.npy", "-o", "y.npy", "-p", "size"], "argument -p/--parameter: expected key=value"),
        (["nope"], "invalid choice: 'nope'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_one_line_exit_2(args: list[str], message: str) -> None:
    result = lrnserve(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
