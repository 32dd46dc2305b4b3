"""The ModelConfig RPC (Triton's model configuration extension), read by tritonclient.

tritonclient's protobuf messages clash with lrnserve's in one process, so it runs in a child
process; the expected configurations are written out here from the settings the server got.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import torch
from harness import ServerThread, settings, stub
from test_repository import lrn_model

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.server.configuration import describe
from lrnserve.server.ops.params import LRNParams
from lrnserve.server.repository import ServedModel
from lrnserve.server.servables import create_servable
from lrnserve.server.settings import BatchingPolicy, ModelConfig, Preprocess
from lrnserve.server.transport.codec import model_config_to_proto

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tritonclient.grpc as grpcclient

    target, out = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(target)
    report = {
        "server": client.get_server_metadata(as_json=True),
        "lrn": client.get_model_config("lrn", as_json=True),
        "cifar": client.get_model_config("cifar", "1", as_json=True),
        "wide": client.get_model_config("wide", as_json=True),
        "cifar_proto_input_dims": list(client.get_model_config("cifar").config.input[0].dims),
    }
    for key, (name, version) in {"unknown": ("nope", ""), "version": ("cifar", "7")}.items():
        try:
            client.get_model_config(name, version)
        except Exception as exc:
            report[key] = [str(exc.status()), exc.message()]
    with open(out, "w") as fh:
        json.dump(report, fh)
    """
)


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "cifar_labels.txt"
    path.write_text("".join(f"class {i}\n" for i in range(10)))
    return path


@pytest.fixture(scope="module")
def server(labels: Path) -> Iterator[ServerThread]:
    models = (
        ModelConfig(
            name="lrn",
            kind="lrn",
            instances=2,
            batching=BatchingPolicy(max_batch_size=16, max_queue_delay_us=700),
            lrn=LRNParams(size=3, alpha=0.5, beta=0.6, k=2.0, mode="within"),
        ),
        ModelConfig(name="cifar", kind="cifar10_full", device="cpu", instances=3, labels=labels),
        ModelConfig(name="wide", kind="cifar10_full", device="cpu", dtype="float64", instances=1),
    )
    with ServerThread(settings(*models)) as running:
        yield running


@pytest.fixture(scope="module")
def report(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("triton") / "report.json"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, server.target, str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return cast(dict[str, Any], json.loads(out.read_text()))


def _params(**values: str) -> dict[str, dict[str, str]]:
    return {key: {"string_value": value} for key, value in values.items()}


def test_lrn_config_as_triton_reports_it(report: dict[str, Any]) -> None:
    assert report["lrn"] == {
        "config": {
            "name": "lrn",
            "platform": "pytorch",
            "backend": "pytorch",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": 16,
            "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": ["-1", "-1", "-1"]}],
            "output": [{"name": "output", "data_type": "TYPE_FP32", "dims": ["-1", "-1", "-1"]}],
            "instance_group": [{"name": "lrn_0", "count": 2, "kind": "KIND_CPU"}],
            "dynamic_batching": {"max_queue_delay_microseconds": "700"},
            "parameters": _params(
                kind="lrn", max_queue_size="256", mode="within", size="3", alpha="0.5", beta="0.6", k="2.0"
            ),
        }
    }


def test_network_config_with_labels(report: dict[str, Any], labels: Path) -> None:
    config = report["cifar"]["config"]
    assert config["name"] == "cifar" and config["max_batch_size"] == 32
    assert config["input"] == [
        {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": ["3", "32", "32"]}
    ]
    assert config["output"] == [
        {"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["10"], "label_filename": labels.name}
    ]
    assert config["instance_group"] == [{"name": "cifar_0", "count": 3, "kind": "KIND_CPU"}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "2000"}
    assert config["parameters"] == _params(kind="cifar10_full", max_queue_size="256", dtype="float32")
    assert report["cifar_proto_input_dims"] == [3, 32, 32]  # int64 dims, the batch dimension left out


def test_dtype_maps_to_the_data_type_enum(report: dict[str, Any]) -> None:
    config = report["wide"]["config"]
    assert [t["data_type"] for t in config["input"] + config["output"]] == ["TYPE_FP64", "TYPE_FP64"]
    assert "label_filename" not in config["output"][0]
    assert config["parameters"]["dtype"] == {"string_value": "float64"}


def test_server_metadata_lists_the_extensions(report: dict[str, Any]) -> None:
    assert report["server"]["extensions"] == [
        "parameters",
        "statistics",
        "model_configuration",
        "classification",
        "model_repository",
    ]


def test_unknown_model_and_version_are_not_found(report: dict[str, Any]) -> None:
    assert report["unknown"][0] == "StatusCode.NOT_FOUND" and "model 'nope'" in report["unknown"][1]
    assert report["version"][0] == "StatusCode.NOT_FOUND" and "version '7'" in report["version"][1]


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("nope", "", "model 'nope' is not served here; models: lrn, cifar, wide"),
        ("cifar", "2", "model 'cifar' has no version '2'"),
    ],
)
def test_not_found_through_a_real_channel(server: ServerThread, name: str, version: str, message: str) -> None:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        stub(channel).ModelConfig(pb.ModelConfigRequest(name=name, version=version))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert message in (caught.value.details() or "")


def test_served_version_and_no_version_both_answer(server: ServerThread) -> None:
    with server.channel() as channel:
        for version in ("", "1"):
            response = stub(channel).ModelConfig(pb.ModelConfigRequest(name="cifar", version=version))
            assert response.config.name == "cifar" and response.config.backend == "pytorch"


def test_a_gpu_model_reports_kind_gpu_and_its_device() -> None:
    """The device decides the instance kind; no GPU is needed to describe one."""
    config = ModelConfig(name="gpu", kind="cifar10_full", instances=2)
    model = ServedModel(config, torch.device("cuda", 1), servable=create_servable(config))
    model.executor = cast(Any, SimpleNamespace(instances=2))
    group = model_config_to_proto(describe(model)).config.instance_group[0]
    assert (group.kind, group.count, list(group.gpus)) == (pb.ModelInstanceGroup.KIND_GPU, 2, [1])


def test_preprocessed_inputs_report_what_the_client_sends() -> None:
    """A model that takes UINT8 NHWC images says so, as its metadata does."""
    config = ModelConfig(name="img", kind="cifar10_full", preprocess=Preprocess(input_datatype="uint8", layout="nhwc"))
    model = ServedModel(config, torch.device("cpu"), servable=create_servable(config))
    model.executor = cast(Any, SimpleNamespace(instances=1))
    tensor = model_config_to_proto(describe(model)).config.input[0]
    assert (tensor.data_type, tensor.format, list(tensor.dims)) == (
        pb.TYPE_UINT8,
        pb.ModelInput.FORMAT_NHWC,
        [32, 32, 3],
    )


POLICIES = textwrap.dedent(
    """
    import json, sys
    import tritonclient.grpc as grpcclient

    target, out = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(target)
    configs = {"picked_3": client.get_model_config("picked", "3", as_json=True)}
    for name in ("picked", "every", "latest", "plain"):
        configs[name] = client.get_model_config(name, as_json=True)
    with open(out, "w") as fh:
        json.dump({name: config["config"]["version_policy"] for name, config in configs.items()}, fh)
    """
)


def test_repository_models_report_their_version_policy(tmp_path: Path) -> None:
    """Triton's ModelVersionPolicy oneof, as config.toml states it; latest 1 without a policy."""
    root = tmp_path / "models"
    lrn_model(root, "picked", {1: 1.0, 2: 2.0, 3: 3.0}, 'version_policy = "specific"\nspecific = [3, 1]')
    lrn_model(root, "every", {1: 1.0, 2: 2.0}, 'version_policy = "all"')
    lrn_model(root, "latest", {1: 1.0, 2: 2.0, 3: 3.0}, "latest = 2")
    lrn_model(root, "plain", {1: 1.0})
    out = tmp_path / "policies.json"
    with ServerThread(settings(model_repository=root)) as server:
        result = subprocess.run(
            [sys.executable, "-c", POLICIES, server.target, str(out)], capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == {
        "picked": {"specific": {"versions": ["1", "3"]}},  # int64: strings in JSON
        "picked_3": {"specific": {"versions": ["1", "3"]}},
        "every": {"all": {}},
        "latest": {"latest": {"num_versions": 2}},
        "plain": {"latest": {"num_versions": 1}},
    }
