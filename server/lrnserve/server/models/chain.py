"""A small network run as one call into the native library (``ops/csrc/chain.cpp``).

At batch 1, cifar10_full spent most of its time in per-layer overhead: its oneDNN convolutions
took 81 / 102 / 70 us called through torch one after another, for 26 / 53 / 25 us of kernel time
(oneDNN's verbose log), and each of its other nine layers 2-41 us (420 us a batch; onnxruntime
280 us). When a network is a straight chain of
layers the library implements, and a batch is small enough that overhead matters, the whole
network runs as one call with its activations channels-last in one workspace, its convolutions
through ``csrc/conv.cpp``. cifar10_full, 2 threads, one run, chain against layer by layer: 197 vs
420 us at batch 1, 345 vs 536 at 2, 613 vs 773 at 4, 1181 vs 1194 at 8, 2523 vs 2248 at 16.
Larger batches (and larger networks) stay on oneDNN, whose convolution kernel is faster with
more work per call: 8.4 vs 9.9 ms at CaffeNet's conv1 with 8 samples, 1.3 vs 1.4 ms at its
conv3 with one.

The chain is planned once, at load, from the network as loaded (a built-in network's modules, or
an imported model's nodes), with every shape checked here; its weights are copied into the
layouts the library reads. What it cannot run raises ``NotChainable``, and the network then runs
layer by layer as before.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import native
from ..ops.lrn import LocalResponseNorm
from . import ir
from .base import LRNNetwork, pair, torch_pool_size
from .runtime import GraphNetwork

CONV, MAX_POOL, AVG_POOL, RELU, LRN, LINEAR, SOFTMAX = range(1, 8)
_FIELDS = 16  # int64s a layer in the program (csrc/chain.cpp's Op)
# A batch runs as one call while its multiply-adds stay within this: cifar10_full (12.3 M a
# sample) up to 5 samples, below where the chain stopped paying (8 samples, above).
CHAIN_MAX_MACS = 64_000_000


class NotChainable(Exception):
    """Why a network cannot run as a native chain (the network then runs layer by layer)."""


@dataclass
class _Layer:
    code: int
    shape_in: tuple[int, int, int]  # C, H, W of one sample
    shape_out: tuple[int, int, int]
    fields: tuple[int, ...] = (0,) * 8  # KH, KW, SH, SW, PH, PW, flag, size
    pack: Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None  # its two parameters
    macs: int = 0


def pack_conv_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[OC, C, KH, KW] as ``csrc/conv.cpp`` reads it: [OC / block][KH][KW][C][block], zero
    output channels up to a whole block."""
    oc, c, kh, kw = weight.shape
    blocks = -(-oc // block)
    padded = torch.zeros(blocks * block, kh, kw, c, dtype=torch.float32)
    padded[:oc] = weight.detach().float().permute(0, 2, 3, 1)
    return padded.reshape(blocks, block, kh, kw, c).permute(0, 2, 3, 4, 1).contiguous()


def pack_conv_bias(bias: torch.Tensor | None, out_channels: int, block: int) -> torch.Tensor:
    padded = torch.zeros(-(-out_channels // block) * block, dtype=torch.float32)
    if bias is not None:
        padded[:out_channels] = bias.detach().float()
    return padded


Shape = tuple[int, int, int]  # C, H, W of one sample


def conv_layer(
    weight: torch.Tensor, bias: torch.Tensor | None, shape: Shape, stride: tuple[int, int],
    padding: tuple[int, int], relu: bool, block: int,
) -> _Layer:  # fmt: skip
    """A plain convolution (one group, no dilation) of a [C, H, W] sample."""
    c, h, w = shape
    oc, weight_c, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if weight_c != c or oh < 1 or ow < 1 or (bias is not None and bias.numel() != oc):
        raise NotChainable(f"a convolution of weight {list(weight.shape)} does not fit its input {list(shape)}")

    def pack() -> tuple[torch.Tensor, torch.Tensor]:
        return pack_conv_weight(weight, block), pack_conv_bias(bias, oc, block)

    macs = oc * oh * ow * c * kh * kw
    return _Layer(CONV, shape, (oc, oh, ow), (kh, kw, sh, sw, ph, pw, int(relu), 0), pack, macs)


def pool_layer(
    method: str, shape: Shape, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    output: tuple[int, int], count_include_pad: bool = True,
) -> _Layer:  # fmt: skip
    """Max or average pooling to spatial size ``output``, as torch places its windows: max over
    the window clipped to the input; average over that, divided by the window clipped to the
    padded input (``count_include_pad``) or by its part in the input."""
    c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, padding, output
    if oh < 1 or ow < 1 or (oh - 1) * sh - ph >= h or (ow - 1) * sw - pw >= w or 2 * ph > kh or 2 * pw > kw:
        raise NotChainable(f"a {kh}x{kw} pool to {oh}x{ow} does not fit its input {list(shape)}")
    code = MAX_POOL if method == "max" else AVG_POOL
    return _Layer(code, shape, (c, oh, ow), (kh, kw, sh, sw, ph, pw, int(not count_include_pad), 0))


def lrn_layer(shape: Shape, size: int, alpha: float, beta: float, k: float, mode: str) -> _Layer:
    abk = torch.tensor([alpha, beta, k], dtype=torch.float64)
    fields = (0, 0, 0, 0, 0, 0, 0 if mode == "across" else 1, size)
    return _Layer(LRN, shape, shape, fields, lambda: (abk, None))


def linear_layer(weight: torch.Tensor, bias: torch.Tensor | None, shape: Shape, relu: bool) -> _Layer:
    """A fully connected layer on a sample ``shape`` flattened in NCHW order (weight [out, C*H*W])."""
    c, h, w = shape
    if weight.dim() != 2 or weight.shape[1] != c * h * w or (bias is not None and bias.numel() != weight.shape[0]):
        raise NotChainable(f"a fully connected weight {list(weight.shape)} does not fit its input {list(shape)}")
    out = int(weight.shape[0])

    def pack() -> tuple[torch.Tensor, torch.Tensor | None]:
        packed = weight.detach().float()
        if h * w > 1:  # the activations are channels-last: reorder the weight's columns to match
            packed = packed.reshape(out, c, h, w).permute(0, 2, 3, 1).reshape(out, -1)
        return packed.contiguous(), None if bias is None else bias.detach().float().reshape(-1).contiguous()

    return _Layer(LINEAR, shape, (out, 1, 1), (0, 0, 0, 0, 0, 0, int(relu), 0), pack, c * h * w * out)


def _module_layers(modules: Sequence[nn.Module], input_shape: Shape, block: int) -> list[_Layer]:
    """``modules``, applied in order to one [C, H, W] sample, as chain layers."""
    layers: list[_Layer] = []
    shape = input_shape
    flattened = False
    i = 0
    while i < len(modules):
        module = modules[i]
        relu_next = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
        layer: _Layer | None = None
        if isinstance(module, (nn.Dropout, nn.Identity)):
            pass
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            flattened = True
        elif isinstance(module, nn.Conv2d) and not flattened:
            if module.groups != 1 or pair(module.dilation) != (1, 1) or module.padding_mode != "zeros":
                raise NotChainable(f"{module}: only plain convolutions (one group, no dilation, zero padding)")
            if isinstance(module.padding, str):
                raise NotChainable(f"padding '{module.padding}'")
            stride, padding = pair(module.stride), pair(module.padding)
            layer = conv_layer(module.weight.detach(), module.bias, shape, stride, padding, relu_next, block)
            i += relu_next
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and not flattened:
            layer = _pool_module(module, shape)
        elif isinstance(module, nn.ReLU):
            layer = _Layer(RELU, shape, shape)
        elif isinstance(module, LocalResponseNorm) and not flattened:
            p = module.params
            layer = lrn_layer(shape, p.size, p.alpha, p.beta, p.k, p.mode)
        elif isinstance(module, nn.Linear) and flattened:
            layer = linear_layer(module.weight.detach(), module.bias, shape, relu_next)
            i += relu_next
        elif isinstance(module, nn.Softmax) and flattened and module.dim == 1 and shape[1:] == (1, 1):
            layer = _Layer(SOFTMAX, shape, shape)
        else:
            raise NotChainable(f"{type(module).__name__} {module}")
        if layer is not None:
            layers.append(layer)
            shape = layer.shape_out
        i += 1
    return layers


def _pool_module(pool: nn.MaxPool2d | nn.AvgPool2d, shape: Shape) -> _Layer:
    if isinstance(pool, nn.MaxPool2d) and (pair(pool.dilation) != (1, 1) or pool.return_indices):
        raise NotChainable(f"{pool}: dilated or index-returning max pool")
    if isinstance(pool, nn.AvgPool2d) and pool.divisor_override is not None:
        raise NotChainable(f"{pool}: average pool with a divisor")
    kernel, padding = pair(pool.kernel_size), pair(pool.padding)
    stride = pair(pool.stride or pool.kernel_size)
    ceil = bool(pool.ceil_mode)
    output = tuple(torch_pool_size(shape[1 + a], kernel[a], stride[a], padding[a], ceil) for a in (0, 1))
    method = "max" if isinstance(pool, nn.MaxPool2d) else "avg"
    include_pad = bool(getattr(pool, "count_include_pad", True))
    return pool_layer(method, shape, kernel, stride, padding, (output[0], output[1]), include_pad)


def _graph_layers(network: GraphNetwork, block: int) -> list[_Layer]:
    """An imported model's nodes as chain layers, when they form a straight chain of supported ops."""
    nodes = network.chain_nodes()
    if nodes is None:
        raise NotChainable("the graph is not a straight chain of nodes")
    input_shape = network.input_shape
    if len(input_shape) != 3:
        raise NotChainable(f"input shape {list(input_shape)} is not [C, H, W]")
    layers: list[_Layer] = []
    shape: Shape = (input_shape[0], input_shape[1], input_shape[2])
    flattened = False
    skip_relu = False
    for index, (node, constants) in enumerate(nodes):
        op = node.op
        following = nodes[index + 1][0].op if index + 1 < len(nodes) else None
        relu_next = isinstance(following, ir.Activation) and following.op == "relu" and following.negative_slope == 0
        out_dims = network.value_shapes[node.outputs[0]][1:]
        layer: _Layer | None = None
        if skip_relu:  # fused into the layer before
            skip_relu = False
            continue
        if isinstance(op, ir.Conv) and not flattened:
            weight, bias = constants[1], constants[2] if len(constants) > 2 else None
            top, left, bottom, right = op.pads
            if op.group != 1 or op.dilation != (1, 1) or op.auto_pad != "NOTSET" or (top, left) != (bottom, right):
                raise NotChainable(f"node '{node.name}': only plain, symmetrically padded convolutions")
            if weight is None:
                raise NotChainable(f"node '{node.name}': weights computed at run time")
            layer = conv_layer(weight, bias, shape, op.stride, (top, left), relu_next, block)
            skip_relu = relu_next
        elif isinstance(op, ir.Pool) and not flattened and len(out_dims) == 3:
            top, left, bottom, right = op.pads
            if op.auto_pad != "NOTSET" or (top, left) != (bottom, right):
                raise NotChainable(f"node '{node.name}': only symmetrically padded pools")
            kernel, stride, padding = op.kernel, op.stride, (top, left)
            if op.global_pool:  # as graph_ops.PoolStep: the whole input, unpadded
                kernel, stride, padding = (shape[1], shape[2]), (1, 1), (0, 0)
            output = (out_dims[1], out_dims[2])
            layer = pool_layer(op.method, shape, kernel, stride, padding, output, op.count_include_pad)
        elif isinstance(op, ir.Activation) and op.op == "relu" and op.negative_slope == 0:
            layer = _Layer(RELU, shape, shape)
        elif isinstance(op, ir.Activation) and op.op == "identity":
            pass
        elif isinstance(op, ir.LRN) and not flattened:
            if op.size % 2 == 0 and op.extra_neighbour == "after":
                raise NotChainable(f"node '{node.name}': an even LRN window centred as ONNX centres it")
            layer = lrn_layer(shape, op.size, op.alpha, op.beta, op.k, op.region)
        elif isinstance(op, (ir.Flatten, ir.Reshape)) and len(out_dims) == 1 and out_dims[0] == math.prod(shape):
            if isinstance(op, ir.Flatten) and (op.axis != 1 or op.end_axis not in (None, -1)):
                raise NotChainable(f"node '{node.name}': a flatten from axis {op.axis}")
            flattened = True
        elif isinstance(op, ir.InnerProduct) and op.axis == 1 and constants[1] is not None:
            weight = constants[1].t() if op.transpose else constants[1]
            layer = linear_layer(weight, constants[2] if len(constants) > 2 else None, shape, relu_next)
            skip_relu, flattened = relu_next, True
        elif isinstance(op, ir.Gemm) and flattened and not op.trans_a and op.alpha == 1.0 and op.beta == 1.0:
            weight = constants[1]
            bias = constants[2] if len(constants) > 2 else None
            if weight is None or (bias is not None and bias.dim() != 1):
                raise NotChainable(f"node '{node.name}': a Gemm without constant weights and a vector bias")
            layer = linear_layer(weight if op.trans_b else weight.t(), bias, shape, relu_next)
            skip_relu = relu_next
        elif isinstance(op, ir.Softmax) and flattened and op.axis in (1, -1) and shape[1:] == (1, 1):
            layer = _Layer(SOFTMAX, shape, shape)
        else:
            raise NotChainable(f"node '{node.name}' ({type(op).__name__}) is not one the native chain runs")
        if layer is not None:
            layers.append(layer)
            shape = layer.shape_out
        expected = (math.prod(shape),) if flattened else shape
        if tuple(out_dims) != expected:
            raise NotChainable(f"node '{node.name}': output {list(out_dims)}, the chain computes {list(expected)}")
    if tuple(network.output_shape) != ((math.prod(shape),) if flattened else shape):
        raise NotChainable(f"the output {list(network.output_shape)} is not the last layer's")
    return layers


class NativeChain:
    """A planned chain: ``chain(x)`` computes the network on x [N, C, H, W] (float32, CPU) for N
    up to ``max_batch``, as the modules it was planned from would, within float32 rounding."""

    def __init__(self, layers: list[_Layer], kernel: native.NativeKernel, output_flat: bool) -> None:
        if not layers:
            raise NotChainable("no layers to run")
        self.layers = layers
        self._kernel = kernel
        self.input_shape = layers[0].shape_in
        out = layers[-1].shape_out
        self.output_shape: tuple[int, ...] = (math.prod(out),) if output_flat else out
        self.macs = sum(layer.macs for layer in layers)
        self.max_batch = CHAIN_MAX_MACS // max(self.macs, 1)
        if self.max_batch < 1:
            raise NotChainable(f"{self.macs / 1e6:.0f} M multiply-adds a sample: oneDNN's kernels are faster")
        program = torch.zeros(len(layers), _FIELDS, dtype=torch.int64)
        self._params = (ctypes.c_void_p * (2 * len(layers)))()
        self._keep: list[torch.Tensor] = [program]
        for index, layer in enumerate(layers):
            program[index, :15] = torch.tensor([layer.code, *layer.shape_in, *layer.shape_out, *layer.fields])
            for slot, tensor in enumerate(layer.pack() if layer.pack is not None else (None, None)):
                if tensor is not None:
                    self._keep.append(tensor)
                    self._params[2 * index + slot] = tensor.data_ptr()
        self._program = program
        self._activation = max(max(math.prod(layer.shape_in), math.prod(layer.shape_out)) for layer in layers)
        self._scratch = max((_padded_input(layer) for layer in layers if layer.code == CONV), default=0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        samples = x.shape[0]
        if tuple(x.shape[1:]) != self.input_shape or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"native chain: expected float32 [N, {', '.join(map(str, self.input_shape))}] on the CPU")
        x = x.contiguous()
        out = torch.empty(samples, *self.output_shape, dtype=torch.float32)
        if samples == 0:
            return out
        workspace = torch.empty(samples * (2 * self._activation + self._scratch), dtype=torch.float32)
        rc = self._kernel.chain_forward(
            self._program.data_ptr(), len(self.layers), ctypes.addressof(self._params), x.data_ptr(), out.data_ptr(),
            workspace.data_ptr(), samples, self._activation, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"native chain: layer {-2 - rc} rejected its arguments")
        return out

    def describe(self) -> str:
        return f"{len(self.layers)} layers as one native call up to batch {self.max_batch}"


def _padded_input(layer: _Layer) -> int:
    """Floats of one sample's zero-padded convolution input."""
    c, h, w = layer.shape_in
    return c * (h + 2 * layer.fields[4]) * (w + 2 * layer.fields[5])


def chain_modules(network: LRNNetwork) -> list[nn.Module]:
    """The built-in network's forward as one list of modules: features, flatten, classifier,
    softmax. Raises NotChainable for a network whose forward is not exactly that."""
    cls = type(network)
    if cls.forward is not LRNNetwork.forward or cls.logits is not LRNNetwork.logits:
        raise NotChainable(f"{cls.__name__} has its own forward")
    if not isinstance(network.features, nn.Sequential) or not isinstance(network.classifier, nn.Sequential):
        raise NotChainable(f"{cls.__name__}: features or classifier is not a sequence of layers")
    return [*network.features, nn.Flatten(), *network.classifier, nn.Softmax(dim=1)]


def build(network: nn.Module, input_shape: Sequence[int]) -> NativeChain:
    """The chain for ``network`` (float32, on the CPU, before oneDNN prepacking: a built-in
    network or an imported model), or NotChainable saying why not."""
    kernel = native.kernel()
    if kernel is None:
        raise NotChainable(f"no native library: {native.unavailable_reason()}")
    if isinstance(network, GraphNetwork):
        layers = _graph_layers(network, kernel.conv_block)
        return NativeChain(layers, kernel, output_flat=len(network.output_shape) == 1)
    if not isinstance(network, LRNNetwork):
        raise NotChainable(f"{type(network).__name__} is neither a built-in network nor an imported model")
    if len(input_shape) != 3:
        raise NotChainable(f"input shape {list(input_shape)} is not [C, H, W]")
    c, h, w = (int(d) for d in input_shape)
    return from_modules(chain_modules(network), (c, h, w), kernel)


def from_modules(modules: Sequence[nn.Module], input_shape: Shape, kernel: native.NativeKernel) -> NativeChain:
    """The chain computing ``modules`` in order: its output is flat once one of them flattens."""
    layers = _module_layers(modules, input_shape, kernel.conv_block)
    flat = any(isinstance(module, nn.Flatten) for module in modules)
    return NativeChain(layers, kernel, output_flat=flat)
