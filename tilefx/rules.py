"""The rule table: one entry per ATen op, with everything tilefx knows about that op.

tilefx analyses the ATen graphs ``torch.export`` produces, where the module and functional
forms of an op are one op (``nn.Conv2d`` and ``F.conv2d`` are both ``aten.conv2d``). Each
entry of :data:`TABLE` is an :class:`OpEntry` registered with :func:`register` beside its code,
in the manner of inductor's ``@register_lowering``, and holds the op's four facts together:

* ``rule(ctx)``: its receptive-field rule, a :class:`SpatialRule` (how an output window maps to
  each spatial input's window, what the op's padding means) or a :class:`Barrier` with the
  reason it cannot be tiled (``reduction`` names statistics over space, which a later pass can
  split into a statistic and a pointwise application);
* ``emit(body, node, rule)``: what it emits into a tile body (``passes.tile_rewrite``);
* ``tile_data(...)``: the per-shape data its tile-body code reads (``tilefx.tiling``);
* ``cost``: its cost class for the memory and time models (``"conv"``, ``"maxpool"``,
  ``"pointwise"``).

Anything not in the table is a barrier: the table is conservative, never optimistic. Adding an
op is adding one entry here.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Node

from . import kernels
from .capture import InputGuards
from .statistics import Statistic
from .windows import IDENTITY, Affine, AxisMap, Interp, Transposed

__all__ = ["PadSpec", "SpatialRule", "Barrier", "RuleContext", "OpEntry", "TABLE", "register",
           "entry", "rule_for", "cost_class", "ZEROS", "NEG_INF"]

aten = torch.ops.aten


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
    """How one node maps output windows to input windows.

    ``inputs`` pairs each spatial input node's name with its per-axis maps; inputs not listed
    (per-channel or scalar operands, weights) pass through uncropped. ``kind`` names the
    table entry that emits and schedules it; ``attrs`` holds its parameters.
    """

    op: str
    kind: str
    inputs: tuple[tuple[str, tuple[AxisMap, ...]], ...]
    pad: PadSpec | None = None
    attrs: dict = field(default_factory=dict, compare=False)

    def out_sizes(self, in_sizes: tuple[int, ...]) -> tuple[int, ...]:
        maps = self.inputs[0][1]
        return tuple(m.out_len(n) for m, n in zip(maps, in_sizes))

    @property
    def entry(self) -> "OpEntry":
        return KINDS[self.kind]


@dataclass(frozen=True)
class Barrier:
    """A node tilefx cannot tile, and why. ``reduction`` names a statistic over space
    (``"group_norm"``, ``"mean"``...) for nodes that reduce the map rather than merely being
    unknown.

    A reduction a multi-pass region can split carries its ``statistic`` (what to accumulate
    over its first input, tile by tile) and, for a norm, ``apply``: the pointwise rule of its
    application once the statistic is known (None: the statistic is the node's own output).
    """

    reason: str
    reduction: str | None = None
    statistic: Statistic | None = field(default=None, compare=False)
    apply: "SpatialRule | None" = field(default=None, compare=False)


@dataclass
class RuleContext:
    """What a rule may look at: the node, its module (for call_module nodes) and shapes."""

    node: Node
    module: torch.nn.Module | None
    nsp: int  # number of spatial axes (the trailing dims of every region tensor)

    def shape(self, n: Any) -> tuple[int, ...] | None:
        tm = n.meta.get("tensor_meta") if isinstance(n, Node) else None
        if isinstance(tm, (tuple, list)) and tm and hasattr(tm[0], "shape"):
            tm = tm[0]  # chunk/split: every piece has the same spatial extent
        return tuple(tm.shape) if hasattr(tm, "shape") else None

    def spatial(self, n: Any) -> tuple[int, ...] | None:
        s = self.shape(n)
        return s[-self.nsp:] if s is not None and len(s) >= self.nsp + 2 else None

    @property
    def out_spatial(self) -> tuple[int, ...] | None:
        return self.spatial(self.node)

    @property
    def op(self) -> str:
        t = self.node.target
        return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))

    def args(self) -> dict[str, Any]:
        """The node's arguments by schema name, defaults applied."""
        return schema_args(self.node)

    def nonspatial_dim(self, dim: Any, rank: int) -> bool:
        """Whether ``dim`` is not a spatial axis (the batch and channel axes: tiles never cut
        them, so an op along them maps a window to itself)."""
        return isinstance(dim, int) and 0 <= (dim % rank) < rank - self.nsp

    def rule(self, entry: "OpEntry", inputs: list, pad: PadSpec | None = None,
             **attrs: Any) -> SpatialRule:
        return SpatialRule(self.op, entry.kind, tuple(inputs), pad, attrs)


class OpEntry:
    """One op's facts: its rule, its tile-body emission, its per-shape data, its cost class."""

    kind = "pointwise"
    #: cost class for the memory and time models: "conv", "maxpool" or "pointwise"
    cost = "pointwise"
    #: a window op: its crops read through its own pad semantics, and the tile loop pays a
    #: halo crop per call
    window = False

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:  # pragma: no cover - abstract
        raise NotImplementedError

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        """The op on its cropped spatial operands; everything else passes through."""
        return body.copy(n, {s: body.crop(n, s) for s, _ in rule.inputs})

    def tile_data(self, rule: SpatialRule, name: str, window: tuple, targets: list,
                  sizes: dict) -> Any:
        """Per-shape data one tile's body reads for this node (``tile.extra[name]``)."""
        return None


#: Every entry, keyed by the ATen op (packet or overload), operator.getitem, or module type.
TABLE: dict[Any, OpEntry] = {}
#: Every entry by its kind (what a SpatialRule names).
KINDS: dict[str, OpEntry] = {}


def register(*keys: Any) -> Callable[[type], type]:
    """Class decorator: register one instance of the entry under each key."""

    def wrap(cls: type) -> type:
        inst = cls()
        KINDS.setdefault(inst.kind, inst)
        for k in keys:
            TABLE[k] = inst
        return cls

    return wrap


def _ops(*names: str) -> list:
    """ATen op packets by name, skipping those this torch does not have."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _tup(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _is_static(v: Any) -> bool:
    """True when ``v`` holds no fx Node (a value fixed at capture time)."""
    if isinstance(v, Node):
        return False
    if isinstance(v, (tuple, list)):
        return all(_is_static(x) for x in v)
    return True


def _inplace(n: Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return schema is not None and any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


# --------------------------------------------------------------------------- pointwise


def _operand(ctx: RuleContext, u: Node, out: tuple[int, ...]) -> str:
    """``"spatial"`` (same extent as the output), ``"const"`` (constant over space: a per-
    channel or scalar operand) or ``"partial"`` (broadcasts along a spatial axis)."""
    shape = ctx.shape(u)
    if shape is None:
        return "const" if "tensor_meta" in u.meta or u.op == "get_attr" else "unknown"
    if len(shape) >= ctx.nsp and tuple(shape[-ctx.nsp:]) == tuple(out) and (
            math.prod(out) > 1 or len(shape) >= ctx.nsp + 2):
        return "spatial"
    aligned = shape[-ctx.nsp:] if len(shape) >= ctx.nsp else shape
    return "const" if all(d == 1 for d in aligned) else "partial"


def pointwise_rule(ctx: RuleContext, entry: OpEntry, operands: list[Node] | None = None
                   ) -> SpatialRule | Barrier:
    """A window maps to itself; per-channel and scalar operands pass through uncropped."""
    out = ctx.out_spatial
    if out is None:
        return Barrier("output is not a spatial tensor")
    inputs = []
    for u in operands if operands is not None else ctx.node.all_input_nodes:
        kind = _operand(ctx, u, out)
        if kind == "spatial":
            inputs.append((u.name, (IDENTITY,) * ctx.nsp))
        elif kind == "unknown":
            return Barrier(f"operand {u.name} is computed at run time and is not a tensor")
        elif kind == "partial":
            return Barrier(f"operand {u.name} of shape {ctx.shape(u)} broadcasts along a "
                           "spatial axis")
    if not inputs:
        return Barrier("no spatial operand")
    return ctx.rule(entry, inputs)


@register(*_ops(
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_",
    "celu", "celu_", "gelu", "gelu_", "silu", "silu_", "mish", "mish_", "hardtanh", "hardtanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "softplus", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "abs", "abs_", "neg", "neg_", "exp", "exp_", "log", "log_", "log1p",
    "sqrt", "sqrt_", "rsqrt", "rsqrt_", "square", "reciprocal", "sign", "erf", "floor", "ceil",
    "round", "trunc", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_",
    "clip", "clip_", "threshold", "threshold_", "prelu", "_prelu_kernel", "log_sigmoid",
    "softsign", "logit", "nan_to_num", "add", "add_", "sub", "sub_", "rsub", "mul", "mul_",
    "div", "div_", "pow", "pow_", "maximum", "minimum", "where", "masked_fill", "masked_fill_",
    "lerp", "addcmul", "addcdiv", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
    "logical_or", "logical_not", "bitwise_and", "copysign", "fmod", "remainder",
    "clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "lift_fresh_copy",
    "fill", "zeros_like", "ones_like", "full_like", "empty_like"))
class Pointwise(OpEntry):
    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        return pointwise_rule(ctx, self)


@register(*_ops("batch_norm", "_native_batch_norm_legit_no_training"))
class BatchNormEval(OpEntry):
    """Batch norm in eval mode: a per-channel affine map of its input alone."""

    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        if a.get("training") is True or a.get("running_mean") is None:
            return Barrier("batch_norm in training mode normalizes with batch statistics that "
                           "span space; call model.eval() before tilefx.transform",
                           reduction="batch_norm")
        return pointwise_rule(ctx, self, [ctx.node.args[0]])


@register(*_ops("dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
                "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_",
                "native_dropout"))
class DropoutEval(OpEntry):
    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        if ctx.args().get("train") is not False:
            return Barrier("dropout in training mode is random; call model.eval() first")
        return pointwise_rule(ctx, self, [ctx.node.args[0]])


@register(*_ops("cat", "concat", "concatenate", "stack"))
class Join(OpEntry):
    """cat along a non-spatial axis, or stack along a new one (an FPN's ``stack(...).sum(0)``):
    every operand's window is the output's."""

    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        shape = ctx.shape(ctx.node)
        if shape is None or not ctx.nonspatial_dim(a["dim"], len(shape)):
            return Barrier(f"{ctx.op} along dim {a['dim']}, a spatial dim")
        return pointwise_rule(ctx, self, [t for t in a["tensors"] if isinstance(t, Node)])


@register(*_ops("split", "split_with_sizes", "chunk", "unbind", "tensor_split"))
class ChannelSplit(OpEntry):
    """split / chunk along a channel dim: a tuple of windows, each read by a getitem."""

    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        x = ctx.node.args[0]
        shape = ctx.shape(x)
        if shape is None or not ctx.nonspatial_dim(a.get("dim", 0), len(shape)):
            return Barrier(f"{ctx.op} along dim {a.get('dim', 0)}, a spatial dim")
        if not _is_static(ctx.node.args[1:]):
            return Barrier(f"{ctx.op} with sizes computed at run time")
        if ctx.spatial(x) is None:
            return Barrier("input is not a spatial tensor")
        return ctx.rule(self, [(x.name, (IDENTITY,) * ctx.nsp)])


@register(operator.getitem)
class TupleItem(OpEntry):
    """One window of a split: the item, cropped to this node's own window."""

    kind = "select"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        src = ctx.node.args[0]
        tm = src.meta.get("tensor_meta") if isinstance(src, Node) else None
        if isinstance(tm, (tuple, list)) and isinstance(ctx.node.args[1], int) and ctx.out_spatial:
            return ctx.rule(self, [(src.name, (IDENTITY,) * ctx.nsp)])
        return Barrier("an item of a value that is not a spatial split")

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        item = body.call(operator.getitem, (body.env[src], n.args[1]), name=f"{n.name}_item",
                         origin=n.name)
        return body.call(kernels.halo_crop, (item, body.tile, n.name, src), name=n.name,
                         origin=n.name, role="halo_crop")


@register(*_ops("slice", "narrow", "select", "index_select"))
class ChannelSlice(OpEntry):
    """Slicing along a channel dim (``x[:, :k]``, ``narrow``, ``select``); a slice along a
    spatial dim is accepted only when it keeps the whole axis."""

    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        x = ctx.node.args[0]
        shape = ctx.shape(x)
        if shape is None:
            return Barrier("slice of a value that is not a tensor")
        rank = len(shape)
        dim = a.get("dim", 0)
        if not isinstance(dim, int):
            return Barrier(f"{ctx.op} along a dim computed at run time")
        if ctx.nonspatial_dim(dim, rank):
            if not _is_static(ctx.node.args[1:]):
                return Barrier(f"{ctx.op} with bounds computed at run time")
            return pointwise_rule(ctx, self, [x])
        if ctx.node.target.overloadpacket is aten.slice:
            # A slice that keeps the whole axis at any extent (open end) is a copy.
            start, end, step = a.get("start"), a.get("end"), a.get("step", 1)
            if start in (None, 0) and step == 1 and (end is None or (
                    isinstance(end, int) and end >= 2**31)):
                return pointwise_rule(ctx, self, [x])
        return Barrier(f"{ctx.op} along dim {dim} may cut a spatial axis")


@register(*_ops("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze",
                "unsqueeze"))
class ChannelView(OpEntry):
    """view / reshape that only regroup channel axes (channel shuffle); batch and spatial
    axes stay as they are. The body recomputes the view's shape from its window."""

    kind = "reshape"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        x = ctx.node.args[0]
        ins, out = ctx.shape(x), ctx.shape(ctx.node)
        nsp = ctx.nsp
        if ins is None or out is None:
            return Barrier("reshape of a value that is not a tensor")
        ok = (len(ins) >= nsp + 2 and len(out) >= nsp + 2 and ins[0] == out[0]
              and ins[-nsp:] == out[-nsp:] and math.prod(ins[1:-nsp]) == math.prod(out[1:-nsp]))
        if not ok:
            return Barrier(f"{ctx.op} from {ins} to {out} merges or splits spatial axes")
        return ctx.rule(self, [(x.name, (IDENTITY,) * nsp)], prefix_rank=len(out) - nsp)

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        shape = tuple(n.meta["tensor_meta"].shape)
        return body.call(kernels.window_view,
                         (body.crop(n, src), shape[1:len(shape) - body.nsp], body.nsp),
                         name=n.name, origin=n.name)


@register(*_ops("permute", "transpose", "movedim"))
class ChannelPermute(OpEntry):
    """Permutations that move only channel axes."""

    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        x = ctx.node.args[0]
        shape = ctx.shape(x)
        if shape is None or ctx.spatial(x) is None:
            return Barrier(f"{ctx.op} of a value that is not a spatial tensor")
        rank, nsp = len(shape), ctx.nsp
        a = ctx.args()
        if "dims" in a:
            perm = [p % rank for p in a["dims"]]
            ok = perm[0] == 0 and perm[-nsp:] == list(range(rank - nsp, rank))
        else:
            dims = [a.get("dim0", a.get("source")), a.get("dim1", a.get("destination"))]
            ok = all(ctx.nonspatial_dim(d, rank) for d in dims)
        if not ok:
            return Barrier(f"{ctx.op} moves a spatial or batch axis")
        return ctx.rule(self, [(x.name, (IDENTITY,) * nsp)])


@register(*_ops("mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean",
                "softmax", "_softmax", "log_softmax", "_log_softmax", "logsumexp", "norm",
                "linalg_vector_norm", "argmax", "argmin", "prod", "all", "any"))
class Reduction(OpEntry):
    """A reduction over non-spatial axes only is per position (CBAM's ``x.mean(1)``, a softmax
    over classes); over a spatial axis it is a statistic of the whole map."""

    kind = "pointwise"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        x = ctx.node.args[0]
        shape = ctx.shape(x)
        a = ctx.args()
        dims = a.get("dim")
        if shape is None or ctx.spatial(x) is None:
            return Barrier(f"{ctx.op} of a value that is not a spatial tensor")
        rank = len(shape)
        dims = list(range(rank)) if dims is None or dims == [] else _tup(dims, 1)
        if not hasattr(ctx.node.meta.get("tensor_meta"), "shape"):
            return Barrier(f"{ctx.op} returns several values", reduction=ctx.op)
        if all(ctx.nonspatial_dim(d, rank) for d in dims) and ctx.out_spatial == ctx.spatial(x):
            return ctx.rule(self, [(x.name, (IDENTITY,) * ctx.nsp)])
        name = str(ctx.node.target.overloadpacket.__name__)
        spatial = set(range(rank - ctx.nsp, rank))
        stat = None
        if (name in ("mean", "sum", "amax", "amin") and {d % rank for d in dims} == spatial
                and x.meta["tensor_meta"].dtype.is_floating_point):
            out = ctx.node.meta["tensor_meta"]
            stat = Statistic(name, keepdim=len(out.shape) == rank,
                             dtype=out.dtype if out.dtype != x.meta["tensor_meta"].dtype else None)
        return Barrier(f"{ctx.op} reduces over a spatial axis (a statistic of the whole map)",
                       reduction=name, statistic=stat)


# --------------------------------------------------------------------------- window ops


def _conv_maps(k, s, p, d, nsp) -> tuple[Affine, ...] | None:
    ks, ss, ds = _tup(k, nsp), _tup(s, nsp), _tup(d, nsp)
    if p == "valid":
        pads = ((0, 0),) * nsp
    elif p == "same":
        pads = tuple((dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2)
                     for kk, dd in zip(ks, ds))
    else:
        pads = tuple((pp, pp) for pp in _tup(p, nsp))
    return tuple(Affine(k=kk, s=sk, p=pl, pr=pr, d=dd)
                 for kk, sk, (pl, pr), dd in zip(ks, ss, pads, ds))


def _window_rule(ctx: RuleContext, entry: OpEntry, x: Node, maps, pad, **attrs):
    if len(maps) != ctx.nsp:
        return Barrier(f"{ctx.op} over {len(maps)} axes in a network with {ctx.nsp} spatial axes")
    if not isinstance(x, Node) or ctx.spatial(x) is None:
        return Barrier(f"{ctx.op} of a value that is not a spatial tensor")
    return ctx.rule(entry, [(x.name, maps)], pad, **attrs)


@register(*_ops("conv1d", "conv2d", "conv3d", "convolution", "_convolution"))
class Conv(OpEntry):
    """Convolution (any rank, groups, dilation, padding given or "same"/"valid"). Padding
    modes other than zeros reach the graph as a pad op before it (the Pad entry)."""

    kind = "conv"
    cost = "conv"
    window = True

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        if a.get("transposed"):
            return TRANSPOSED.rule(ctx)
        w = a["weight"]
        wshape = ctx.shape(w)
        if wshape is None or not _is_static((a["stride"], a["padding"], a["dilation"],
                                              a["groups"])):
            return Barrier("convolution with parameters computed at run time")
        nsp = len(wshape) - 2
        maps = _conv_maps(wshape[2:], a["stride"], a["padding"], a["dilation"], nsp)
        return _window_rule(ctx, self, a["input"], maps, ZEROS, stride=_tup(a["stride"], nsp),
                            dilation=_tup(a["dilation"], nsp), groups=a["groups"])

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        a = rule.attrs
        w, b = n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        nsp = body.nsp
        return body.call(aten.convolution.default,
                         (body.crop(n, src, rule.pad), body.value(w),
                          body.value(b) if isinstance(b, Node) else None, list(a["stride"]),
                          [0] * nsp, list(a["dilation"]), False, [0] * nsp, a["groups"]),
                         name=n.name, origin=n.name)


@register(*_ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
class ConvTransposed(OpEntry):
    """Transposed convolution: each tile runs the op padding-free on its input window and
    keeps the rows of its own output window (a placement crop), then adds the bias."""

    kind = "transposed"
    cost = "pointwise"  # no oneDNN workspace model for it (see passes.memory)

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        w = a["weight"]
        wshape = ctx.shape(w)
        keys = ("stride", "padding", "output_padding", "dilation", "groups")
        if wshape is None or not _is_static(tuple(a[k] for k in keys)):
            return Barrier("transposed convolution with parameters computed at run time")
        nsp = len(wshape) - 2
        st, p, op, d = (_tup(a[k], nsp) for k in ("stride", "padding", "output_padding",
                                                  "dilation"))
        maps = tuple(Transposed(k=k, s=s, p=pp, d=dd, output_padding=o)
                     for k, s, pp, dd, o in zip(wshape[2:], st, p, d, op))
        return _window_rule(ctx, self, a["input"], maps, None, stride=st, dilation=d,
                            groups=a["groups"])

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        a = rule.attrs
        w, b = n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        nsp = body.nsp
        y = body.call(aten.convolution.default,
                      (body.crop(n, src), body.value(w), None, list(a["stride"]), [0] * nsp,
                       list(a["dilation"]), True, [0] * nsp, a["groups"]),
                      name=f"{n.name}_full", origin=n.name)
        y = body.call(kernels.place, (y, body.tile, n.name), name=f"{n.name}_place",
                      origin=n.name, role="halo_crop")
        bias = body.value(b) if isinstance(b, Node) else None
        return body.call(kernels.add_channel_bias, (y, bias), name=n.name, origin=n.name)

    def tile_data(self, rule, name, window, targets, sizes):
        maps = rule.inputs[0][1]
        made = tuple(m.produced(lo, hi) for m, (lo, hi) in zip(maps, targets[0]))
        return tuple(kernels.Slice(max(a, m0) - m0, min(b, m1) - m0, max(m0 - a, 0),
                                   max(b - m1, 0))
                     for (a, b), (m0, m1) in zip(window, made))


TRANSPOSED = ConvTransposed()


@register(*_ops("max_pool1d", "max_pool2d", "max_pool3d"))
class MaxPool(OpEntry):
    kind = "maxpool"
    cost = "maxpool"
    window = True

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        nsp = ctx.nsp
        if not _is_static((a["kernel_size"], a["stride"], a["padding"], a["dilation"])):
            return Barrier("pooling with parameters computed at run time")
        ks = _tup(a["kernel_size"], nsp)
        ss = _tup(a["stride"] or a["kernel_size"], nsp)
        ps, ds = _tup(a["padding"], nsp), _tup(a["dilation"], nsp)
        maps = tuple(Affine(k=k, s=s, p=p, pr=p, d=d, ceil_mode=bool(a["ceil_mode"]))
                     for k, s, p, d in zip(ks, ss, ps, ds))
        return _window_rule(ctx, self, a["self"], maps, NEG_INF, kernel_size=ks, stride=ss,
                            dilation=ds)

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        a = rule.attrs
        op = {1: aten.max_pool1d, 2: aten.max_pool2d, 3: aten.max_pool3d}[body.nsp].default
        return body.call(op, (body.crop(n, src, rule.pad), list(a["kernel_size"]),
                              list(a["stride"]), [0] * body.nsp, list(a["dilation"]), False),
                         name=n.name, origin=n.name)


@register(*_ops("avg_pool1d", "avg_pool2d", "avg_pool3d"))
class AvgPool(OpEntry):
    """Average pooling; at the map's edges the divisor follows count_include_pad and
    ceil_mode exactly (a per-tile mask of the positions that count)."""

    kind = "avgpool"
    window = True

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        nsp = ctx.nsp
        if not _is_static((a["kernel_size"], a["stride"], a["padding"])):
            return Barrier("pooling with parameters computed at run time")
        ks = _tup(a["kernel_size"], nsp)
        ss = _tup(a["stride"] or a["kernel_size"], nsp)
        ps = _tup(a["padding"], nsp)
        maps = tuple(Affine(k=k, s=s, p=p, pr=p, ceil_mode=bool(a["ceil_mode"]))
                     for k, s, p in zip(ks, ss, ps))
        return _window_rule(ctx, self, a["self"], maps, ZEROS, kernel_size=ks, stride=ss,
                            count_include_pad=bool(a.get("count_include_pad", True)),
                            divisor_override=a.get("divisor_override"))

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        a = rule.attrs
        return body.call(kernels.window_avg_pool,
                         (body.crop(n, src, rule.pad), body.tile, n.name, a["kernel_size"],
                          a["stride"], a["divisor_override"]), name=n.name, origin=n.name)

    def tile_data(self, rule, name, window, targets, sizes):
        """Per axis, which positions of the read count in the divisor (None: all of them)."""
        a = rule.attrs
        maps = rule.inputs[0][1]
        n = sizes[rule.inputs[0][0]]
        if a["count_include_pad"] and not any(m.ceil_mode for m in maps):
            return None  # every window covers k positions of the padded map: a fixed divisor
        axes = []
        for m, (lo, hi), L in zip(maps, targets[0], n):
            first, last = (-m.p, L + m.pr) if a["count_include_pad"] else (0, L)
            axes.append(tuple(1.0 if first <= g < last else 0.0 for g in range(lo, hi)))
        return tuple(axes)


_PAD_MODES = {"constant_pad_nd": "constant", "reflection_pad1d": "reflect",
              "reflection_pad2d": "reflect", "reflection_pad3d": "reflect",
              "replication_pad1d": "replicate", "replication_pad2d": "replicate",
              "replication_pad3d": "replicate"}


@register(*_ops("pad", *_PAD_MODES))
class Pad(OpEntry):
    """Constant, reflect and replicate padding of spatial axes: the crop does the padding."""

    kind = "pad"
    window = True

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        a = ctx.args()
        name = ctx.node.target.overloadpacket.__name__
        mode = _PAD_MODES.get(name) or a.get("mode") or "constant"
        pads = a.get("pad", a.get("padding"))
        value = a.get("value") or 0.0
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
        return _window_rule(ctx, self, ctx.node.args[0], maps, PadSpec(mode, float(value)))

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        return body.crop(n, src, rule.pad)


# --------------------------------------------------------------------------- resampling


_INTERP_MODES = {"upsample_nearest1d": "nearest", "upsample_nearest2d": "nearest",
                 "upsample_nearest3d": "nearest", "_upsample_nearest_exact1d": "nearest-exact",
                 "_upsample_nearest_exact2d": "nearest-exact",
                 "_upsample_nearest_exact3d": "nearest-exact", "upsample_linear1d": "linear",
                 "upsample_bilinear2d": "linear", "upsample_trilinear3d": "linear"}


@register(*_ops(*_INTERP_MODES))
class Interpolate(OpEntry):
    """Nearest, nearest-exact and (bi/tri)linear upsampling or downsampling, align_corners
    either way: each output row blends its global source rows (``windows.Interp``)."""

    kind = "interp"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        n = ctx.node
        mode = _INTERP_MODES[n.target.overloadpacket.__name__]
        a = ctx.args()
        x = n.args[0]
        out, ins = ctx.out_spatial, ctx.spatial(x)
        if out is None or ins is None:
            return Barrier("output is not a spatial tensor")
        nsp = ctx.nsp
        if "scale_factors" in a:  # the .vec overloads
            scales = a["scale_factors"]
        else:
            keys = [k for k in a if k.startswith("scales")]
            scales = [a[k] for k in keys] if keys and all(a[k] is not None for k in keys) else None
        if not _is_static(scales):
            return Barrier("interpolation with a scale factor computed at run time")
        align = bool(a.get("align_corners") or False)
        if scales is not None and len(_tup(scales, nsp)) == nsp:
            maps = tuple(Interp(mode, align, float(s)) for s in _tup(scales, nsp))
        else:
            # An output size fixed at capture time: the map is only valid for the captured
            # input sizes, so the rule fixes them (another input extent is refused).
            maps = tuple(Interp(mode, align, None, o, i) for o, i in zip(out, ins))
        return ctx.rule(self, [(x.name, maps)])

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        return body.call(kernels.window_interpolate, (body.crop(n, src), body.tile, n.name),
                         name=n.name, origin=n.name)

    def tile_data(self, rule, name, window, targets, sizes):
        """Per axis: local source indices and weights for each output position, or, for
        nearest modes, what the body needs to take ATen's own indices (``windows.Interp``)."""
        (src, maps), = rule.inputs
        axes = []
        for m, (a, b), (t0, t1), li, lo in zip(maps, window, targets[0], sizes[src], sizes[name]):
            if m.mode in ("nearest", "nearest-exact"):
                axes.append(("aten", m.mode, m.scale, li, lo, a, b, t0, t1))
                continue
            s = [m.source(d, li, lo) for d in range(a, b)]
            axes.append((m.mode == "linear", tuple(v[0] - t0 for v in s),
                         tuple(v[1] - t0 for v in s), tuple(v[2] for v in s)))
        return tuple(axes)


@register(*_ops("pixel_shuffle", "pixel_unshuffle"))
class PixelShuffle(OpEntry):
    kind = "shuffle"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        if ctx.nsp != 2:
            return Barrier("pixel shuffle outside 2-d networks")
        n = ctx.node
        down = n.target.overloadpacket is aten.pixel_unshuffle
        r = n.args[1]
        if not isinstance(r, int):
            return Barrier("pixel shuffle with a factor computed at run time")
        maps = (Affine(k=r, s=r),) * 2 if down else (Interp("block", False, float(r)),) * 2
        return _window_rule(ctx, self, n.args[0], maps, None, factor=r, down=down)

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        a = rule.attrs
        op = aten.pixel_unshuffle.default if a["down"] else aten.pixel_shuffle.default
        y = body.call(op, (body.crop(n, src), a["factor"]),
                      name=n.name if a["down"] else f"{n.name}_full", origin=n.name)
        if a["down"]:
            return y
        return body.call(kernels.place, (y, body.tile, n.name), name=n.name, origin=n.name,
                         role="halo_crop")

    def tile_data(self, rule, name, window, targets, sizes):
        if rule.attrs["down"]:
            return None
        r = rule.attrs["factor"]
        return tuple(kernels.Slice(a - t0 * r, b - t0 * r) for (a, b), (t0, _)
                     in zip(window, targets[0]))


# --------------------------------------------------------------------------- barriers


@register(*_ops("group_norm", "native_group_norm", "instance_norm", "layer_norm",
                "native_layer_norm", "local_response_norm"))
class SpatialNorm(OpEntry):
    """Norms whose statistics span space: reductions, kept recognisable as such."""

    def rule(self, ctx: RuleContext) -> Barrier:
        name = ctx.node.target.overloadpacket.__name__
        reason = f"{name} normalizes with statistics that span space"
        a = ctx.args()
        x = a.get("input")
        shape = ctx.shape(x) if isinstance(x, Node) else None
        out = ctx.node.meta.get("tensor_meta")
        if shape is None or ctx.spatial(x) is None or not hasattr(out, "shape"):
            return Barrier(reason, reduction=name)
        if ctx.node.target == aten.group_norm.default:
            groups, weight, bias = a["num_groups"], a["weight"], a["bias"]
        elif ctx.node.target == aten.instance_norm.default and a["use_input_stats"]:
            groups, weight, bias = shape[1], a["weight"], a["bias"]
        elif ctx.node.target == aten.layer_norm.default and len(shape) == ctx.nsp + 2:
            # Over the spatial axes (per sample and channel) or over channels and space (per
            # sample): the moments of an instance norm or of a one-group group norm. An affine
            # over positions would be a map of its own, cropped per tile: not tiled.
            k = len(a["normalized_shape"])
            if k not in (ctx.nsp, ctx.nsp + 1):
                return Barrier(f"{reason} (over {k} trailing axes, part of the map)", reduction=name)
            if a["weight"] is not None or a["bias"] is not None:
                return Barrier(f"{reason}, with an elementwise affine over positions; use "
                               "elementwise_affine=False or a GroupNorm to tile it", reduction=name)
            groups, weight, bias = (shape[1] if k == ctx.nsp else 1), None, None
        else:
            return Barrier(reason, reduction=name)
        if not isinstance(groups, int) or not _is_static(a["eps"]) or shape[1] % groups:
            return Barrier(reason, reduction=name)
        stat = Statistic("moments", groups=groups, eps=float(a["eps"]))
        apply = ctx.rule(KINDS["norm_apply"], [(x.name, (IDENTITY,) * ctx.nsp)],
                         weight=weight, bias=bias)
        return Barrier(reason, reduction=name, statistic=stat, apply=apply)


class NormApply(OpEntry):
    """A norm inside a multi-pass region: pointwise, with the moments an earlier pass found
    (the tile body reads them as ``<node>_moments``)."""

    kind = "norm_apply"

    def emit(self, body: Any, n: Node, rule: SpatialRule) -> Node:
        (src, _), = rule.inputs
        args = [body.crop(n, src), body.env[f"{n.name}_moments"]]
        args += [body.value(w) if isinstance(w, Node) else w
                 for w in (rule.attrs["weight"], rule.attrs["bias"])]
        return body.call(kernels.norm_apply, args, name=n.name, origin=n.name)


KINDS["norm_apply"] = NormApply()


@register(kernels.group_moments)
class GroupMoments(OpEntry):
    """A norm's statistic as a node of its own (``kernels.group_moments(x, groups, eps, nsp)``:
    mean and 1/sqrt(var + eps) per sample and group), as ``passes.recompute`` splits a norm
    whose application is recomputed: a reduction a multi-pass region finds in a pass."""

    def rule(self, ctx: RuleContext) -> Barrier:
        x, groups, eps = ctx.node.args[:3]
        stat = Statistic("moments", groups=int(groups), eps=float(eps))
        return Barrier("group moments reduce over space (a statistic of the whole map)",
                       reduction="group_norm", statistic=stat)


@register(kernels.norm_apply)
class NormApplyNode(OpEntry):
    """``kernels.norm_apply(x, moments, weight, bias)`` as a node of the graph: pointwise in
    ``x``; the moments, weight and bias pass through uncropped."""

    kind = "norm_apply_node"

    def rule(self, ctx: RuleContext) -> SpatialRule | Barrier:
        return pointwise_rule(ctx, self, [ctx.node.args[0]])


@register(*_ops("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
                "adaptive_max_pool2d", "adaptive_max_pool3d"))
class GlobalPool(OpEntry):
    def rule(self, ctx: RuleContext) -> Barrier:
        kind = "mean" if "avg" in ctx.op else "amax"
        out = ctx.node.meta.get("tensor_meta")
        stat = None
        if kind == "mean" and hasattr(out, "shape") and ctx.spatial(ctx.node.args[0]) is not None \
                and all(d == 1 for d in out.shape[-ctx.nsp:]) and len(out.shape) == ctx.nsp + 2:
            stat = Statistic("mean", keepdim=True)
        return Barrier(f"{ctx.op} reads the whole feature map (global or adaptive pooling)",
                       reduction=kind, statistic=stat)


@register(*_ops("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                "bmm", "matmul", "baddbmm"))
class Attention(OpEntry):
    def rule(self, ctx: RuleContext) -> Barrier:
        return Barrier(f"{ctx.op} mixes positions (attention over the map)")


@register(InputGuards)
class Guards(OpEntry):
    def rule(self, ctx: RuleContext) -> Barrier:
        return Barrier("checks the input shapes against the capture's guards")


# --------------------------------------------------------------------------- lookups


def entry(node: Node, module: torch.nn.Module | None = None) -> OpEntry | None:
    """The table entry of ``node`` (None: not in the table)."""
    if node.op == "call_module":
        return TABLE.get(type(module))
    if node.op != "call_function":
        return None
    t = node.target
    return TABLE.get(t) or TABLE.get(getattr(t, "overloadpacket", None))


def schema_args(n: Node, args: tuple | None = None, kwargs: dict | None = None) -> dict[str, Any]:
    """An ATen node's arguments by schema name, defaults applied: the node's own (graph nodes
    and constants), or ``args``/``kwargs`` given for it (their evaluated values)."""
    args = n.args if args is None else args
    kwargs = n.kwargs if kwargs is None else kwargs
    out = {}
    for i, a in enumerate(n.target._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def cost_class(node: Node, module: torch.nn.Module | None = None) -> str | None:
    """``"conv"``, ``"maxpool"`` or None: which workspace and time rule a node falls under."""
    e = entry(node, module)
    if e is None or e.cost == "pointwise":
        return None
    if (e is KINDS["conv"] and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and schema_args(node).get("transposed")):
        # aten.convolution's flag (its 7th argument; conv2d's 7th is groups, not this)
        return None
    return e.cost


def rule_for(node: Node, module: torch.nn.Module | None, nsp: int) -> SpatialRule | Barrier:
    """The spatial rule of ``node``, or the barrier that stops tiling there.

    >>> import torch
    >>> from tilefx.capture import capture
    >>> from tilefx.passes.receptive_field import annotate
    >>> x = torch.randn(1, 3, 16, 16)
    >>> gm = annotate(capture(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1)).eval(), x), x)
    >>> conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    >>> rule = rule_for(conv, None, 2)
    >>> rule.kind, rule.inputs[0][1][0]
    ('conv', Affine(k=3, s=2, p=1, pr=1, d=1, ceil_mode=False))
    """
    if node.op not in ("call_function", "call_module"):
        return Barrier(f"{node.op} node")
    e = entry(node, module)
    ctx = RuleContext(node, module, nsp)
    if e is None:
        return Barrier(f"{ctx.op} is not in tilefx's table of spatial ops")
    try:
        rule = e.rule(ctx)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as err:
        return Barrier(f"{ctx.op} called in a form the rule does not read ({err})")
    if isinstance(rule, SpatialRule) and _inplace(node):
        rule = SpatialRule(rule.op, rule.kind, rule.inputs, rule.pad, dict(rule.attrs, inplace=True))
    return rule
