"""The classic LRN networks: structure as Caffe defines it, outputs, weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lrnserve.server.models import NETWORKS, LRNNetwork, caffe_avg_pool, create_network
from lrnserve.server.ops import LocalResponseNorm, LRNParams

EXPECTED = {
    # name: (input shape, classes, shape after the feature extractor)
    "alexnet": ((3, 227, 227), 1000, (256, 6, 6)),
    "caffenet": ((3, 227, 227), 1000, (256, 6, 6)),
    "googlenet": ((3, 224, 224), 1000, (1024, 1, 1)),
    "cifar10_full": ((3, 32, 32), 10, (64, 4, 4)),
    "zfnet512": ((3, 224, 224), 1000, (512, 6, 6)),
}

BVLC = LRNParams(5, 1e-4, 0.75, 1.0, "across")
LRN_LAYERS = {
    # name: [(layer, what runs right before it, right after it, params)]
    "alexnet": [("norm1", "relu1", "pool1", BVLC), ("norm2", "relu2", "pool2", BVLC)],
    "caffenet": [("norm1", "pool1", "conv2", BVLC), ("norm2", "pool2", "conv3", BVLC)],
    "googlenet": [
        ("pool1_norm1", "pool1_3x3_s2", "conv2_3x3_reduce", BVLC),
        ("conv2_norm2", "conv2_relu", "pool2_3x3_s2", BVLC),
    ],
    "cifar10_full": [
        ("norm1", "relu1", "conv2", LRNParams(3, 5e-5, 0.75, 1.0, "within")),
        ("norm2", "pool2", "conv3", LRNParams(3, 5e-5, 0.75, 1.0, "within")),
    ],
    "zfnet512": [
        ("norm1", "relu1", "pool1", LRNParams(5, 5e-4, 0.75, 2.0, "across")),
        ("norm2", "relu2", "pool2", LRNParams(5, 5e-4, 0.75, 2.0, "across")),
    ],
}


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def network(request: pytest.FixtureRequest) -> LRNNetwork:
    return create_network(request.param)


def test_all_five_networks_are_registered() -> None:
    assert set(NETWORKS) == set(EXPECTED)


def test_output_is_a_probability_distribution(network: LRNNetwork) -> None:
    input_shape, classes, features = EXPECTED[network.name]
    assert network.input_shape == input_shape
    assert network.num_classes == classes
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert tuple(network.features(x).shape) == (2, *features)
        y = network(x)
    assert y.shape == (2, classes)
    assert (y >= 0).all()
    torch.testing.assert_close(y.sum(dim=1), torch.ones(2), rtol=0, atol=1e-5)


def test_lrn_positions_and_parameters(network: LRNNetwork) -> None:
    order = [name for name, _ in network.features.named_children()]
    layers = dict(network.features.named_children())
    found = [name.removeprefix("features.") for name, _ in network.lrn_layers()]
    assert found == [spec[0] for spec in LRN_LAYERS[network.name]]
    for name, before, after, params in LRN_LAYERS[network.name]:
        index = order.index(name)
        assert order[index - 1] == before and order[index + 1] == after
        layer = layers[name]
        assert isinstance(layer, LocalResponseNorm)
        assert layer.params == params


def test_alexnet_layers_match_bvlc() -> None:
    net = create_network("alexnet")
    convs = {n: m for n, m in net.features.named_children() if isinstance(m, nn.Conv2d)}
    spec = {n: (m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.groups) for n, m in convs.items()}
    assert spec == {
        "conv1": (96, 11, 4, 0, 1),
        "conv2": (256, 5, 1, 2, 2),
        "conv3": (384, 3, 1, 1, 1),
        "conv4": (384, 3, 1, 1, 2),
        "conv5": (256, 3, 1, 1, 2),
    }
    # bvlc_alexnet's published parameter count.
    assert sum(p.numel() for p in net.parameters()) == 60_965_224


def test_googlenet_parameter_count() -> None:
    # bvlc_googlenet without its two auxiliary classifiers.
    assert sum(p.numel() for p in create_network("googlenet").parameters()) == 6_998_552


def test_intermediate_shapes_follow_caffe_ceil_mode() -> None:
    net = create_network("alexnet")
    shapes = {}
    x = torch.zeros(1, 3, 227, 227)
    for name, layer in net.features.named_children():
        x = layer(x)
        shapes[name] = tuple(x.shape[1:])
    assert shapes["conv1"] == (96, 55, 55)
    assert shapes["pool1"] == (96, 27, 27)
    assert shapes["pool2"] == (256, 13, 13)
    assert shapes["pool5"] == (256, 6, 6)
    cifar = create_network("cifar10_full")
    x = torch.zeros(1, 3, 32, 32)
    for name, layer in cifar.features.named_children():
        x = layer(x)
        shapes["cifar_" + name] = tuple(x.shape[1:])
    # floor mode would give 15, 7, 3
    assert shapes["cifar_pool1"] == (32, 16, 16)
    assert shapes["cifar_pool2"] == (32, 8, 8)
    assert shapes["cifar_pool3"] == (64, 4, 4)


def test_caffe_average_pool_divides_by_the_clipped_window() -> None:
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = caffe_avg_pool(3, 2)(x).numpy()
    # Caffe: hend = min(hstart + kernel, height + pad); pool_size = (hend - hstart) * (wend - wstart)
    height = 8
    out = int(np.ceil((height - 3) / 2)) + 1
    expected = np.zeros((1, 2, out, out))
    for ph in range(out):
        for pw in range(out):
            hs, ws = ph * 2, pw * 2
            he, we = min(hs + 3, height), min(ws + 3, height)
            window = x.numpy()[:, :, hs:he, ws:we]
            expected[:, :, ph, pw] = window.sum(axis=(2, 3)) / ((he - hs) * (we - ws))
    assert ours.shape == (1, 2, 4, 4)
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_seeded_initialisation_is_deterministic_and_reported() -> None:
    state = torch.random.get_rng_state()
    a, b = create_network("cifar10_full", seed=3), create_network("cifar10_full", seed=3)
    c = create_network("cifar10_full", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state), "global RNG must be left alone"
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.features.conv1.weight, c.features.conv1.weight)
    assert a.weights_source == "seeded random (seed=3)"
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_weights_round_trip(tmp_path: Path) -> None:
    source = create_network("cifar10_full", seed=1)
    path = tmp_path / "cifar.pt"
    torch.save(source.state_dict(), path)
    loaded = create_network("cifar10_full", seed=2, weights=path)
    assert loaded.weights_source == str(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    # A training checkpoint: the state dict nested under "state_dict", beside other entries.
    nested = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 7}, nested)
    from_checkpoint = create_network("cifar10_full", seed=3, weights=nested)
    assert from_checkpoint.weights_source == str(nested)
    saved = source.state_dict()
    restored = from_checkpoint.state_dict()
    assert list(restored) == list(saved)
    for name, tensor in saved.items():
        assert torch.equal(restored[name], tensor), name
    with torch.inference_mode():
        torch.testing.assert_close(from_checkpoint(x), source(x), rtol=0, atol=0)


def test_weights_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    state = create_network("cifar10_full").state_dict()
    renamed = dict(state)
    renamed["features.conv9.weight"] = renamed.pop("features.conv1.weight")
    torch.save(renamed, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"missing keys 'features.conv1.weight'.*unexpected keys 'features.conv9"):
        create_network("cifar10_full", weights=tmp_path / "keys.pt")
    reshaped = dict(state)
    reshaped["classifier.ip1.weight"] = torch.zeros(5, 1024)
    torch.save(reshaped, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"'classifier.ip1.weight' has shape \(5, 1024\).*expects \(10, 1024\)"):
        create_network("cifar10_full", weights=tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="does not exist"):
        create_network("cifar10_full", weights=tmp_path / "absent.pt")


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unsafe code ran",))


def test_weights_never_unpickle_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"features.conv1.weight": _Payload()}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        create_network("cifar10_full", weights=path)
    assert "unsafe code ran" not in capsys.readouterr().out


def test_unknown_network() -> None:
    with pytest.raises(ValueError, match="unknown network 'vgg16'; known: alexnet, caffenet"):
        create_network("vgg16")


def test_stock_lrn_can_be_swapped_in() -> None:
    # The benchmark builds the same network with torch's LRN; both must agree.
    ours = create_network("alexnet")
    stock = create_network("alexnet", lrn_layer=lambda p: nn.LocalResponseNorm(p.size, p.alpha, p.beta, p.k))
    assert [type(m) for _, m in stock.lrn_layers()] == [nn.LocalResponseNorm] * 2
    x = torch.randn(2, 3, 227, 227, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), stock(x), rtol=1e-4, atol=1e-7)


def _spread_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the spread of ``want``'s probabilities (seeded random
    weights give nearly uniform ones, so plain relative error would say little)."""
    return float((got - want).abs().max() / (want - want.mean(dim=1, keepdim=True)).abs().max())


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_the_served_cpu_engine_keeps_outputs_and_lrn_kernels(name: str) -> None:
    """NetworkServable.load prepacks Conv/Linear for oneDNN (ReLU fused): the same outputs as
    the plain network within float32 rounding, at several batch sizes, every LRN still ours."""
    from lrnserve.server.models.base import onednn_packing_available
    from lrnserve.server.servables import NetworkServable
    from lrnserve.server.settings import ModelConfig

    servable = NetworkServable(ModelConfig(name=name, kind=name))
    description = servable.load(torch.device("cpu"))
    reference = create_network(name)
    if onednn_packing_available():
        assert "linear layers prepared for the CPU" in description
    assert isinstance(servable.network, LRNNetwork)
    assert [type(m) for _, m in servable.network.lrn_layers()] == [LocalResponseNorm] * 2
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for batch in (1, 5, 12):  # packed for batch 1; any batch computes the same
            x = torch.randn(batch, *reference.input_shape, generator=generator)
            assert _spread_error(servable.run((), x, {}), reference(x)) < 1e-4


def test_convolutions_are_packed_for_their_input_shape() -> None:
    """oneDNN chooses a weight layout for a given input shape; packing each convolution for the
    shape it sees (GoogLeNet's, from the BVLC prototxt's geometry) spares a reorder per call."""
    from lrnserve.server.models.base import conv_input_sizes

    net = create_network("googlenet").eval()
    sizes = conv_input_sizes(net, net.input_shape)
    features = net.features
    assert sizes[features.conv1_7x7_s2] == [1, 3, 224, 224]
    assert sizes[features.conv2_3x3] == [1, 64, 56, 56]
    assert sizes[features.inception_3a.branch_3x3[1][0]] == [1, 96, 28, 28]
    assert sizes[features.inception_4e.branch_pool[1][0]] == [1, 528, 14, 14]
    assert sizes[features.inception_5b.branch_1x1[0]] == [1, 832, 7, 7]
    assert len(sizes) == 57


@pytest.mark.parametrize("kind", ["caffe", "onnx"])
def test_an_imported_graph_is_prepacked_with_the_same_outputs(kind: str, tmp_path: Path) -> None:
    """Conv, InnerProduct (Caffe) and Gemm (ONNX) nodes prepacked at load, ReLUs fused."""
    from lrnserve.server.importers import read_caffe, read_onnx
    from lrnserve.server.importers.export_onnx import export
    from lrnserve.server.models.runtime import GraphNetwork
    from lrnserve.server.servables import NetworkServable
    from lrnserve.server.settings import ModelConfig

    prototxt = Path(__file__).resolve().parent / "data" / "caffe" / "cifar10_full.deploy.prototxt"
    graph = read_caffe(prototxt)
    if kind == "caffe":
        config = ModelConfig(name="cifar", kind="caffe", prototxt=prototxt)
    else:
        path = tmp_path / "cifar.onnx"
        path.write_bytes(export(graph))
        graph = read_onnx(path)
        config = ModelConfig(name="cifar", kind="onnx", path=path)
    servable = NetworkServable(config)
    description = servable.load(torch.device("cpu"))
    from lrnserve.server.models.base import onednn_packing_available

    if onednn_packing_available():
        assert "4 convolution and linear layers prepared for the CPU" in description  # conv1-3, ip1
    reference = GraphNetwork(graph).eval()
    x = torch.randn(4, *reference.input_shape, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert _spread_error(servable.run((), x, {}), reference(x)) < 1e-4
    # The ONNX file writes within-channel LRN as standard ops (ONNX's LRN is across only).
    assert len(servable.network.lrn_layers()) == (2 if kind == "caffe" else 0)


@pytest.mark.parametrize("shape", [(2, 5, 9, 11), (1, 17, 7, 7), (3, 32, 8, 8), (1, 96, 13, 13), (2, 3, 6, 5)])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [(3, 2, 0), (3, 1, 1), (2, 2, 0), (3, 3, 1), (5, 2, 2), ((3, 2), (2, 1), (1, 0))],
)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool2d_is_torch_max_pool_in_either_layout(
    shape: tuple[int, int, int, int],
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    ceil_mode: bool,
) -> None:
    """The engine's max pool (oneDNN for NCHW, lrnserve's NHWC kernel for channels-last) against
    F.max_pool2d: a max is exact, so the same bits, -inf included, and the same layout; NaN in a
    window gives NaN on the channels-last path, as in torch (oneDNN's NCHW path skips it)."""
    from lrnserve.server.models.base import max_pool2d
    from lrnserve.server.ops import native

    kernel_lib = native.kernel()
    assert kernel_lib is not None, native.unavailable_reason()
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (3,), generator=gen)] = float("-inf")
    with_nan = x.clone()
    with_nan.view(-1)[torch.randint(0, flat.numel(), (3,), generator=gen)] = float("nan")
    for layout, given in ((torch.contiguous_format, x), (torch.channels_last, with_nan)):
        given = given.contiguous(memory_format=layout)
        want = torch.nn.functional.max_pool2d(given, kernel, stride, padding, ceil_mode=ceil_mode)
        got = max_pool2d(given, kernel, stride, padding, ceil_mode)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert got.is_contiguous(memory_format=layout)
    nhwc = with_nan.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.max_pool2d(nhwc, kernel, stride, padding, ceil_mode=ceil_mode)
    direct = kernel_lib.max_pool_nhwc(nhwc, _pair(kernel), _pair(stride), _pair(padding), tuple(want.shape[2:]))
    torch.testing.assert_close(direct, want, rtol=0, atol=0, equal_nan=True)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value
