"""LRN as the registered torch operator ``lrnserve::local_response_norm``: the networks call it,
and torch.jit.trace, torch.compile, torch.export and torch.onnx.export see it."""

from __future__ import annotations

import collections
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lrnserve.server.importers import read_caffe
from lrnserve.server.models import create_network
from lrnserve.server.models.runtime import GraphNetwork
from lrnserve.server.ops import LocalResponseNorm, local_response_norm, native, onnx_export
from lrnserve.server.ops.composed import local_response_norm_composed
from lrnserve.server.ops.torch_op import direct_call_unobserved, local_response_norm_op

OP = torch.ops.lrnserve.local_response_norm.default
CIFAR_PROTOTXT = Path(__file__).resolve().parent / "data" / "caffe" / "cifar10_full.deploy.prototxt"


def lrn_nodes(graph: torch.fx.Graph) -> int:
    return sum(1 for node in graph.nodes if node.target is OP)


def small_network() -> nn.Module:
    """Every LRN variant the ONNX translation distinguishes: across odd, across even, within."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        LocalResponseNorm(5, 1e-2, 0.75, 2.0),
        nn.MaxPool2d(2, ceil_mode=True),
        LocalResponseNorm(4, 0.5, 0.6, 1.5),
        LocalResponseNorm(3, 0.3, 0.75, 1.0, "within"),
        LocalResponseNorm(2, 0.2, 0.9, 1.0, "within"),
    ).eval()


def rel_error(got: np.ndarray | torch.Tensor, want: np.ndarray | torch.Tensor) -> float:
    got_a, want_a = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got_a.shape == want_a.shape
    return float(np.abs(got_a - want_a).max() / max(np.abs(want_a).max(), 1e-30))


def cifar_graph_network() -> GraphNetwork:
    return GraphNetwork(read_caffe(CIFAR_PROTOTXT)).eval()


# -- the op itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["across", "within"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 12])
def test_op_matches_composed_on_cpu_and_meta(mode: str, size: int) -> None:
    assert native.kernel() is not None, native.unavailable_reason()
    x = torch.randn(2, 7, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(size)) * 3
    params = [torch.full((2,), v, dtype=torch.float64) for v in (0.7, 0.75, 1.3)]
    expected = local_response_norm_composed(x, size, *params, mode)  # type: ignore[arg-type]
    torch.testing.assert_close(OP(x, size, 0.7, 0.75, 1.3, mode), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(local_response_norm(x, size, 0.7, 0.75, 1.3, mode), expected, rtol=1e-13, atol=0)
    meta = OP(x.to("meta").transpose(2, 3), size, 0.7, 0.75, 1.3, mode)
    assert meta.shape == (2, 7, 6, 5) and meta.dtype == x.dtype and meta.is_contiguous()


def test_networks_call_the_op() -> None:
    net = create_network("cifar10_full")
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(torch.randn(1, 3, 32, 32))
    calls = [e for e in prof.events() if e.name == "lrnserve::local_response_norm"]
    assert len(calls) == 2  # cifar10_full has two LRN layers


@pytest.mark.parametrize("mode", ["across", "within"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_direct_call_matches_the_op(mode: str, channels_last: bool) -> None:
    # LocalResponseNorm calls the op's CPU kernel without the dispatcher when nothing watches:
    # the same kernel, so the same bits and the same output layout.
    x = torch.randn(2, 9, 6, 7, generator=torch.Generator().manual_seed(11)) * 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = LocalResponseNorm(5, 2e-2, 0.75, 1.5, mode)
    with torch.inference_mode():
        assert direct_call_unobserved(x)  # the path under test is the one taken
        got, want = layer(x), OP(x, 5, 2e-2, 0.75, 1.5, mode)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)


class _RecordingMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_module_goes_through_the_dispatcher_when_watched() -> None:
    layer = LocalResponseNorm(3, 1e-3, 0.75, 1.0)
    x = torch.randn(1, 4, 5, 5)
    recording = _RecordingMode()
    with recording:
        assert not direct_call_unobserved(x)
        layer(x)
    assert OP in recording.ops  # a dispatch mode sees the op
    needs_grad = x.clone().requires_grad_(True)
    assert layer(needs_grad).grad_fn is not None  # autograd records it
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x)
    assert any(e.name == "lrnserve::local_response_norm" for e in prof.events())


def test_op_checks_its_arguments_when_called_directly() -> None:
    x = torch.randn(1, 3, 4, 4)
    for args, named in [
        ((0, 1e-4, 0.75, 1.0, "across"), "size"),
        ((3, -1.0, 0.75, 1.0, "across"), "alpha"),
        ((3, 1e-4, float("nan"), 1.0, "across"), "beta"),
        ((3, 1e-4, 0.75, 0.0, "across"), "k"),
        ((3, 1e-4, 0.75, 1.0, "sideways"), "mode"),
    ]:
        with pytest.raises(ValueError, match=named):
            OP(x, *args)
    with pytest.raises(ValueError, match="4-D"):
        OP(torch.randn(3, 4, 4), 3, 1e-4, 0.75, 1.0, "across")


def test_empty_batch_and_other_layouts() -> None:
    assert OP(torch.randn(0, 3, 4, 4), 3, 1e-4, 0.75, 1.0, "across").shape == (0, 3, 4, 4)
    x = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(6)).to(memory_format=torch.channels_last)
    # The kernel reads and writes channels-last as it is (convolutions produce it), in both modes,
    # with the NCHW input's values.
    for mode in ("across", "within"):
        y = OP(x, 3, 0.1, 0.75, 1.0, mode)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        # Sums in another order: equal within float32 rounding (a few ulps), not bit for bit.
        torch.testing.assert_close(y, OP(x.contiguous(), 3, 0.1, 0.75, 1.0, mode), rtol=1e-6, atol=0)
    strided = torch.randn(2, 6, 10, 4)[:, :, ::2]  # neither layout: an NCHW copy, NCHW out
    assert OP(strided, 3, 0.1, 0.75, 1.0, "across").is_contiguous()


@pytest.mark.parametrize("mode", ["across", "within"])
@pytest.mark.parametrize("size", [2, 3, 5])
def test_gradient(mode: str, size: int) -> None:
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: OP(t, size, 0.9, 0.75, 1.2, mode), (x,))
    if size == 2:  # the backward is torch ops, so it has a gradient of its own
        small = x[:1, :3, :3, :2].detach().clone().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda t: OP(t, size, 0.9, 0.75, 1.2, mode), (small,))


def test_opcheck() -> None:
    # torch.library's own consistency checks: schema, fake implementation, autograd registration
    x = torch.randn(2, 5, 4, 3, requires_grad=True)
    nhwc = torch.randn(2, 5, 4, 3).to(memory_format=torch.channels_last).requires_grad_()
    for mode, size in (("across", 4), ("within", 3)):
        for layout in (x, nhwc):  # the fake implementation's layout must be the kernel's
            torch.library.opcheck(local_response_norm_op, (layout, size, 0.9, 0.75, 1.2, mode))


def test_float32_gradient_matches_torch() -> None:
    x = torch.randn(2, 9, 5, 5, generator=torch.Generator().manual_seed(5)) * 3
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    (LocalResponseNorm(5, 1e-2, 0.75, 2.0)(ours) ** 2).sum().backward()
    (nn.LocalResponseNorm(5, 1e-2, 0.75, 2.0)(theirs) ** 2).sum().backward()
    assert ours.grad is not None and theirs.grad is not None
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)


# -- torch.jit.trace ------------------------------------------------------------------------------


def test_trace_records_the_op_instead_of_a_constant() -> None:
    net = create_network("cifar10_full")
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.randn(1, 3, 32, 32))  # check_trace on: it reruns and compares
        assert str(traced.inlined_graph).count("lrnserve::local_response_norm") == 2
        other = torch.randn(3, 3, 32, 32) * 2
        torch.testing.assert_close(traced(other), net(other), rtol=1e-6, atol=1e-7)


# -- torch.compile ----------------------------------------------------------------------------------


def counting_backend(graphs: list[torch.fx.GraphModule]) -> Callable[..., Any]:
    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    return backend


@pytest.mark.parametrize("name", ["cifar10_full", "alexnet"])
def test_compile_fullgraph_builtin_networks(name: str) -> None:
    torch._dynamo.reset()
    net = create_network(name)
    x = torch.randn(2, 3, 32, 32) if name == "cifar10_full" else torch.randn(1, 3, 227, 227)
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(net, fullgraph=True, backend=counting_backend(graphs))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-6, atol=1e-7)
    assert len(graphs) == 1
    assert lrn_nodes(graphs[0].graph) == 2


def test_compile_fullgraph_imported_graph_network() -> None:
    torch._dynamo.reset()
    net = cifar_graph_network()
    x = torch.randn(2, 3, 32, 32)
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(net, fullgraph=True, backend=counting_backend(graphs))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-6, atol=1e-7)
    assert len(graphs) == 1 and lrn_nodes(graphs[0].graph) == 2


def test_compile_inductor() -> None:
    torch._dynamo.reset()
    net = small_network()
    compiled = torch.compile(net, fullgraph=True)  # inductor: the op stays an opaque call to the kernel
    with torch.no_grad():
        for seed in (1, 2):
            x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-6)


def test_compile_with_gradients() -> None:
    torch._dynamo.reset()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    module = LocalResponseNorm(3, 0.5, 0.75, 1.0)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    (compiled(x) ** 2).sum().backward()
    assert x.grad is not None
    expected = x.detach().clone().requires_grad_()
    (module(expected) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)


# -- torch.export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cifar10_full", "imported cifar10_full", "small"])
def test_export_runs_and_keeps_the_op(which: str) -> None:
    net = {"cifar10_full": lambda: create_network("cifar10_full"), "imported cifar10_full": cifar_graph_network}.get(
        which, small_network
    )()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(net, (x,))
    assert lrn_nodes(program.graph) >= 2
    other = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), net(other), rtol=0, atol=0)
        inference = program.run_decompositions()
        assert lrn_nodes(inference.graph) == lrn_nodes(program.graph)  # not decomposed away
        torch.testing.assert_close(inference.module()(other), net(other), rtol=0, atol=0)


def test_export_with_a_dynamic_batch() -> None:
    net = small_network()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(net, (torch.randn(2, 3, 9, 9),), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        for n in (1, 5):
            x = torch.randn(n, 3, 9, 9)
            torch.testing.assert_close(program.module()(x), net(x), rtol=0, atol=0)


# -- torch.onnx.export ----------------------------------------------------------------------------


def onnx_run(net: nn.Module, x: torch.Tensor) -> tuple[collections.Counter[str], np.ndarray]:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    proto = onnx_export(net, (x,), verbose=False).model_proto
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return collections.Counter(node.op_type for node in proto.graph.node), out


def test_onnx_export_every_variant_reproduced_by_onnxruntime() -> None:
    net = small_network()
    x = torch.randn(2, 3, 9, 7) * 2
    ops, out = onnx_run(net, x)
    assert ops["LRN"] == 1  # across, size 5; the even size and within-channel layers are standard ops
    assert ops["AveragePool"] == 3 and ops["Pow"] == 3
    with torch.no_grad():
        assert rel_error(out, net(x)) < 1e-5


@pytest.mark.parametrize("mode", ["across", "within"])
@pytest.mark.parametrize("size", [1, 3, 4, 9])
def test_onnx_export_single_layer(mode: str, size: int) -> None:
    net = LocalResponseNorm(size, 0.05, 0.8, 1.7, mode).eval()
    x = torch.randn(2, 5, 6, 4) * 3  # sizes beyond C, H or W: the window is clipped, the divisor not
    ops, out = onnx_run(net, x)
    assert ("LRN" in ops) == (mode == "across" and size % 2 == 1)
    assert rel_error(out, net(x)) < 1e-5


@pytest.mark.parametrize("imported", [False, True], ids=["built-in", "imported prototxt"])
def test_onnx_export_cifar10_full(imported: bool) -> None:
    net = cifar_graph_network() if imported else create_network("cifar10_full")
    x = torch.randn(2, 3, 32, 32)
    ops, out = onnx_run(net, x)
    assert "LRN" not in ops  # its LRNs are within-channel
    with torch.no_grad():
        assert rel_error(out, net(x)) < 1e-5


def test_onnx_export_torchscript_exporter(tmp_path: Path) -> None:
    # The deprecated exporter (dynamo=False) traces with torch.jit.trace; the registered symbolic
    # writes the same nodes.
    import onnx

    net = small_network()
    x = torch.randn(2, 3, 9, 7) * 2
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        onnx_export(net, (x,), path, dynamo=False)
    proto = onnx.load(path)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["LRN"] == 1 and ops["AveragePool"] == 3
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert rel_error(out, net(x)) < 1e-5


@pytest.mark.parametrize("mode, size", [("across", 5), ("within", 3), ("across", 4)])
def test_onnx_export_float16_computes_in_float32(mode: str, size: int) -> None:
    # |x| ~ 300: x^2 overflows float16, so a graph computing in float16 would give 0 or inf.
    net = LocalResponseNorm(size, 0.01, 0.75, 2.0, mode).eval()
    x = (torch.randn(2, 7, 6, 5, generator=torch.Generator().manual_seed(2)) * 300).half()
    ops, out = onnx_run(net, x)
    assert ops["Cast"] == 2 and out.dtype == np.float16
    want = net(x).float().numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.astype(np.float32), want, rtol=1e-3, atol=0)  # one float16 rounding
