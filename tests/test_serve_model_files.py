"""End to end: a server started from a TOML file naming a Caffe and an ONNX model file.

The Caffe model is the real cifar10_full deploy prototxt with a caffemodel this test writes;
the ONNX model is a small LRN CNN built with onnx.helper that declares batch 1 and bakes it into
a Reshape target, as the Model Zoo files do. Both answer tritonclient (a client we did not
write, in a child process: its protobuf messages clash with lrnserve's in one process) and the
SDK, with N = 1 and N > 1, and concurrent callers share a batch. References: onnxruntime for
the ONNX model, the built-in cifar10_full network loaded with the same caffemodel for Caffe.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import caffe_files
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from harness import ServerThread, join_all, wait_until

from lrnserve.client import Client
from lrnserve.server.importers import built_in_network
from lrnserve.server.servables import NetworkServable, Servable, create_servable
from lrnserve.server.settings import ModelConfig, load_settings
from lrnserve.server.work import Abandonment

PROTOTXTS = Path(__file__).resolve().parent / "data" / "caffe"
CIFAR = PROTOTXTS / "cifar10_full.deploy.prototxt"

TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    target, folder = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(target)
    report = {}
    for model, x_name, y_name in (("cifar", "data", "prob"), ("tiny", "images", "scores")):
        report[model] = client.get_model_metadata(model, as_json=True)
        for n in (1, 3):
            x = np.load(f"{folder}/{model}_x{n}.npy")
            tensor = grpcclient.InferInput(x_name, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(y_name)])
            np.save(f"{folder}/{model}_y{n}.npy", result.as_numpy(y_name))
    print(json.dumps(report))
    """
)


def tiny_onnx(path: Path) -> None:
    """Conv -> Relu -> LRN -> MaxPool (Caffe-style asymmetric end pads) -> Reshape [1, -1] ->
    Gemm -> Softmax, declared batch 1, opset 9."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weights = {
        "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "b": rng.standard_normal(8).astype(np.float32) * 0.1,
        "fw": rng.standard_normal((10, 8 * 8 * 8)).astype(np.float32) * 0.05,
        "fb": rng.standard_normal(10).astype(np.float32) * 0.1,
        "shape": np.array([1, -1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("LRN", ["r"], ["n"], size=5, alpha=1e-2, beta=0.75, bias=1.0),
        helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["g"], transB=1),
        helper.make_node("Softmax", ["g"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class GatedNetwork(NetworkServable):
    """A network whose batches wait for ``gate``; records each batch's size."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.batch_sizes: list[int] = []

    def run(
        self,
        group: Hashable,
        x: torch.Tensor,
        scalars: Mapping[str, torch.Tensor],
        abandonment: Abandonment | None = None,
    ) -> torch.Tensor:
        self.started.set()
        assert self.gate.wait(timeout=30), "test gate never opened"
        self.batch_sizes.append(x.shape[0])
        return super().run(group, x, scalars, abandonment)


class Factory:
    def __init__(self) -> None:
        self.made: dict[str, Servable] = {}

    def __call__(self, config: ModelConfig) -> Servable:
        servable = GatedNetwork(config) if config.kind in ("caffe", "onnx") else create_servable(config)
        self.made[config.name] = servable
        return servable


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    (folder / "models" / "cifar").mkdir(parents=True)
    shutil.copy(CIFAR, folder / "models" / "cifar" / "deploy.prototxt")
    net = caffe_files.parse_net(CIFAR.read_text())
    _, weights = caffe_files.caffe_forward(net, np.zeros((1, 3, 32, 32)), seed=3)
    caffe_files.write_caffemodel(
        folder / "models" / "cifar" / "cifar.caffemodel", weights, types=caffe_files.layer_types(net)
    )
    tiny_onnx(folder / "models" / "tiny.onnx")
    (folder / "lrnserve.toml").write_text(
        textwrap.dedent(
            """
            [server]
            plaintext = true

            [models.cifar]
            kind = "caffe"
            prototxt = "models/cifar/deploy.prototxt"
            weights = "models/cifar/cifar.caffemodel"
            instances = 1
            max_queue_delay_us = 0

            [models.tiny]
            kind = "onnx"
            path = "models/tiny.onnx"
            instances = 1
            max_queue_delay_us = 0
            """
        )
    )
    return folder


@pytest.fixture(scope="module")
def served(model_folder: Path) -> Iterator[tuple[ServerThread, Factory]]:
    settings = load_settings(config=model_folder / "lrnserve.toml")
    settings = replace(settings, host="127.0.0.1", grpc_port=0, metrics_port=0, grace_seconds=5.0)
    factory = Factory()
    with ServerThread(settings, servables=factory) as running:
        yield running, factory


def references(model_folder: Path, model: str, x: np.ndarray) -> np.ndarray:
    """onnxruntime per sample (the file declares batch 1); the built-in cifar10_full with the
    same caffemodel."""
    if model == "tiny":
        session = ort.InferenceSession(str(model_folder / "models" / "tiny.onnx"), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"images": x[i : i + 1]})[0] for i in range(len(x))])
    network = built_in_network("cifar10_full", model_folder / "models" / "cifar" / "cifar.caffemodel")
    with torch.inference_mode():
        return network(torch.from_numpy(x)).numpy()


SHAPES = {"cifar": (3, 32, 32), "tiny": (3, 16, 16)}


def inputs(model: str, n: int, seed: int) -> np.ndarray:
    scale = 30.0 if model == "cifar" else 1.0  # cifar10 takes 0-255 pixels minus the mean
    return (np.random.default_rng(seed).standard_normal((n, *SHAPES[model])) * scale).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert float(np.abs(actual - expected).max()) <= 1e-4 * scale, (actual, expected)


def test_tritonclient_sees_the_files_names_and_gets_their_answers(
    served: tuple[ServerThread, Factory], model_folder: Path, tmp_path: Path
) -> None:
    running, _ = served
    arrays = {}
    for model in ("cifar", "tiny"):
        for n in (1, 3):
            arrays[(model, n)] = inputs(model, n, seed=n)
            np.save(tmp_path / f"{model}_x{n}.npy", arrays[(model, n)])
    done = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, running.target, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    cifar, tiny = report["cifar"], report["tiny"]
    assert [(t["name"], t["shape"]) for t in cifar["inputs"]] == [("data", ["-1", "3", "32", "32"])]
    assert [(t["name"], t["shape"]) for t in cifar["outputs"]] == [("prob", ["-1", "10"])]
    assert [(t["name"], t["shape"]) for t in tiny["inputs"]] == [("images", ["-1", "3", "16", "16"])]
    assert [(t["name"], t["shape"]) for t in tiny["outputs"]] == [("scores", ["-1", "10"])]
    for model in ("cifar", "tiny"):
        for n in (1, 3):
            served_y = np.load(tmp_path / f"{model}_y{n}.npy")
            assert_close(served_y, references(model_folder, model, arrays[(model, n)]))


@pytest.mark.parametrize("model", ["cifar", "tiny"])
def test_concurrent_sdk_callers_share_a_batch(
    served: tuple[ServerThread, Factory], model_folder: Path, model: str
) -> None:
    """One batch is held; three callers (N = 1, 2, 1) queue behind it and then run as one batch of 4."""
    running, factory = served
    servable = factory.made[model]
    assert isinstance(servable, GatedNetwork)
    batcher = running.server.repository.get(model).batcher
    assert batcher is not None
    servable.batch_sizes.clear()
    servable.started.clear()
    servable.gate.clear()
    sizes = [1, 1, 2, 1]
    xs = [inputs(model, n, seed=10 + i) for i, n in enumerate(sizes)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            with Client(running.target, timeout=60) as client:
                results[index] = np.array(client.infer(model, xs[index]))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    first = threading.Thread(target=call, args=(0,))
    others = [threading.Thread(target=call, args=(i,)) for i in (1, 2, 3)]
    started = [first]
    try:
        first.start()
        assert servable.started.wait(30), "the first batch never started"
        for thread in others:
            thread.start()
            started.append(thread)
        wait_until(lambda: batcher.queue_depth == 3, "three requests queued behind the held batch", timeout=30)
    finally:
        servable.gate.set()
        join_all(started)
    assert not errors, errors
    assert servable.batch_sizes == [1, 4]
    for index, x in enumerate(xs):
        assert_close(results[index], references(model_folder, model, x))


BAD_FILES = {
    "unsupported layer": (
        "caffe",
        'name: "n" input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
        'layer { name: "act" type: "PReLU" bottom: "data" top: "act" }\n',
        "layer 'act' (PReLU): layer type 'PReLU' is not supported; supported: BatchNorm, Concat",
    ),
    "truncated onnx": ("onnx", None, "tiny.onnx"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_a_bad_model_file_stops_start_up_with_one_line(model_folder: Path, tmp_path: Path, case: str) -> None:
    """``lrnserve serve`` refuses to start: exit 1, the reason in one log line naming the file and
    the layer, and no traceback."""
    kind, text, expected = BAD_FILES[case]
    if kind == "caffe":
        assert text is not None
        (tmp_path / "net.prototxt").write_text(text)
        table = 'kind = "caffe"\nprototxt = "net.prototxt"\n'
    else:
        data = (model_folder / "models" / "tiny.onnx").read_bytes()
        (tmp_path / "tiny.onnx").write_bytes(data[: len(data) // 2])
        table = 'kind = "onnx"\npath = "tiny.onnx"\n'
    (tmp_path / "lrnserve.toml").write_text(f"[models.bad]\n{table}")
    command = [sys.executable, "-m", "lrnserve.client.cli", "serve", "--plaintext", "--host", "127.0.0.1"]
    done = subprocess.run(
        [*command, "--grpc-port", "0", "--metrics-port", "0", "--config", str(tmp_path / "lrnserve.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    failures = [line for line in done.stderr.splitlines() if "start-up failed" in line]
    assert len(failures) == 1 and expected in failures[0], done.stderr
