"""A small network as one native call (models/chain.py, csrc/chain.cpp, csrc/conv.cpp), checked
against torch's own layers in float64 with the LRN loop reference (tests/reference.py)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from caffe_files import caffe_forward, layer_types, parse_net, write_caffemodel
from harness import other_build
from onnx import helper
from onnx_files import model as onnx_model
from onnx_files import ort_run, relative_error
from torch import nn

from lrnserve.server.importers import read_caffe, read_onnx
from lrnserve.server.importers.export_onnx import export
from lrnserve.server.models import chain, create_network
from lrnserve.server.models.runtime import GraphNetwork
from lrnserve.server.ops import native
from lrnserve.server.ops.lrn import LocalResponseNorm
from lrnserve.server.servables import NetworkServable
from lrnserve.server.settings import ModelConfig
from lrnserve.server.work import Abandonment, BatchAbandoned
from reference import lrn_reference

SHARED = Path(__file__).resolve().parent / "data" / "caffe"  # the BVLC deploy prototxts


def kernel() -> native.NativeKernel:
    found = native.kernel()
    assert found is not None, native.unavailable_reason()
    return found


def reference_forward(modules: Sequence[nn.Module], x: torch.Tensor) -> np.ndarray:
    """The modules applied in float64 by torch, each LRN by the loop reference."""
    h = x.double()
    with torch.no_grad():
        for module in modules:
            if isinstance(module, LocalResponseNorm):
                p = module.params
                h = torch.from_numpy(lrn_reference(h.numpy(), p.size, p.alpha, p.beta, p.k, p.mode))
            else:
                h = copy.deepcopy(module).double().eval()(h)
    return h.numpy()


def assert_close(got: torch.Tensor, want: np.ndarray, tolerance: float = 2e-6) -> None:
    assert tuple(got.shape) == want.shape
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got.double().numpy() / scale, want / scale, rtol=0, atol=tolerance)


# ---- the convolution kernel ----

CONVS = [
    # N, C, H, W, out channels, kernel, stride, padding
    (1, 3, 32, 32, 32, 5, 1, 2),  # cifar10's conv1
    (2, 5, 11, 9, 17, 3, 2, 1),  # output channels past a block, rows not a whole tile
    (1, 1, 7, 7, 3, 1, 1, 0),
    (3, 16, 8, 8, 40, 5, 1, 2),
    (1, 8, 13, 13, 33, 3, 3, 0),
    (2, 4, 6, 10, 16, 7, 1, 3),
]


def run_conv(found: native.NativeKernel, case: tuple[int, ...], relu: bool, seed: int) -> None:
    n, c, h, w, oc, k, stride, pad = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(oc, c, k, k, generator=gen) / (c * k * k) ** 0.5
    bias = torch.randn(oc, generator=gen)
    block = found.conv_block
    packed = chain.pack_conv_weight(weight, block)
    got = found.conv_nhwc(
        x.contiguous(memory_format=torch.channels_last), packed, chain.pack_conv_bias(bias, oc, block), oc,
        (k, k), (stride, stride), (pad, pad), relu,
    )  # fmt: skip
    want = F.conv2d(x.double(), weight.double(), bias.double(), stride, pad)
    if relu:
        want = F.relu(want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, want.numpy())


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("relu", [False, True])
def test_conv_kernel_matches_torch(case: tuple[int, ...], relu: bool) -> None:
    run_conv(kernel(), case, relu, seed=sum(case))


def test_conv_kernel_relu_keeps_nan() -> None:
    found = kernel()
    x = torch.zeros(1, 1, 3, 3).contiguous(memory_format=torch.channels_last)
    x[0, 0, 1, 1] = float("nan")
    weight = torch.ones(2, 1, 1, 1)
    weight[1] = -1.0
    block = found.conv_block
    bias = chain.pack_conv_bias(torch.tensor([0.0, 0.0]), 2, block)
    got = found.conv_nhwc(x, chain.pack_conv_weight(weight, block), bias, 2, (1, 1), (1, 1), (0, 0), True)
    assert torch.isnan(got[0, :, 1, 1]).all()  # like torch.relu: NaN stays
    assert (got[0, :, 0, 0] == 0).all()


@pytest.mark.parametrize("target", ["x86-64-v3", None])
def test_conv_kernel_and_chain_other_builds(target: str | None, tmp_path: Path) -> None:
    # This CPU's build tiles 8 pixels by 32 channels with AVX-512; the AVX2 and compiler-default
    # builds tile 6 by 16, so they are built and checked here too.
    found = other_build(target, tmp_path)
    for case in CONVS:
        run_conv(found, case, relu=True, seed=1)
    modules = small_network()
    x = torch.randn(2, 3, 17, 15, generator=torch.Generator().manual_seed(2))
    assert_close(chain.from_modules(modules, (3, 17, 15), found)(x), reference_forward(modules, x))


# ---- whole chains ----


def small_network() -> list[nn.Module]:
    """Every layer kind the chain runs, with padding, strides and ceil-mode windows."""
    torch.manual_seed(0)
    return [
        nn.Conv2d(3, 20, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.ReLU(),
        LocalResponseNorm(3, 5e-3, 0.75, 1.0, "within"),
        nn.Conv2d(20, 24, 3, stride=2, padding=1),
        nn.AvgPool2d(3, 2, padding=1, ceil_mode=True),
        LocalResponseNorm(5, 1e-2, 0.75, 2.0, "across"),
        nn.AvgPool2d(2, 1, padding=1, count_include_pad=False),
        nn.Flatten(),
        nn.Linear(24 * 4 * 4, 30),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(30, 7),
        nn.Softmax(dim=1),
    ]


@pytest.mark.parametrize("samples", [1, 3])
def test_a_chain_of_every_layer_kind_matches_torch(samples: int) -> None:
    modules = small_network()
    x = torch.randn(samples, 3, 17, 15, generator=torch.Generator().manual_seed(samples))
    built = chain.from_modules(modules, (3, 17, 15), kernel())
    assert [layer.code for layer in built.layers] == [
        chain.CONV, chain.MAX_POOL, chain.RELU, chain.LRN, chain.CONV, chain.AVG_POOL, chain.LRN, chain.AVG_POOL,
        chain.LINEAR, chain.LINEAR, chain.SOFTMAX,
    ]  # fmt: skip
    with torch.inference_mode():
        assert_close(built(x), reference_forward(modules, x))
        logits = modules[:-1]  # the probabilities of random weights are flat: check the logits too
        assert_close(chain.from_modules(logits, (3, 17, 15), kernel())(x), reference_forward(logits, x))


def test_a_chain_may_end_in_a_feature_map() -> None:
    modules = small_network()[:5]
    x = torch.randn(2, 3, 17, 15, generator=torch.Generator().manual_seed(4))
    built = chain.from_modules(modules, (3, 17, 15), kernel())
    got = built(x)
    assert built.output_shape == (20, 8, 7)
    assert got.is_contiguous()  # NCHW, as the layers would give it
    assert_close(got, reference_forward(modules, x))


def test_a_chain_checks_its_input() -> None:
    built = chain.from_modules(small_network(), (3, 17, 15), kernel())
    with pytest.raises(ValueError, match=r"expected float32 \[N, 3, 17, 15\]"):
        built(torch.zeros(1, 3, 17, 16))
    with pytest.raises(ValueError, match="float32"):
        built(torch.zeros(1, 3, 17, 15, dtype=torch.float64))


@pytest.mark.parametrize(
    ("modules", "reason"),
    [
        ([nn.Conv2d(4, 8, 3, groups=2)], "one group"),
        ([nn.Conv2d(4, 8, 3, dilation=2)], "no dilation"),
        ([nn.Conv2d(4, 8, 3), nn.Tanh()], "Tanh"),
        ([nn.Conv2d(4, 8, 3), nn.Linear(8, 2)], "Linear"),  # not flattened
        ([nn.Conv2d(4, 8, 3, padding="same")], "padding 'same'"),
        ([nn.Conv2d(4, 2048, 11)], "multiply-adds a sample"),  # oneDNN is faster there
    ],
)
def test_what_a_chain_refuses(modules: list[nn.Module], reason: str) -> None:
    with pytest.raises(chain.NotChainable, match=reason):
        chain.from_modules(modules, (4, 32, 32), kernel())


# ---- servables ----


class Counting:
    """Stands in for a servable's chain: counts its calls."""

    def __init__(self, wrapped: chain.NativeChain) -> None:
        self.wrapped = wrapped
        self.max_batch = wrapped.max_batch
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.wrapped(x)


def test_cifar10_runs_small_batches_as_one_call_and_larger_ones_layer_by_layer() -> None:
    servable = NetworkServable(ModelConfig(name="cifar10_full", kind="cifar10_full"))
    described = servable.load(torch.device("cpu"))
    assert servable.chain is not None
    assert f"11 layers as one native call up to batch {servable.chain.max_batch}" in described
    assert servable.chain.max_batch == chain.CHAIN_MAX_MACS // servable.chain.macs >= 1
    counting = Counting(servable.chain)
    servable.chain = counting  # type: ignore[assignment]
    logits = chain.chain_modules(create_network("cifar10_full"))[:-1]  # the same seeded weights
    for samples, calls in ((1, 1), (counting.max_batch, 2), (counting.max_batch + 1, 2)):
        x = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(samples))
        with torch.inference_mode():
            got = servable.run((), x, {}).double().numpy()
        assert counting.calls == calls, samples
        want = torch.softmax(torch.from_numpy(reference_forward(logits, x)), 1).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_batch_abandoned_before_its_call_is_not_computed() -> None:
    servable = NetworkServable(ModelConfig(name="cifar10_full", kind="cifar10_full"))
    servable.load(torch.device("cpu"))
    assert servable.chain is not None
    counting = Counting(servable.chain)
    servable.chain = counting  # type: ignore[assignment]
    abandonment = Abandonment()
    abandonment.abandoned = True
    with pytest.raises(BatchAbandoned):
        servable.run((), torch.zeros(1, 3, 32, 32), {}, abandonment)
    assert counting.calls == 0


def test_the_imported_caffe_cifar10_runs_as_a_chain_and_matches_caffe(tmp_path: Path) -> None:
    net = parse_net((SHARED / "cifar10_full.deploy.prototxt").read_text())
    x = np.random.default_rng(5).uniform(-120, 120, (2, 3, 32, 32)).astype(np.float32)
    want, weights = caffe_forward(net, x, seed=6)
    model = write_caffemodel(tmp_path / "cifar10.caffemodel", weights, types=layer_types(net), v1=True)
    config = ModelConfig(name="c", kind="caffe", prototxt=SHARED / "cifar10_full.deploy.prototxt", weights=model)
    servable = NetworkServable(config)
    servable.load(torch.device("cpu"))
    assert servable.chain is not None and len(servable.chain.layers) == 11
    counting = Counting(servable.chain)
    servable.chain = counting  # type: ignore[assignment]
    with torch.inference_mode():
        got = servable.run((), torch.from_numpy(x), {}).double().numpy()
    assert counting.calls == 1
    assert float(np.abs(got - want["prob"]).max() / np.abs(want["prob"]).max()) < 1e-4


def test_an_onnx_cifar10_with_composed_within_channel_lrn_runs_layer_by_layer(tmp_path: Path) -> None:
    # ONNX has no within-channel LRN: exported, it is standard ops reading x twice, not a chain.
    exported = tmp_path / "cifar10.onnx"
    exported.write_bytes(export(read_caffe(SHARED / "cifar10_full.deploy.prototxt")))
    network = GraphNetwork(read_onnx(exported))
    with pytest.raises(chain.NotChainable, match="not a straight chain"):
        chain.build(network, network.input_shape)


def test_one_chain_serves_instances_side_by_side() -> None:
    # The server's instances share a servable: its chain is called from several threads at once.
    modules = small_network()
    built = chain.from_modules(modules, (3, 17, 15), kernel())
    inputs = [torch.randn(2, 3, 17, 15, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    wanted = [built(x) for x in inputs]
    start = threading.Barrier(len(inputs), timeout=30)

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        start.wait()
        return [built(x) for _ in range(50)]

    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(run, inputs))
    for got, want in zip(results, wanted, strict=True):
        for out in got:
            assert torch.equal(out, want)


# ---- imported ONNX models (built with the onnx package; onnxruntime is the reference) ----


def onnx_chain_model(rng: np.random.Generator) -> onnx.ModelProto:
    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("LRN", ["p1"], ["n1"], size=3, alpha=1e-2, beta=0.75, bias=2.0),
        helper.make_node("Conv", ["n1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c2"], ["a1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node(
            "AveragePool", ["a1"], ["a2"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, count_include_pad=1
        ),
        helper.make_node("Flatten", ["a2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g1"], transB=1),
        helper.make_node("Relu", ["g1"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w4"], ["g2"]),
        helper.make_node("Softmax", ["g2"], ["y"], axis=1),
    ]
    weights = {
        "w1": weight(8, 3, 3, 3), "b1": weight(8), "w2": weight(16, 8, 3, 3), "w3": weight(12, 16 * 2 * 2),
        "b3": weight(12), "w4": weight(12, 5),
    }  # fmt: skip
    return onnx_model(nodes, [("x", [1, 3, 13, 11])], [("y", [1, 5])], weights)


def test_an_imported_onnx_chain_matches_onnxruntime(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    built = onnx_chain_model(rng)
    path = tmp_path / "chain.onnx"
    path.write_bytes(built.SerializeToString())
    network = GraphNetwork(read_onnx(path))
    planned = chain.build(network, network.input_shape)
    assert [layer.code for layer in planned.layers] == [
        chain.CONV, chain.MAX_POOL, chain.LRN, chain.CONV, chain.AVG_POOL, chain.AVG_POOL, chain.LINEAR,
        chain.LINEAR, chain.SOFTMAX,
    ]  # fmt: skip
    assert planned.layers[0].fields[6] == 1 and planned.layers[6].fields[6] == 1  # the ReLUs fused
    x = rng.standard_normal((1, 3, 13, 11)).astype(np.float32)
    got = planned(torch.from_numpy(x)).numpy()
    want = ort_run(built, x)
    assert relative_error(got, want) < 1e-5


def test_an_imported_global_pool_and_unpadded_chain(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    built = onnx_model(nodes, [("x", [1, 2, 7, 9])], [("y", [1, 6])], {"w": w})
    path = tmp_path / "global.onnx"
    path.write_bytes(built.SerializeToString())
    network = GraphNetwork(read_onnx(path))
    planned = chain.build(network, network.input_shape)
    x = rng.standard_normal((3, 2, 7, 9)).astype(np.float32)
    got = planned(torch.from_numpy(x)).numpy()
    want = np.concatenate([ort_run(built, x[i : i + 1]) for i in range(3)])
    assert got.shape == (3, 6) and relative_error(got, want) < 1e-5


def test_an_imported_graph_whose_data_is_not_a_first_input_is_not_a_chain(tmp_path: Path) -> None:
    # Gemm(A, B, C) with the running value as C (the bias): the chain reads input 0 as the data.
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["a", "b", "f"], ["y"])]
    consts = {"a": np.ones((1, 10), np.float32), "b": np.eye(10, dtype=np.float32)}
    path = tmp_path / "gemm.onnx"
    path.write_bytes(onnx_model(nodes, [("x", [1, 10, 1, 1])], [("y", [1, 10])], consts).SerializeToString())
    network = GraphNetwork(read_onnx(path))
    with pytest.raises(chain.NotChainable, match="not a straight chain"):
        chain.build(network, network.input_shape)


def test_an_imported_graph_with_nothing_to_compute_loads_layer_by_layer(tmp_path: Path) -> None:
    path = tmp_path / "flatten.onnx"
    built = onnx_model([helper.make_node("Flatten", ["x"], ["y"])], [("x", [1, 3, 4, 4])], [("y", [1, 48])])
    path.write_bytes(built.SerializeToString())
    with pytest.raises(chain.NotChainable, match="no layers"):
        network = GraphNetwork(read_onnx(path))
        chain.build(network, network.input_shape)
    servable = NetworkServable(ModelConfig(name="f", kind="onnx", path=path))
    servable.load(torch.device("cpu"))
    assert servable.chain is None
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(servable.run((), x, {}), x.reshape(2, 48))


def test_a_chain_answers_an_empty_batch() -> None:
    built = chain.from_modules(small_network(), (3, 17, 15), kernel())
    assert built(torch.zeros(0, 3, 17, 15)).shape == (0, 7)
