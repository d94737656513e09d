"""The per-op table of spatial rules: windows, strides, pads and pad values.

Every op tilefx can tile has one entry in :data:`RULES`, keyed by module type (for
``call_module``), function (``call_function``) or ``("method", name)`` (``call_method``). An
entry is a factory that looks at one fx node and returns a :class:`SpatialRule` (how each
output window maps to each spatial input's window, what the op's padding means, and how the
rewrite lowers it into a tile body) or a :class:`Barrier` with the reason it cannot be tiled.
Anything not in the table is a barrier: the table is conservative, never optimistic. Adding an
op is adding one entry.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node
from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth

from .passes.channels_last import ChannelsLastBlock
from .windows import IDENTITY, Affine, AxisMap, Interp, Transposed

__all__ = ["PadSpec", "SpatialRule", "Barrier", "RuleContext", "RULES", "rule_for", "window_fn"]


@dataclass(frozen=True)
class PadSpec:
    """What an op reads outside the feature map: ``constant`` (with ``value``), ``reflect``
    or ``replicate``."""

    mode: str = "constant"
    value: float = 0.0


ZEROS = PadSpec()
NEG_INF = PadSpec("constant", float("-inf"))


@dataclass(frozen=True)
class SpatialRule:
    """How one node maps output windows to input windows, and how a tile body computes it.

    ``inputs`` pairs each spatial input node's name with its per-axis maps; inputs not listed
    (per-channel or scalar operands, weights) pass through uncropped. ``lowering`` names the
    mechanics the rewrite uses (see ``passes/tile_rewrite.py``); ``attrs`` holds its parameters.
    """

    op: str
    lowering: str
    inputs: tuple[tuple[str, tuple[AxisMap, ...]], ...]
    pad: PadSpec | None = None
    attrs: dict = field(default_factory=dict, compare=False)

    def out_sizes(self, in_sizes: tuple[int, ...]) -> tuple[int, ...]:
        maps = self.inputs[0][1]
        return tuple(m.out_len(n) for m, n in zip(maps, in_sizes))


@dataclass(frozen=True)
class Barrier:
    """A node tilefx cannot tile, and why."""

    reason: str


@dataclass
class RuleContext:
    """What a rule factory may look at: the node, its module (if any) and shapes."""

    node: Node
    module: nn.Module | None
    nsp: int  # number of spatial axes (the trailing dims of every region tensor)

    def shape(self, n: Any) -> tuple[int, ...] | None:
        tm = n.meta.get("tensor_meta") if isinstance(n, Node) else None
        if isinstance(tm, (tuple, list)) and tm and hasattr(tm[0], "shape"):
            tm = tm[0]  # chunk/split: every piece has the same spatial extent
        return tuple(tm.shape) if hasattr(tm, "shape") else None

    def spatial(self, n: Any) -> tuple[int, ...] | None:
        s = self.shape(n)
        return s[-self.nsp :] if s is not None and len(s) >= self.nsp + 2 else None

    @property
    def out_spatial(self) -> tuple[int, ...] | None:
        return self.spatial(self.node)

    def bind(self, fn: Callable, skip: int = 0) -> dict:
        """The node's arguments bound to ``fn``'s signature, defaults applied."""
        sig = inspect.signature(fn)
        ba = sig.bind(*self.node.args[skip:], **self.node.kwargs)
        ba.apply_defaults()
        return dict(ba.arguments)


def _tup(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _is_static(v: Any) -> bool:
    """True when ``v`` holds no fx Node (a value fixed at trace time)."""
    if isinstance(v, Node):
        return False
    if isinstance(v, (tuple, list)):
        return all(_is_static(x) for x in v)
    return True


# --------------------------------------------------------------------------- pointwise ops

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
)
_POINTWISE_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.sigmoid, F.tanh, F.prelu,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.exp,
    torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.nn.functional.dropout,
    F.dropout2d, F.dropout3d, F.dropout1d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.iadd, operator.imul, operator.isub,
)
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "sqrt",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "add", "add_", "sub", "sub_", "mul",
    "mul_", "div", "div_", "contiguous", "float", "half", "bfloat16", "to", "type_as",
    "hardtanh_", "square", "pow", "rsqrt",
}

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _is_inplace(ctx: RuleContext) -> bool:
    node = ctx.node
    if node.op == "call_module":
        return bool(getattr(ctx.module, "inplace", False))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return bool(node.kwargs.get("inplace")) or (
        isinstance(name, str) and name.endswith("_") and not name.startswith("__")
    ) or node.target in (operator.iadd, operator.imul, operator.isub)


def pointwise(ctx: RuleContext) -> SpatialRule | Barrier:
    """Elementwise ops: a window maps to itself; broadcast operands pass through uncropped."""
    node, out = ctx.node, ctx.out_spatial
    if out is None:
        return Barrier("output is not a spatial tensor")
    if node.op == "call_function" and node.kwargs.get("training") is True:
        return Barrier("dropout in training mode; call model.eval() first")
    if node.op == "call_function" and node.target in (F.dropout, F.dropout1d, F.dropout2d,
                                                       F.dropout3d, F.alpha_dropout):
        if len(node.args) > 2 and node.args[2] is True:
            return Barrier("dropout in training mode; call model.eval() first")
    inputs = []
    for n in node.all_input_nodes:
        sp = ctx.spatial(n)
        shape = ctx.shape(n)
        if sp == out:
            inputs.append((n.name, (IDENTITY,) * ctx.nsp))
        elif shape is not None and len(shape) >= ctx.nsp and all(
            d == 1 for d in shape[-ctx.nsp :]
        ):
            continue  # per-channel or scalar operand: broadcast, never cropped
        elif shape is None and "tensor_meta" not in n.meta:
            return Barrier(f"operand {n.name} is computed at run time and not a tensor")
        elif shape is None:
            continue
        else:
            return Barrier(f"operand {n.name} of shape {shape} broadcasts along a spatial axis")
    if not inputs:
        return Barrier("no spatial operand")
    return SpatialRule(op=_op_name(node), lowering="pointwise", inputs=tuple(inputs))


def module_pointwise(ctx: RuleContext) -> SpatialRule | Barrier:
    if isinstance(ctx.module, _DROPOUT_MODULES) and ctx.module.training:
        return Barrier(f"{type(ctx.module).__name__} in training mode; call model.eval() first")
    return pointwise(ctx)


def batchnorm(ctx: RuleContext) -> SpatialRule | Barrier:
    m = ctx.module
    if m.training or not m.track_running_stats or m.running_mean is None:
        return Barrier(
            f"{type(m).__name__} in training mode normalizes with batch statistics that span "
            "space; call model.eval() first"
        )
    return pointwise(ctx)


def functional_batchnorm(ctx: RuleContext) -> SpatialRule | Barrier:
    a = ctx.bind(F.batch_norm)
    if a["training"] is not False or a["running_mean"] is None:
        return Barrier("batch_norm with batch statistics spans space; call model.eval() first")
    return pointwise(ctx)


def instance_like(ctx: RuleContext) -> Barrier:
    return Barrier(f"{_op_name(ctx.node)} normalizes with statistics that span space")


# --------------------------------------------------------------------------- window ops


def _conv_geometry(k, s, p, d, n, nsp):
    ks, ss, ds = _tup(k, nsp), _tup(s, nsp), _tup(d, nsp)
    if p == "valid":
        pads = ((0, 0),) * nsp
    elif p == "same":
        pads = tuple((dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2) for kk, dd in zip(ks, ds))
    else:
        pads = tuple((pp, pp) for pp in _tup(p, nsp))
    return tuple(
        Affine(k=kk, s=sk, p=pl, pr=pr, d=dd) for kk, sk, (pl, pr), dd in zip(ks, ss, pads, ds)
    )


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_WINDOW_FN = {"conv": _CONV_FN, "transposed": _CONVT_FN, "maxpool": _MAXPOOL_FN,
              "avgpool": _AVGPOOL_FN}


def window_fn(lowering: str, nsp: int) -> Callable:
    """The functional op (F.conv2d, F.max_pool2d, ...) of a window lowering over ``nsp`` axes.

    Rules name the op by lowering and rank rather than holding the function: a rule is part of
    a saved module's RegionSpec, and pickle cannot save F.max_pool{1,2,3}d (boolean_dispatch
    wrappers, local functions).
    """
    return _WINDOW_FN[lowering][nsp]


def _window_rule(ctx, op, x, maps, pad, lowering, attrs) -> SpatialRule | Barrier:
    if len(maps) != ctx.nsp:
        return Barrier(f"{op} over {len(maps)} axes in a network with {ctx.nsp} spatial axes")
    return SpatialRule(op=op, lowering=lowering, inputs=((x.name, maps),), pad=pad, attrs=attrs)


def conv_module(ctx: RuleContext) -> SpatialRule | Barrier:
    m = ctx.module
    nsp = len(m.kernel_size)
    maps = _conv_geometry(m.kernel_size, m.stride, m.padding, m.dilation, None, nsp)
    mode = m.padding_mode
    if mode == "circular":
        return Barrier("circular padding reads the opposite edge of the feature map")
    pad = ZEROS if mode == "zeros" else PadSpec(mode)
    t = ctx.node.target
    attrs = dict(weight=f"{t}.weight", bias=f"{t}.bias" if m.bias is not None else None,
                 stride=m.stride, dilation=m.dilation, groups=m.groups)
    return _window_rule(ctx, type(m).__name__, ctx.node.args[0], maps, pad, "conv", attrs)


def conv_function(ctx: RuleContext) -> SpatialRule | Barrier:
    fn = ctx.node.target
    a = ctx.bind(fn)
    w = a["weight"]
    wshape = ctx.shape(w)
    if wshape is None or not _is_static((a["stride"], a["padding"], a["dilation"], a["groups"])):
        return Barrier("convolution with parameters computed at run time")
    nsp = len(wshape) - 2
    maps = _conv_geometry(wshape[2:], a["stride"], a["padding"], a["dilation"], None, nsp)
    attrs = dict(weight_node=w.name, bias_node=getattr(a["bias"], "name", None),
                 stride=_tup(a["stride"], nsp), dilation=_tup(a["dilation"], nsp), groups=a["groups"])
    return _window_rule(ctx, fn.__name__, a["input"], maps, ZEROS, "conv", attrs)


def convtranspose_module(ctx: RuleContext) -> SpatialRule | Barrier:
    m = ctx.module
    nsp = len(m.kernel_size)
    if m.padding_mode != "zeros":
        return Barrier(f"transposed convolution with padding_mode={m.padding_mode!r}")
    if len(ctx.node.args) > 1 or "output_size" in ctx.node.kwargs:
        return Barrier("transposed convolution with an explicit output_size")
    maps = tuple(
        Transposed(k=k, s=s, p=p, d=d, output_padding=op)
        for k, s, p, d, op in zip(m.kernel_size, m.stride, m.padding, m.dilation, m.output_padding)
    )
    t = ctx.node.target
    attrs = dict(weight=f"{t}.weight", bias=f"{t}.bias" if m.bias is not None else None,
                 stride=m.stride, dilation=m.dilation, groups=m.groups)
    return _window_rule(ctx, type(m).__name__, ctx.node.args[0], maps, None, "transposed", attrs)


def _pool_rule(ctx, op, x, k, s, p, d, ceil_mode, kind, extra) -> SpatialRule | Barrier:
    nsp = ctx.nsp
    if not _is_static((k, s, p, d, ceil_mode)):
        return Barrier("pooling with parameters computed at run time")
    ks = _tup(k, nsp)
    ss = _tup(s if s not in (None, ()) else k, nsp)
    ps, ds = _tup(p, nsp), _tup(d, nsp)
    maps = tuple(
        Affine(k=kk, s=sk, p=pp, pr=pp, d=dd, ceil_mode=bool(ceil_mode))
        for kk, sk, pp, dd in zip(ks, ss, ps, ds)
    )
    if kind == "max":
        attrs = dict(kernel_size=ks, stride=ss, dilation=ds)
        return _window_rule(ctx, op, x, maps, NEG_INF, "maxpool", attrs)
    attrs = dict(kernel_size=ks, stride=ss, pads=ps, **extra)
    return _window_rule(ctx, op, x, maps, ZEROS, "avgpool", attrs)


def maxpool_module(ctx: RuleContext) -> SpatialRule | Barrier:
    m = ctx.module
    if m.return_indices:
        return Barrier("max pooling with return_indices")
    return _pool_rule(ctx, type(m).__name__, ctx.node.args[0], m.kernel_size, m.stride,
                      m.padding, m.dilation, m.ceil_mode, "max", {})


def _max_pool_signature(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                        return_indices=False):
    """F.max_pool{1,2,3}d's parameters (the public functions are boolean_dispatch wrappers
    whose own signature is ``(*args, **kwargs)``, which binds nothing)."""


def maxpool_function(ctx: RuleContext) -> SpatialRule | Barrier:
    fn = ctx.node.target
    a = ctx.bind(_max_pool_signature)
    if a.get("return_indices"):
        return Barrier("max pooling with return_indices")
    return _pool_rule(ctx, fn.__name__, a["input"], a["kernel_size"], a["stride"], a["padding"],
                      a["dilation"], a["ceil_mode"], "max", {})


def avgpool_module(ctx: RuleContext) -> SpatialRule | Barrier:
    m = ctx.module
    extra = dict(count_include_pad=m.count_include_pad,
                 divisor_override=getattr(m, "divisor_override", None))
    return _pool_rule(ctx, type(m).__name__, ctx.node.args[0], m.kernel_size, m.stride,
                      m.padding, 1, m.ceil_mode, "avg", extra)


def avgpool_function(ctx: RuleContext) -> SpatialRule | Barrier:
    fn = ctx.node.target
    args = list(ctx.node.args) + [None] * 7
    kw = ctx.node.kwargs
    names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override"]
    defaults = [None, None, None, 0, False, True, None]
    a = {n: kw.get(n, args[i] if args[i] is not None else defaults[i]) for i, n in enumerate(names)}
    extra = dict(count_include_pad=a["count_include_pad"], divisor_override=a["divisor_override"])
    return _pool_rule(ctx, fn.__name__, a["input"], a["kernel_size"], a["stride"], a["padding"], 1,
                      a["ceil_mode"], "avg", extra)


# --------------------------------------------------------------------------- pads


def _pad_rule(ctx, op, x, pads, mode, value) -> SpatialRule | Barrier:
    if not _is_static(pads):
        return Barrier("pad amounts computed at run time (they depend on tensor shapes)")
    if mode == "circular":
        return Barrier("circular padding reads the opposite edge of the feature map")
    if mode not in ("constant", "reflect", "replicate"):
        return Barrier(f"pad mode {mode!r}")
    pads = list(pads)
    if len(pads) % 2 or len(pads) // 2 > ctx.nsp:
        return Barrier(f"pad {pads} touches a non-spatial axis")
    pairs = [(pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)]  # last axis first
    pairs += [(0, 0)] * (ctx.nsp - len(pairs))
    maps = tuple(Affine(p=pl, pr=pr) for pl, pr in reversed(pairs))
    pad = PadSpec(mode, float(value or 0.0))
    return _window_rule(ctx, op, x, maps, pad, "pad", {})


def pad_function(ctx: RuleContext) -> SpatialRule | Barrier:
    args = list(ctx.node.args) + [None] * 4
    kw = ctx.node.kwargs
    x, pads = kw.get("input", args[0]), kw.get("pad", args[1])
    mode = kw.get("mode", args[2] if args[2] is not None else "constant")
    value = kw.get("value", args[3])
    return _pad_rule(ctx, "pad", x, pads, mode, value)


def pad_module(ctx: RuleContext) -> SpatialRule | Barrier:
    m = ctx.module
    mode = {"Zero": "constant", "Constant": "constant", "Reflection": "reflect",
            "Replication": "replicate", "Circular": "circular"}
    kind = next(v for k, v in mode.items() if type(m).__name__.startswith(k))
    return _pad_rule(ctx, type(m).__name__, ctx.node.args[0], m.padding, kind,
                     getattr(m, "value", 0.0))


# --------------------------------------------------------------------------- resampling


def _interp_rule(ctx, op, x, size, scale, mode, align_corners, recompute) -> SpatialRule | Barrier:
    nsp = ctx.nsp
    axis_mode = {"nearest": "nearest", "nearest-exact": "nearest-exact", "linear": "linear",
                 "bilinear": "linear", "trilinear": "linear"}.get(mode)
    if axis_mode is None:
        return Barrier(f"interpolation mode {mode!r} (bicubic and area are not tiled)")
    if not _is_static(scale):
        return Barrier("interpolation with a scale factor computed at run time")
    out = ctx.out_spatial
    if out is None:
        return Barrier("output is not a spatial tensor")
    if scale is not None and not recompute:
        scales = _tup(scale, nsp)
        maps = tuple(Interp(axis_mode, bool(align_corners), float(sc)) for sc in scales)
    else:
        # An output size fixed at trace time (or recomputed scales): the map is only valid for
        # the traced sizes, so the rule fixes the output length.
        ins = ctx.spatial(x) or (None,) * nsp
        maps = tuple(Interp(axis_mode, bool(align_corners), None, o, i) for o, i in zip(out, ins))
    return _window_rule(ctx, op, x, maps, None, "interp", {})


def interpolate_function(ctx: RuleContext) -> SpatialRule | Barrier:
    a = ctx.bind(F.interpolate)
    return _interp_rule(ctx, "interpolate", a["input"], a["size"], a["scale_factor"], a["mode"],
                        a["align_corners"], a["recompute_scale_factor"])


def upsample_module(ctx: RuleContext) -> SpatialRule | Barrier:
    m = ctx.module
    return _interp_rule(ctx, type(m).__name__, ctx.node.args[0], m.size, m.scale_factor, m.mode,
                        m.align_corners, getattr(m, "recompute_scale_factor", None))


def pixel_shuffle(ctx: RuleContext) -> SpatialRule | Barrier:
    if ctx.nsp != 2:
        return Barrier("pixel shuffle outside 2-d networks")
    node = ctx.node
    if node.op == "call_module":
        r, down = (ctx.module.upscale_factor, False) if isinstance(ctx.module, nn.PixelShuffle) \
            else (ctx.module.downscale_factor, True)
    else:
        r, down = node.args[1], node.target is F.pixel_unshuffle
    if down:
        maps = (Affine(k=r, s=r),) * 2
    else:
        maps = (Interp("block", False, float(r)),) * 2
    return _window_rule(ctx, "pixel_unshuffle" if down else "pixel_shuffle", node.args[0], maps,
                        None, "shuffle", dict(factor=r, down=down))


# --------------------------------------------------------------------------- channel-only ops


def _channel_dim(ctx: RuleContext, dim: Any, rank: int) -> bool:
    return isinstance(dim, int) and 0 < (dim % rank) < rank - ctx.nsp


def cat(ctx: RuleContext) -> SpatialRule | Barrier:
    node = ctx.node
    tensors = node.kwargs.get("tensors", node.args[0])
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    shape = ctx.shape(node)
    if shape is None or not _channel_dim(ctx, dim, len(shape)):
        return Barrier(f"concatenation along dim {dim}, not a channel dim")
    return pointwise(ctx)


def chunk_split(ctx: RuleContext) -> SpatialRule | Barrier:
    node = ctx.node
    x = node.args[0]
    shape = ctx.shape(x)
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if shape is None or not _channel_dim(ctx, dim, len(shape)):
        return Barrier(f"{_op_name(node)} along dim {dim}, not a channel dim")
    if not _is_static(node.args[1:]):
        return Barrier(f"{_op_name(node)} with sizes computed at run time")
    return SpatialRule(op=_op_name(node), lowering="pointwise",
                       inputs=((x.name, (IDENTITY,) * ctx.nsp),))


def getitem(ctx: RuleContext) -> SpatialRule | Barrier:
    src = ctx.node.args[0]
    tm = src.meta.get("tensor_meta") if isinstance(src, Node) else None
    if isinstance(tm, (tuple, list)) and isinstance(ctx.node.args[1], int) and ctx.out_spatial:
        return SpatialRule(op="getitem", lowering="select",
                           inputs=((src.name, (IDENTITY,) * ctx.nsp),))
    return Barrier("indexing a tensor (may slice spatial axes)")


def channel_reshape(ctx: RuleContext) -> SpatialRule | Barrier:
    """view / reshape / transpose / permute that only regroup channels (channel shuffle)."""
    node = ctx.node
    x = node.args[0]
    ins, out = ctx.shape(x), ctx.shape(node)
    if ins is None or out is None:
        return Barrier("reshape of a non-tensor")
    nsp = ctx.nsp
    ok = (len(ins) >= nsp + 2 and len(out) >= nsp + 2 and ins[0] == out[0]
          and ins[-nsp:] == out[-nsp:] and math.prod(ins[1:-nsp]) == math.prod(out[1:-nsp]))
    name = _op_name(node)
    if name in ("transpose", "permute", "movedim"):
        rank = len(ins)
        if name == "transpose":
            dims = [node.args[1], node.args[2]] if len(node.args) > 2 else []
            ok = ok and len(dims) == 2 and all(_channel_dim(ctx, d, rank) for d in dims)
        else:
            perm = node.args[1:] if len(node.args) > 2 else _tup(node.args[1], 1)
            perm = [p % rank for p in perm]
            ok = ok and perm[0] == 0 and perm[-nsp:] == list(range(rank - nsp, rank))
        if not ok:
            return Barrier(f"{name} moves a spatial or batch axis")
        return SpatialRule(op=name, lowering="pointwise", inputs=((x.name, (IDENTITY,) * nsp),))
    if not ok:
        return Barrier(f"{name} from {ins} to {out} merges or splits spatial axes")
    return SpatialRule(op=name, lowering="reshape", inputs=((x.name, (IDENTITY,) * nsp),),
                       attrs=dict(prefix_rank=len(out) - nsp))


def flatten(ctx: RuleContext) -> SpatialRule | Barrier:
    return channel_reshape(ctx)


def stochastic_depth(ctx: RuleContext) -> SpatialRule | Barrier:
    """torchvision's stochastic depth: the identity in eval mode, random rows in training."""
    if ctx.bind(_tv_stochastic_depth)["training"] is not False:
        return Barrier("stochastic depth in training mode; call model.eval() first")
    return pointwise(ctx)


def global_barrier(ctx: RuleContext) -> Barrier:
    return Barrier(f"{_op_name(ctx.node)} reads the whole feature map (global or adaptive)")


# --------------------------------------------------------------------------- the table

RULES: dict[Any, Callable[[RuleContext], SpatialRule | Barrier]] = {}
for _m in _POINTWISE_MODULES + _DROPOUT_MODULES:
    RULES[_m] = module_pointwise
for _f in _POINTWISE_FUNCTIONS:
    RULES[_f] = pointwise
for _name in _POINTWISE_METHODS:
    RULES[("method", _name)] = pointwise
for _m in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    RULES[_m] = batchnorm
RULES[F.batch_norm] = functional_batchnorm
for _m in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    RULES[_m] = conv_module
for _f in (F.conv1d, F.conv2d, F.conv3d):
    RULES[_f] = conv_function
for _m in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    RULES[_m] = convtranspose_module
for _m in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    RULES[_m] = maxpool_module
for _f in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
    RULES[_f] = maxpool_function
for _m in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
    RULES[_m] = avgpool_module
for _f in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
    RULES[_f] = avgpool_function
for _m in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
           nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
           nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
           nn.CircularPad2d, nn.CircularPad3d):
    RULES[_m] = pad_module
RULES[F.pad] = pad_function
RULES[F.interpolate] = interpolate_function
RULES[nn.Upsample] = upsample_module
RULES[nn.UpsamplingNearest2d] = upsample_module
RULES[nn.UpsamplingBilinear2d] = upsample_module
for _k in (nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle):
    RULES[_k] = pixel_shuffle
RULES[torch.cat] = cat
RULES[torch.concat] = cat
for _k in (torch.chunk, torch.split, ("method", "chunk"), ("method", "split")):
    RULES[_k] = chunk_split
RULES[operator.getitem] = getitem
RULES[ChannelsLastBlock] = module_pointwise  # per-position work in NHWC, folded by passes.channels_last
RULES[_tv_stochastic_depth] = stochastic_depth
for _k in (("method", "view"), ("method", "reshape"), torch.reshape, ("method", "transpose"),
           torch.transpose, ("method", "permute"), torch.permute, torch.flatten,
           ("method", "flatten")):
    RULES[_k] = channel_reshape
for _m in (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
           nn.LocalResponseNorm):
    RULES[_m] = instance_like
for _m in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
    RULES[_m] = global_barrier
for _f in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean,
           ("method", "mean"), torch.sum, ("method", "sum"), torch.amax, F.adaptive_max_pool2d):
    RULES[_f] = global_barrier


def _op_name(node: Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def rule_for(node: Node, module: nn.Module | None, nsp: int) -> SpatialRule | Barrier:
    """The spatial rule of ``node``, or the barrier that stops tiling there.

    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1)))
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> ShapeProp(gm).propagate(torch.randn(1, 3, 16, 16))
    >>> rule = rule_for(list(gm.graph.nodes)[1], gm.get_submodule("0"), 2)
    >>> rule.lowering, rule.inputs[0][1][0]
    ('conv', Affine(k=3, s=2, p=1, pr=1, d=1, ceil_mode=False))
    """
    if node.op == "call_module":
        key = type(module)
    elif node.op == "call_method":
        key = ("method", node.target)
    elif node.op == "call_function":
        key = node.target
    else:
        return Barrier(f"{node.op} node")
    factory = RULES.get(key)
    if factory is None:
        return Barrier(f"{_op_name(node)} is not in tilefx's table of spatial ops")
    ctx = RuleContext(node, module, nsp)
    try:
        rule = factory(ctx)
    except (TypeError, KeyError, IndexError, ValueError) as e:  # an unusual call signature
        return Barrier(f"{_op_name(node)} called in a form the rule does not read ({e})")
    if isinstance(rule, SpatialRule) and _is_inplace(ctx):
        rule = SpatialRule(rule.op, rule.lowering, rule.inputs, rule.pad,
                           dict(rule.attrs, inplace=True))
    return rule
