"""Interoperability with NVIDIA's tritonclient, a client we did not write.

tritonclient registers its own ``inference.*`` protobuf messages, which clash
with lrnserve's in one process's descriptor pool, so it runs in a child
process; the server runs here and results are compared with the op in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import ServerThread, lrn_model, settings

from lrnserve.server.ops import local_response_norm
from lrnserve.server.settings import ModelConfig

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    target, out = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(target)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "lrn_ready": client.is_model_ready("lrn"),
        "alexnet_ready": client.is_model_ready("alexnet", "1"),
        "server": client.get_server_metadata(as_json=True),
        "lrn_meta": client.get_model_metadata("lrn", as_json=True),
        "alexnet_meta": client.get_model_metadata("alexnet", as_json=True),
    }
    rng = np.random.default_rng(0)
    arrays = {}
    for dtype, wire in ((np.float32, "FP32"), (np.float16, "FP16"), (np.float64, "FP64")):
        x = (rng.standard_normal((2, 16, 7, 9)) * 10).astype(dtype)
        tensor = grpcclient.InferInput("input", list(x.shape), wire)
        tensor.set_data_from_numpy(x)
        result = client.infer(
            "lrn", [tensor], parameters={"mode": "within", "size": 3, "alpha": 0.25, "beta": 0.6, "k": 2},
            outputs=[grpcclient.InferRequestedOutput("output")],
        )
        arrays[f"x_{wire}"] = x
        arrays[f"y_{wire}"] = result.as_numpy("output")
    images = rng.standard_normal((2, 3, 227, 227)).astype(np.float32)
    tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    arrays["images"] = images
    arrays["probabilities"] = client.infer("alexnet", [tensor]).as_numpy("probabilities")
    try:
        client.infer("lrn", [tensor], parameters={"sizee": 3})
    except Exception as exc:
        report["error_status"] = exc.status()
        report["error_message"] = exc.message()
    np.savez(out + "/arrays.npz", **arrays)
    with open(out + "/report.json", "w") as fh:
        json.dump(report, fh)
    """
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(settings(lrn_model(), ModelConfig(name="alexnet", kind="alexnet"))) as running:
        yield running


@pytest.fixture(scope="module")
def triton_run(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, server.target, str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return out


def test_health_and_metadata(triton_run: Path) -> None:
    report = json.loads((triton_run / "report.json").read_text())
    assert report["live"] and report["ready"] and report["lrn_ready"] and report["alexnet_ready"]
    assert report["server"]["name"] == "lrnserve"
    lrn = report["lrn_meta"]
    assert lrn["platform"] == "pytorch"
    assert lrn["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "-1", "-1", "-1"]}]
    alexnet = report["alexnet_meta"]
    assert alexnet["inputs"][0]["shape"] == ["-1", "3", "227", "227"]
    assert alexnet["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "1000"]}


def test_errors_reach_tritonclient(triton_run: Path) -> None:
    report = json.loads((triton_run / "report.json").read_text())
    assert report["error_status"] == "StatusCode.INVALID_ARGUMENT"
    assert "parameters.sizee" in report["error_message"]


@pytest.mark.parametrize("wire", ["FP32", "FP16", "FP64"])
def test_lrn_results_equal_the_op(triton_run: Path, wire: str) -> None:
    arrays = np.load(triton_run / "arrays.npz")
    x, y = arrays[f"x_{wire}"], arrays[f"y_{wire}"]
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = local_response_norm(torch.from_numpy(x), 3, 0.25, 0.6, 2.0, "within").numpy()
    np.testing.assert_array_equal(y, expected)


def test_alexnet_results_equal_the_network(triton_run: Path, server: ServerThread) -> None:
    arrays = np.load(triton_run / "arrays.npz")
    servable = server.server.repository.get("alexnet").servable
    with torch.inference_mode():
        expected = servable.network(torch.from_numpy(arrays["images"])).numpy()  # type: ignore[union-attr]
    assert arrays["probabilities"].shape == (2, 1000)
    np.testing.assert_allclose(arrays["probabilities"], expected, rtol=1e-4, atol=1e-8)
