"""The classification extension and model labels: tritonclient's class_count, the SDK's
classify, the CLI's --top, every refused class count, and labels files that do not fit.

References are worked out here from each model's plain output (np.argsort), never from the
server's own top-k code.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from harness import ServerThread, infer_request, lrn_model, output_array, settings, stub

from lrnserve.client import AsyncClient, Classification, Client
from lrnserve.server import dataplane
from lrnserve.server.models.ir import ModelLoadError
from lrnserve.server.schema import ConfigError
from lrnserve.server.servables import create_servable, read_labels
from lrnserve.server.settings import ModelConfig, load_settings

CLASSES = [f"class {i}: name" for i in range(10)]  # a colon inside a label stays in the label

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    target, images, out = sys.argv[1], sys.argv[2], sys.argv[3]
    client = grpcclient.InferenceServerClient(target)
    x = np.load(images)
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    report = {}
    for model in ("labelled", "plain"):
        output = grpcclient.InferRequestedOutput("probabilities", class_count=3)
        result = client.infer(model, [tensor], outputs=[output])
        classes = result.as_numpy("probabilities")
        report[model] = {
            "shape": list(classes.shape),
            "datatype": result.get_output("probabilities").datatype,
            "classes": [[e.decode() for e in row] for row in classes],
        }
    report["scores"] = client.infer("plain", [tensor]).as_numpy("probabilities").tolist()
    try:
        client.infer("plain", [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=11)])
    except Exception as exc:
        report["too_many"] = [str(exc.status()), exc.message()]
    with open(out, "w") as fh:
        json.dump(report, fh)
    """
)


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "synset.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


@pytest.fixture(scope="module")
def server(labels: Path) -> Iterator[ServerThread]:
    models = (
        lrn_model(),
        ModelConfig(name="labelled", kind="cifar10_full", labels=labels),
        ModelConfig(name="plain", kind="cifar10_full"),
    )
    with ServerThread(settings(*models)) as running:
        yield running


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def scores(server: ServerThread, images: np.ndarray) -> np.ndarray:
    """The plain output, through the plain path."""
    with server.channel() as channel:
        return output_array(stub(channel).ModelInfer(infer_request("plain", images)))


def expected(scores: np.ndarray, k: int, with_labels: bool) -> list[list[str]]:
    """Triton's strings, worked out from the plain output: "%f" score, index, label."""
    rows = []
    for row in scores:
        best = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        rows.append([f"{float(row[i]):f}:{i}" + (f":{CLASSES[i]}" if with_labels else "") for i in best])
    return rows


def elements(raw: bytes) -> list[str]:
    """A BYTES tensor's elements, read as the extension defines them: 4-byte LE length, bytes."""
    out, offset = [], 0
    while offset < len(raw):
        size = int.from_bytes(raw[offset : offset + 4], "little")
        out.append(raw[offset + 4 : offset + 4 + size].decode("utf-8"))
        offset += 4 + size
    assert offset == len(raw)
    return out


def classification_request(k: Any, images: np.ndarray, model: str = "plain", output: str = "probabilities") -> Any:
    request = infer_request(model, images)
    parameter = request.outputs.add(name=output).parameters["classification"]
    if isinstance(k, bool):
        parameter.bool_param = k
    elif isinstance(k, int):
        parameter.int64_param = k
    elif isinstance(k, float):
        parameter.double_param = k
    elif isinstance(k, str):
        parameter.string_param = k
    return request  # k None: a parameter without a value


# ---- tritonclient ----


def test_tritonclient_class_count(server: ServerThread, images: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, server.target, str(tmp_path / "x.npy"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    plain = np.array(report["scores"], dtype=np.float32)
    assert report["labelled"] == {"shape": [3, 3], "datatype": "BYTES", "classes": expected(plain, 3, True)}
    assert report["plain"] == {"shape": [3, 3], "datatype": "BYTES", "classes": expected(plain, 3, False)}
    assert report["too_many"][0] == "StatusCode.INVALID_ARGUMENT"
    assert report["too_many"][1].startswith("outputs[0].parameters.classification: expected a class count")


def test_wire_format_is_length_prefixed_utf8(server: ServerThread, images: np.ndarray, scores: np.ndarray) -> None:
    with server.channel() as channel:
        response = stub(channel).ModelInfer(classification_request(10, images, model="labelled"))
    out = response.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "BYTES", [3, 10])
    assert elements(response.raw_output_contents[0]) == [e for row in expected(scores, 10, True) for e in row]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_datatype_is_classified(server: ServerThread, images: np.ndarray, dtype: torch.dtype) -> None:
    """The answer follows the request's datatype; its scores are that datatype's values."""
    x = torch.from_numpy(images).to(dtype)
    with server.channel() as channel:
        plain = output_array(stub(channel).ModelInfer(infer_request("labelled", x)))
        request = infer_request("labelled", x)
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
        answer = stub(channel).ModelInfer(request)
    assert elements(answer.raw_output_contents[0]) == [e for row in expected(plain, 5, True) for e in row]


def test_a_large_answer_is_made_off_the_event_loop(
    server: ServerThread, images: np.ndarray, scores: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    threaded = []
    to_thread = asyncio.to_thread

    def spy(fn: Any, *args: Any) -> Any:
        threaded.append(fn.__name__)
        return to_thread(fn, *args)

    monkeypatch.setattr(dataplane, "INLINE_CLASSES", 1)
    monkeypatch.setattr(dataplane.asyncio, "to_thread", spy)
    with server.channel() as channel:
        response = stub(channel).ModelInfer(classification_request(4, images))
    assert elements(response.raw_output_contents[0]) == [e for row in expected(scores, 4, False) for e in row]
    assert "classify" in threaded


# ---- refused class counts ----


@pytest.mark.parametrize(
    ("k", "model", "message"),
    [
        (0, "plain", "outputs[0].parameters.classification: expected a class count from 1 to 10"),
        (-2, "plain", "outputs[0].parameters.classification: expected a class count from 1 to 10"),
        (11, "plain", "outputs[0].parameters.classification: expected a class count from 1 to 10"),
        (2.5, "plain", "outputs[0].parameters.classification: expected the class count as an int64, got 2.5"),
        ("3", "plain", "outputs[0].parameters.classification: expected the class count as an int64, got '3'"),
        (True, "plain", "outputs[0].parameters.classification: expected the class count as an int64, got True"),
        (None, "plain", "outputs[0].parameters.classification: parameter has no value"),
        (3, "lrn", "outputs[0].parameters.classification: output 'output' of model 'lrn' is not [N, classes]"),
    ],
)
def test_invalid_class_count(server: ServerThread, images: np.ndarray, k: Any, model: str, message: str) -> None:
    output = "output" if model == "lrn" else "probabilities"
    request = classification_request(k, images, model=model, output=output)
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        stub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(message), caught.value.details()


def test_unknown_output_parameter_is_refused(server: ServerThread, images: np.ndarray) -> None:
    request = infer_request("plain", images)
    request.outputs.add(name="probabilities").parameters["top"].int64_param = 3
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        stub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "outputs[0].parameters.top: unknown parameter; accepted: classification, shared_memory_region, "
        "shared_memory_byte_size, shared_memory_offset"
    )


# ---- the SDK and the CLI ----


def _as_tuples(scores: np.ndarray, k: int, with_labels: bool) -> list[list[tuple[str | None, int]]]:
    return [
        [(CLASSES[i] if with_labels else None, int(i)) for i in np.argsort(-row, kind="stable")[:k]] for row in scores
    ]


def test_sdk_classify(server: ServerThread, images: np.ndarray, scores: np.ndarray) -> None:
    with Client(server.target) as client:
        labelled = client.classify("labelled", images, top=4)
        plain = client.classify("plain", images, top=2)
        single = client.classify("labelled", images[0], top=1)
    assert [[(c.label, c.index) for c in row] for row in labelled] == _as_tuples(scores, 4, True)
    assert [[(c.label, c.index) for c in row] for row in plain] == _as_tuples(scores, 2, False)
    for row, classes in zip(scores, labelled, strict=True):
        assert all(isinstance(c, Classification) for c in classes)
        np.testing.assert_allclose([c.score for c in classes], row[[c.index for c in classes]], atol=1e-6)
    label, index, score = single[0]
    assert (label, index) == _as_tuples(scores, 1, True)[0][0]
    assert score == pytest.approx(float(scores[0][index]), abs=1e-6)


def test_async_sdk_classify(server: ServerThread, images: np.ndarray, scores: np.ndarray) -> None:
    async def classify() -> Any:
        async with AsyncClient(server.target) as client:
            return await client.classify("labelled", images, top=3)

    rows = asyncio.run(classify())
    assert [[(c.label, c.index) for c in row] for row in rows] == _as_tuples(scores, 3, True)


def test_sdk_refuses_a_bad_top_before_sending(server: ServerThread, images: np.ndarray) -> None:
    with Client(server.target) as client, pytest.raises(ValueError, match="top must be an integer >= 1"):
        client.classify("plain", images, top=0)


def lrnserve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lrnserve.client.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_cli_top(server: ServerThread, images: np.ndarray, scores: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", images[:2])
    result = lrnserve("infer", "labelled", "-i", str(tmp_path / "x.npy"), "--top", "2", "--target", server.target)
    assert result.returncode == 0, result.stderr
    lines = []
    for i, row in enumerate(_as_tuples(scores[:2], 2, True)):
        lines.append(f"image {i}:")
        lines += [f"  {scores[i][index]:.6f}  {index:>6}  {label}" for label, index in row]
    assert result.stdout.splitlines() == lines


def test_cli_without_output_prints_a_summary(
    server: ServerThread, images: np.ndarray, scores: np.ndarray, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", images)
    result = lrnserve("infer", "plain", "-i", str(tmp_path / "x.npy"), "--target", server.target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "output: float32 [3, 10]"
    for i, row in enumerate(scores):
        assert lines[1 + i] == f"  sample {i}: min {row.min():.6g}  max {row.max():.6g}  argmax {int(row.argmax())}"


def test_cli_top_on_a_model_without_classes_fails_in_one_line(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 2, 3, 3), np.float32))
    result = lrnserve("infer", "lrn", "-i", str(tmp_path / "x.npy"), "--top", "1", "--target", server.target)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "is not [N, classes]" in result.stderr
    assert result.stderr.strip().count("\n") == 0


# ---- labels files ----


def test_label_count_must_match_the_classes(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("a\nb\nc\n")
    with pytest.raises(ModelLoadError) as caught:
        create_servable(ModelConfig(name="m", kind="cifar10_full", labels=short))
    assert str(caught.value) == (f"{short}: 3 labels, but output 'probabilities' has 10 classes; give one label a line")
    assert "\n" not in str(caught.value)


def test_labels_need_a_classifier_output(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("a\nb\n")
    with pytest.raises(
        ModelLoadError, match=r"labels need an output of shape \[N, classes\]; output 'y' is \[N, 2, 4\]"
    ):
        read_labels(path, "y", (2, 4))


def _config(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "lrnserve.toml"
    path.write_text(table)
    return path


def test_labels_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "synset.txt").write_text("\n".join(CLASSES))
    loaded = load_settings(
        _config(tmp_path, '[server]\nplaintext = true\n[models.m]\nkind = "cifar10_full"\nlabels = "synset.txt"\n')
    )
    assert loaded.models[0].labels == tmp_path / "synset.txt"
    assert create_servable(loaded.models[0]).labels == tuple(CLASSES)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[models.m]\nkind = "cifar10_full"\nlabels = "missing.txt"\n', "models.m.labels: file"),
        ('[models.m]\nkind = "lrn"\nlabels = "synset.txt"\n', "models.m.labels: not a setting of a 'lrn' model"),
    ],
)
def test_labels_setting_errors(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "synset.txt").write_text("a\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(_config(tmp_path, "[server]\nplaintext = true\n" + table))


def test_serve_with_a_mismatched_labels_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """``lrnserve serve`` refuses to start: exit 1, one log line naming the file and both counts."""
    (tmp_path / "synset.txt").write_text("a\nb\n")
    (tmp_path / "lrnserve.toml").write_text('[models.m]\nkind = "cifar10_full"\nlabels = "synset.txt"\n')
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
    assert len(failures) == 1, done.stderr
    assert f"{tmp_path / 'synset.txt'}: 2 labels, but output 'probabilities' has 10 classes" in failures[0]
