"""What every classic LRN network shares: Caffe-style layers, weights, metadata."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import LocalResponseNorm, LRNParams, channels_last, native

logger = logging.getLogger(__name__)

LRNFactory = Callable[[LRNParams], nn.Module]
DEFAULT_SEED = 0


def caffe_max_pool(kernel: int, stride: int, padding: int = 0) -> nn.MaxPool2d:
    """Caffe's max pooling rounds output sizes up."""
    return nn.MaxPool2d(kernel, stride, padding, ceil_mode=True)


def caffe_avg_pool(kernel: int, stride: int, padding: int = 0) -> nn.AvgPool2d:
    """Caffe's AVE pooling: ceil mode, divisor clipped at the bottom/right edge.

    With no padding, PyTorch's ceil-mode divisor (count_include_pad=True) is the
    window clipped to the input, exactly as Caffe divides.
    """
    return nn.AvgPool2d(kernel, stride, padding, ceil_mode=True, count_include_pad=True)


def onednn_packing_available() -> bool:
    """Whether this torch has oneDNN's prepacked convolution and linear ops (x86 CPU builds)."""
    mkldnn = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(  # type: ignore[no-untyped-call]
        hasattr(mkldnn, op)
        for op in (
            "_reorder_convolution_weight",
            "_convolution_pointwise",
            "_reorder_linear_weight",
            "_linear_pointwise",
        )
    )


class PackedConv2d(nn.Module):
    """A float32 CPU Conv2d (and the ReLU after it, fused) through oneDNN with its weight
    reordered once into oneDNN's blocked layout, at load; torch's conv2d reorders the weight at
    every call. Same arithmetic as F.conv2d (oneDNN runs both), outputs within float32 rounding.

    ``input_size``: the layer's input shape at batch 1 ([1, C, H, W]). oneDNN picks the weight
    layout its kernel wants for that shape; packed without it, the layout may not be the one the
    kernel picks at run time, and oneDNN then reorders the weight again at every call. With it,
    GoogLeNet (57 convolutions, most 1x1) took 21-24 ms instead of 39-46 ms at batch 1 and
    140-145 ms instead of 162 ms at batch 8; AlexNet, CaffeNet, ZFNet and cifar10_full, and
    batch 32, were unchanged (2 threads, alternating runs)."""

    def __init__(self, conv: nn.Conv2d, relu: bool, input_size: Sequence[int] | None = None) -> None:
        super().__init__()
        assert isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = conv.weight.detach()
        sized = [list(input_size)] if input_size is not None else []
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.geometry, *sized)
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.attr = "relu" if relu else "none"
        self.conv = conv  # for describing the layer only; its weight is the reordered one's source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            # oneDNN's kernel reads channels-last and copies an NCHW input (a network's first
            # layer) into it more slowly than torch does: CaffeNet's conv1 took 1.04 vs 1.10 ms at
            # batch 1, 8.6 vs 9.7 at 8, 45.1 vs 45.4 at 32, copy included (2 threads).
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(  # type: ignore[no-any-return]
            x, self.packed, self.bias, *self.geometry, self.attr, [], ""
        )


SMALL_ROWS = 16  # CpuLinear: at most this many rows through the streaming kernel


class CpuLinear(nn.Module):
    """A float32 CPU Linear (and the ReLU after it, fused), by the number of rows. Up to
    ``SMALL_ROWS`` rows: lrnserve's streaming kernel (``ops.native``, ``csrc/linear.cpp``), which
    reads each weight from memory once and applies it to every row in register tiles (6 weight
    rows by 4 samples with AVX-512); more rows: oneDNN's linear. AlexNet's fc6 (9216 -> 4096,
    151 MB), 2 threads, against oneDNN on the same row-major weights, two runs: 4.3 vs 4.9 ms at
    1 row, 4.2 vs 6.2 at 2, 4.6 vs 6.7 at 4, 5.9 vs 7.6 at 8, 8.4-9.1 vs 10.1-10.7 at 16, 16.0 vs
    16.0 at 32 (fc7, 4096 -> 4096: 1.2-1.6x up to 16 rows, 1.1x at 32); tiles of 4 by 4 took
    4.8 / 6.4 / 9.3 ms at 1 / 8 / 16 rows in the same run. MKL's sgemm behind F.linear ran fc6
    4-5x slower at batch 8 and 32 on this AMD EPYC (63 vs 14 ms, 92 vs 24 ms). Both read one
    row-major copy of the weights: oneDNN's prepacked layout was within 15 % of it at 8 rows and
    2 % at 32 (7.9 vs 9.1 ms, 16.8 vs 17.0 ms), slower than the streaming kernel up to 16 rows,
    and a second copy would double the classifier's memory. Outputs agree within float32
    rounding (the kernels sum in different orders)."""

    def __init__(self, linear: nn.Linear, relu: bool) -> None:
        super().__init__()
        self.weight = linear.weight.detach().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.attr = "relu" if relu else "none"
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= SMALL_ROWS and x.dtype == torch.float32 and not x.requires_grad:
            kernel = native.kernel()
            if kernel is not None:
                return kernel.linear(x.contiguous(), self.weight, self.bias, self.attr == "relu")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], "")  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, attr={self.attr}"


def pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """A torch layer's 2-D argument (an int, or a pair) as (height, width)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def torch_pool_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """torch's pooling output size (dilation 1): in ceil mode the last window must start inside
    the input or its left padding."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool2d(
    x: torch.Tensor,
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] = 0,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """F.max_pool2d, fast for float32 CPU inference in either layout. A channels-last input (what
    oneDNN's convolutions and the LRN kernel after them produce) goes to lrnserve's NHWC kernel
    (``csrc/pool.cpp``; 2 threads, 3x3 stride 2 ceil mode, against torch's NHWC kernel:
    [1, 32, 32, 32] 11 vs 12-13 us, [8, 32, 32, 32] 32 vs 73-78 us, [1, 96, 55, 55] 35 vs 55 us,
    [8, 96, 55, 55] 207-264 vs 446-480 us, [32, 96, 55, 55] 2.0-2.3 vs 2.4-2.5 ms; GoogLeNet's 3x3
    stride 1 pad 1 at [8, 192, 28, 28] 0.40-0.43 vs 1.0-1.7 ms), or torch's NHWC kernel without
    it; an NCHW one through oneDNN, as torch's own NCHW max pooling is 4-17x slower
    (bench, 2 threads, 3x3: [1, 64, 112, 112] 3.3 vs 0.29 ms, [1, 96, 55, 55] 1.0 vs 0.13 ms,
    [8, 256, 28, 28] 25 vs 5.9 ms, [32, 96, 55, 55] 40 vs 24 ms, conversions included), while
    converting NCHW to NHWC for the NHWC kernel took 1.35-2.8x oneDNN's time ([1, 64, 112, 112],
    [1, 96, 55, 55], [8, 96, 55, 55], [32, 96, 55, 55], [32, 256, 27, 27]; only [1, 256, 13, 13] was
    faster). NHWC in through oneDNN was slower still: torch's NHWC kernel took 59 vs 299 us at
    [1, 96, 55, 55] and 2.9 vs 35 ms at [32, 96, 55, 55]. The same windows and output sizes, and a
    max is exact: results are identical, except that a NaN in a window gives NaN on the
    channels-last path (as F.max_pool2d) and is skipped by oneDNN's NCHW pool."""
    eager = not torch.compiler.is_compiling()  # compile and export trace F.max_pool2d (oneDNN's has no fake impl)
    if eager and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad and x.dim() == 4:
        if not channels_last(x):
            if x.numel():
                pooled = torch.mkldnn_max_pool2d(x.contiguous().to_mkldnn(), kernel, stride, padding, 1, ceil_mode)
                return pooled.to_dense()
        elif (native_kernel := native.kernel()) is not None:
            kh, kw = pair(kernel)
            sh, sw = (kh, kw) if stride is None or (not isinstance(stride, int) and not stride) else pair(stride)
            ph, pw = pair(padding)
            if 2 * ph <= kh and 2 * pw <= kw and min(sh, sw) >= 1:  # else torch raises its own error
                out_h = torch_pool_size(x.shape[2], kh, sh, ph, ceil_mode)
                out_w = torch_pool_size(x.shape[3], kw, sw, pw, ceil_mode)
                if out_h > 0 and out_w > 0:
                    return native_kernel.max_pool_nhwc(x, (kh, kw), (sh, sw), (ph, pw), (out_h, out_w))
    return F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)


class OneDNNMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d computed by ``max_pool2d`` (oneDNN on the CPU); swapped in at load."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__(
            pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dilation not in (1, (1, 1)) or self.return_indices:
            return super().forward(x)  # type: ignore[no-any-return]
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)


def _packable(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return (
            isinstance(module.padding, tuple)
            and module.padding_mode == "zeros"
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
        )
    if isinstance(module, nn.Linear):
        return module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
    return False


def conv_input_sizes(root: nn.Module, sample_shape: Sequence[int]) -> dict[nn.Conv2d, list[int]]:
    """The input shape of every Conv2d under ``root`` for one sample of ``sample_shape``."""
    sizes: dict[nn.Conv2d, list[int]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if isinstance(module, nn.Conv2d):
            sizes.setdefault(module, list(args[0].shape))

    hooks = [module.register_forward_pre_hook(record) for module in root.modules() if isinstance(module, nn.Conv2d)]
    try:
        with torch.inference_mode():
            root(torch.zeros(1, *sample_shape, dtype=torch.float32))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def prepack_for_cpu(root: nn.Module, sample_shape: Sequence[int] | None = None) -> int:
    """Replace, in every nn.Sequential under ``root``, each float32 CPU Conv2d and Linear by its
    oneDNN-prepacked form, fusing a ReLU that directly follows it (the ReLU's place becomes an
    Identity, so stages stay as they are); each convolution is packed for its input shape when
    ``sample_shape`` (``root``'s input, one sample) is given. Returns the number of layers packed
    (0 where this torch has no oneDNN). Done once at load; the LRN layers are not touched."""
    if not onednn_packing_available():
        return 0
    input_sizes = conv_input_sizes(root, sample_shape) if sample_shape is not None else {}
    packed = 0
    for sequential in [m for m in root.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for index, name in enumerate(names):
            module = sequential._modules[name]
            if type(module) is nn.MaxPool2d:
                sequential._modules[name] = OneDNNMaxPool2d(module)
                continue
            if module is None or not _packable(module):
                continue
            following = sequential._modules.get(names[index + 1]) if index + 1 < len(names) else None
            relu = isinstance(following, nn.ReLU)
            layer = module
            with torch.no_grad():
                if isinstance(layer, nn.Conv2d):
                    sequential._modules[name] = PackedConv2d(layer, relu, input_sizes.get(layer))
                else:
                    assert isinstance(layer, nn.Linear)
                    sequential._modules[name] = CpuLinear(layer, relu)
            if relu:
                sequential._modules[names[index + 1]] = nn.Identity()
            packed += 1
    return packed


class LRNNetwork(nn.Module):
    """Base of the classic networks: NCHW images in, class probabilities out.

    Subclasses build ``self.features`` and ``self.classifier``; LRN layers are
    created through ``lrn_layer`` (lrnserve's LocalResponseNorm unless a
    benchmark swaps in another implementation).
    """

    name: str = ""
    input_shape: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000

    def __init__(self, lrn_layer: LRNFactory | None = None) -> None:
        super().__init__()
        self._lrn_layer: LRNFactory = lrn_layer or LocalResponseNorm.from_params
        self.weights_source = "uninitialised"

    def lrn(self, params: LRNParams) -> nn.Module:
        return self._lrn_layer(params)

    features: nn.Module
    classifier: nn.Module

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    def stages(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """``forward`` as steps a caller may stop between: each feature layer, then the
        classifier and softmax. Applied in order they compute exactly ``forward``."""
        if isinstance(self.features, nn.Sequential):
            yield from self.features.children()
        else:
            yield self.features
        yield self._head

    def forward_until(self, x: torch.Tensor, stop: Callable[[], bool] | None) -> torch.Tensor | None:
        """``forward``, giving up (None) between stages once ``stop()`` is true."""
        h = x
        for stage in self.stages():
            if stop is not None and stop():
                return None
            h = stage(h)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(torch.flatten(h, 1)), dim=1)

    def prepack_for_cpu(self) -> int:
        """``prepack_for_cpu`` of this network, at load (float32 on the CPU)."""
        return prepack_for_cpu(self, self.input_shape)

    def lrn_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, module) of every LRN layer, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, (LocalResponseNorm, nn.LocalResponseNorm)):
                yield name, module

    def init_seeded(self, seed: int = DEFAULT_SEED) -> None:
        """Deterministic random weights (PyTorch's default init under a fixed seed).

        The global RNG is left untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.reset_parameters()
        self.weights_source = f"seeded random (seed={seed})"

    def caffe_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(Caffe layer name, Conv2d or Linear) of every learned layer. Module leaf names are the BVLC
        prototxts' layer names; a network whose Caffe names are not valid module names overrides."""
        for qualified, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                yield qualified.rsplit(".", 1)[-1], module

    def load_weights(self, path: str | Path) -> None:
        """Load a PyTorch state dict (weights only, never pickled code) or a .safetensors file
        (a Caffe .caffemodel: ``importers.load_caffemodel``).

        Raises ValueError naming missing/unexpected keys or the first shape mismatch.
        """
        path = Path(path)
        if path.suffix.lower() == ".caffemodel":  # the importers read these (a layer above)
            raise ValueError(f"{path}: load a .caffemodel with lrnserve.server.importers.load_caffemodel")
        state = _read_state_dict(path)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match {self.name}: "
                f"missing keys {_preview(missing)}, unexpected keys {_preview(unexpected)}"
            )
        for key, tensor in own.items():
            given = state[key]
            if tuple(given.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{path}: weight {key!r} has shape {tuple(given.shape)}, {self.name} expects {tuple(tensor.shape)}"
                )
        self.load_state_dict(state, strict=True)
        self.weights_source = str(path)
        logger.info("%s: loaded weights from %s", self.name, path)


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # type: ignore[import-not-found]
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
        return dict(load_file(str(path), device="cpu"))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"{path}: not a readable PyTorch state dict ({exc})") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(loaded)
