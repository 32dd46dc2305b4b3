"""Caffe-style preprocessing by the server (``[models.NAME.preprocess]``).

The reference is Caffe's ``caffe.io.Transformer.preprocess`` written out here in numpy (cast to
float32, HWC -> CHW, channel swap, x raw_scale, - mean, x input_scale; the mean image cropped at
Caffe's offsets floor((M - H) / 2)), not lrnserve's code: a model with preprocessing fed uint8
NHWC RGB images must answer what the same model without it answers for the reference tensor.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import ServerThread, infer_request, output_array, settings, stub

from lrnserve.client import Client
from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.server.models.ir import ModelLoadError
from lrnserve.server.schema import ConfigError
from lrnserve.server.servables import create_servable
from lrnserve.server.settings import ModelConfig, Preprocess, load_settings

caffe_files = pytest.importorskip("caffe_files")

MEAN_VALUES = (104.0, 117.0, 123.0)  # BGR, as the BVLC models' mean
MEAN_IMAGE_SHAPE = (3, 37, 34)  # cropped to 32 x 32 at offsets (2, 1)


# ---- settings ----


def _load(tmp_path: Path, preprocess: str, kind: str = "cifar10_full") -> ModelConfig:
    config = tmp_path / "lrnserve.toml"
    config.write_text(
        f'[server]\nplaintext = true\n[models.m]\nkind = "{kind}"\n[models.m.preprocess]\n'
        + textwrap.dedent(preprocess)
    )
    return load_settings(config).models[0]


def test_settings_are_read_and_a_relative_mean_file_is_the_config_folders(tmp_path: Path) -> None:
    (tmp_path / "mean.binaryproto").write_bytes(b"")
    model = _load(
        tmp_path,
        """
        input_datatype = "UINT8"
        layout = "NHWC"
        channel_order = "RGB"
        mean = "mean.binaryproto"
        raw_scale = 255
        scale = 0.5
        crop = "none"
        """,
    )
    assert model.preprocess == Preprocess(
        input_datatype="uint8",
        layout="nhwc",
        channel_order="rgb",
        mean=tmp_path / "mean.binaryproto",
        raw_scale=255.0,
        scale=0.5,
        crop="none",
    )
    assert _load(tmp_path, "mean = [104, 117.0, 123]").preprocess == Preprocess(mean=MEAN_VALUES)
    assert ModelConfig(name="m", kind="cifar10_full").preprocess is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("bogus = 1", "models.m.preprocess.bogus: unknown key; expected one of input_datatype, layout"),
        ('input_datatype = "INT8"', "models.m.preprocess.input_datatype: expected one of fp32, uint8"),
        ('layout = "HWC"', "models.m.preprocess.layout: expected one of nchw, nhwc"),
        ('channel_order = "GBR"', "models.m.preprocess.channel_order: expected one of bgr, rgb"),
        ('mean = "missing.binaryproto"', "models.m.preprocess.mean: file "),
        ("mean = []", "models.m.preprocess.mean: expected a file or a non-empty list of numbers"),
        ('mean = [104, "x", 123]', "models.m.preprocess.mean[1]: expected a number"),
        ("mean = 104", "models.m.preprocess.mean: expected a non-empty string"),
        ("scale = -1", "models.m.preprocess.scale: expected a number >= 0"),
        ('raw_scale = "big"', "models.m.preprocess.raw_scale: expected a number"),
        ('crop = "random"', "models.m.preprocess.crop: expected one of center, none"),
    ],
)
def test_each_bad_key_or_value_names_the_key(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, table)
    assert str(caught.value).startswith(message), caught.value


def test_preprocess_is_a_table_of_networks_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^models\.m\.preprocess: not a setting of a 'lrn' model"):
        _load(tmp_path, 'layout = "NHWC"', kind="lrn")
    config = tmp_path / "flat.toml"
    config.write_text('[server]\nplaintext = true\n[models.m]\nkind = "cifar10_full"\npreprocess = 3\n')
    with pytest.raises(ConfigError, match=r"^models\.m\.preprocess: expected a table"):
        load_settings(config)


# ---- loading ----


@pytest.mark.parametrize(
    ("shape", "crop", "names"),
    [
        ((1, 40, 40), "center", "1x40x40"),  # channels
        ((3, 30, 40), "center", "3x30x40"),  # too small to crop
        ((3, 36, 36), "none", "3x36x36"),  # not the input's size, and no crop
    ],
)
def test_a_mean_image_that_does_not_fit_is_a_one_line_load_error(
    tmp_path: Path, shape: tuple[int, ...], crop: str, names: str
) -> None:
    path = caffe_files.write_mean(tmp_path / "mean.binaryproto", np.zeros(shape, np.float32))
    config = ModelConfig(name="m", kind="cifar10_full", preprocess=Preprocess(mean=path, crop=crop))
    with pytest.raises(ModelLoadError) as caught:
        create_servable(config)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and names in message and "3x32x32" in message


def test_mean_values_must_be_one_per_channel() -> None:
    config = ModelConfig(name="m", kind="cifar10_full", preprocess=Preprocess(mean=(1.0, 2.0)))
    with pytest.raises(ModelLoadError, match=r"models\.m\.preprocess\.mean: 2 values for the input's 3 channels"):
        create_servable(config)


# ---- serving ----


def caffe_reference(
    images: np.ndarray, mean: np.ndarray, *, nhwc: bool, swap: bool, raw_scale: float = 1.0, scale: float = 1.0
) -> np.ndarray:
    """Caffe's Transformer.preprocess for a batch: float32, transpose, channel swap, raw_scale, mean, scale."""
    x = images.astype(np.float32)
    if nhwc:
        x = x.transpose(0, 3, 1, 2)  # Transformer.set_transpose("data", (2, 0, 1)) per image
    if swap:
        x = x[:, [2, 1, 0]]  # set_channel_swap("data", (2, 1, 0))
    x = x * np.float32(raw_scale)
    x = x - mean.astype(np.float32)
    x = x * np.float32(scale)
    return np.ascontiguousarray(x, dtype=np.float32)


def uint8_request(model: str, x: np.ndarray, name: str = "input") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="UINT8", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
    return request


@pytest.fixture(scope="module")
def mean_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    mean = np.random.default_rng(7).uniform(90, 130, MEAN_IMAGE_SHAPE).astype(np.float32)
    path = tmp_path_factory.mktemp("mean") / "mean.binaryproto"
    return caffe_files.write_mean(path, mean), mean


@pytest.fixture(scope="module")
def server(mean_image: tuple[Path, np.ndarray]) -> Iterator[ServerThread]:
    def model(name: str, preprocess: Preprocess | None = None) -> ModelConfig:
        return ModelConfig(name=name, kind="cifar10_full", instances=1, preprocess=preprocess)

    image = dict(input_datatype="uint8", layout="nhwc", channel_order="rgb")
    models = (
        model("plain"),
        model("values", Preprocess(**image, mean=MEAN_VALUES, scale=0.5)),
        model("image", Preprocess(**image, mean=mean_image[0])),
        model("unit", Preprocess(mean=MEAN_VALUES, raw_scale=255.0)),  # FP32 0-1 NCHW BGR
    )
    with ServerThread(settings(*models, device="cpu")) as running:
        yield running


def _infer(server: ServerThread, request: pb.ModelInferRequest) -> np.ndarray:
    with server.channel() as channel:
        return output_array(stub(channel).ModelInfer(request, timeout=60))


def _error(server: ServerThread, request: pb.ModelInferRequest) -> grpc.RpcError:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        stub(channel).ModelInfer(request, timeout=60)
    return caught.value


IMAGES = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # NHWC RGB


def test_uint8_nhwc_rgb_images_answer_as_the_caffe_preprocessed_tensor(server: ServerThread) -> None:
    mean = np.asarray(MEAN_VALUES, np.float32).reshape(3, 1, 1)
    reference = caffe_reference(IMAGES, mean, nhwc=True, swap=True, scale=0.5)
    expected = _infer(server, infer_request("plain", reference))
    got = _infer(server, uint8_request("values", IMAGES))
    assert got.dtype == np.float32 and got.shape == (3, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    unswapped = _infer(server, infer_request("plain", caffe_reference(IMAGES, mean, nhwc=True, swap=False, scale=0.5)))
    assert np.abs(unswapped - expected).max() > 1e-4  # the check can tell a missing channel swap
    # Float images are preprocessed the same way.
    np.testing.assert_allclose(
        _infer(server, infer_request("values", IMAGES.astype(np.float32))), expected, rtol=1e-5, atol=1e-6
    )


def test_a_mean_file_is_centre_cropped_as_caffe_crops_it(
    server: ServerThread, mean_image: tuple[Path, np.ndarray]
) -> None:
    cropped = mean_image[1][:, 2:34, 1:33]  # floor((37 - 32) / 2), floor((34 - 32) / 2)
    expected = _infer(server, infer_request("plain", caffe_reference(IMAGES, cropped, nhwc=True, swap=True)))
    np.testing.assert_allclose(_infer(server, uint8_request("image", IMAGES)), expected, rtol=1e-5, atol=1e-6)


def test_raw_scale_comes_before_the_mean(server: ServerThread) -> None:
    unit = np.random.default_rng(5).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)  # BGR NCHW in 0-1
    mean = np.asarray(MEAN_VALUES, np.float32).reshape(3, 1, 1)
    expected = _infer(
        server, infer_request("plain", caffe_reference(unit, mean, nhwc=False, swap=False, raw_scale=255))
    )
    np.testing.assert_allclose(_infer(server, infer_request("unit", unit)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "request_of", "field", "expected"),
    [
        ("values", lambda: uint8_request("values", IMAGES[:, :30]), "inputs[0].shape", "[N, 32, 32, 3] (NHWC)"),
        (
            "values",
            lambda: uint8_request("values", IMAGES.transpose(0, 3, 1, 2)),  # NCHW to an NHWC model
            "inputs[0].shape",
            "expected [N, 32, 32, 3] (NHWC) for model 'values', got [3, 3, 32, 32]",
        ),
        ("values", lambda: uint8_request("values", IMAGES[0]), "inputs[0].shape", "4 dimensions [N, H, W, C]"),
        ("plain", lambda: uint8_request("plain", IMAGES), "inputs[0].datatype", "model 'plain' takes FP32"),
        ("unit", lambda: uint8_request("unit", IMAGES), "inputs[0].datatype", "got UINT8"),
        (
            "unit",
            lambda: infer_request("unit", np.zeros((1, 32, 32, 3), np.float32)),
            "inputs[0].shape",
            "expected [N, 3, 32, 32] (NCHW) for model 'unit'",
        ),
    ],
)
def test_requests_that_do_not_fit_are_invalid_argument_naming_what_to_send(
    server: ServerThread, model: str, request_of: object, field: str, expected: str
) -> None:
    error = _error(server, request_of())  # type: ignore[operator]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field) and expected in error.details(), error.details()


def test_metadata_reports_what_the_client_sends(server: ServerThread) -> None:
    with server.channel() as channel:
        service = stub(channel)
        shown = {
            name: service.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=30)
            for name in ("plain", "values", "unit")
        }
    assert [(t.datatype, list(t.shape)) for t in shown["values"].inputs] == [("UINT8", [-1, 32, 32, 3])]
    assert [(t.datatype, list(t.shape)) for t in shown["unit"].inputs] == [("FP32", [-1, 3, 32, 32])]
    assert [(t.datatype, list(t.shape)) for t in shown["plain"].inputs] == [("FP32", [-1, 3, 32, 32])]
    assert [(t.datatype, list(t.shape)) for t in shown["values"].outputs] == [("FP32", [-1, 10])]


def test_concurrent_uint8_and_float_requests_batch_apart_and_all_answer_right(server: ServerThread) -> None:
    mean = np.asarray(MEAN_VALUES, np.float32).reshape(3, 1, 1)
    expected = _infer(server, infer_request("plain", caffe_reference(IMAGES, mean, nhwc=True, swap=True, scale=0.5)))
    requests = [
        uint8_request("values", IMAGES) if i % 2 else infer_request("values", IMAGES.astype(np.float32))
        for i in range(12)
    ]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda r: _infer(server, r), requests))
    for answer in answers:
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)


def test_the_sdk_sends_uint8_images_as_they_are(server: ServerThread) -> None:
    expected = _infer(server, uint8_request("values", IMAGES))
    with Client(server.target) as client:
        answer = client.infer("values", IMAGES)
    assert answer.dtype == np.float32
    np.testing.assert_allclose(answer, expected, rtol=1e-6, atol=1e-7)
