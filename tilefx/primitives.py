"""Convolution and linear primitives: which kernels can compute a node exactly, what each holds
beyond its output, and what one call costs on this machine.

Facts only: nothing here rewrites a graph (``tilefx.passes.primitives`` emits a chosen primitive
as an explicit node) or chooses (the planner does). Every fact is a pure function of an op's
parameters (:class:`OpParams`, no tensors) and an input shape, so the planner can ask about a
tile's window without running it.

=========  ========  ==========================================  ==============================
primitive  device    computes                                    emitted as
=========  ========  ==========================================  ==============================
onednn     cpu       any convolution (1-3d, groups, dilation);   ``tilefx.onednn_convolution``
                     float32, bfloat16, float16                  (``kernels.onednn_convolution``)
native     cpu       groups-1 convolution (1-3d, dilation), any  ``aten._slow_conv2d_forward``,
                     float dtype: ATen's own im2col + GEMM       ``slow_conv_dilated2d``,
                                                                 ``slow_conv3d_forward``,
                                                                 ``slow_conv_dilated3d``,
                                                                 ``kernels.conv1d_native``
matmul     any       1x1 groups-1 convolution without padding    ``kernels.conv1x1_matmul``,
                     (a stride reads every s-th position),       ``kernels.linear_matmul``
                     linear
cudnn      cuda      any convolution, as ATen dispatches it      ``aten.convolution``
=========  ========  ==========================================  ==============================

Not offered: transposed convolutions (every primitive refuses them for now); ``native`` for
groups > 1 (ATen's native path runs one convolution per group and concatenates, doubling the
output); ``onednn`` in float64 (oneDNN has no float64 kernels); ``native`` on CUDA (untested
here). On CUDA, torch 2.14 exposes no per-call workspace limit for cuDNN:
``aten.cudnn_convolution`` takes only the ``benchmark``/``deterministic``/``allow_tf32`` flags
(the search mode, not a limit), so ``cudnn`` is the convolution as ATen dispatches it and its
workspace is measured, not predicted.

**Workspaces** (bytes held during the call beyond the output), calibrated against the
profiler's allocator events (``tilefx.measure.peak_memory``), torch 2.14, CPU, float32; for
other float dtypes the same formulas scale with the element size, a rougher estimate, so
:func:`options` measures those. ``in``, ``w`` and ``out`` are the input, weight and output bytes:

* ``onednn``, NCHW input: it reorders input, weight and output into blocked layouts for the
  call: ``max(in' + w + out16 + extra, out16 + out) - out``, where ``in'`` is ``in`` with its
  channels rounded up to 16 (0 for fewer than 16 input channels: oneDNN reads those as they
  are), ``out16`` the output with channels rounded up to 16, and ``extra``,
  for a strided 1-2d 1x1 convolution whose input extents divide by the stride only, one
  sample's strided input per thread (the only formula that depends on
  ``torch.get_num_threads()``). Channels-last input (or weight): ``w`` for the weight reorder,
  another ``w`` when the weight is not channels-last already (ATen copies it to channels-last
  first), ``in`` when the input is not, and a 12 KiB scratchpad for groups 1. A 512->512 3x3 convolution reorders
  9 MiB of weights on every call, whatever its map size.
* ``native``: im2col columns ``N * C_in * prod(k) * prod(out spatial)`` elements (one sample's
  worth for a dilated convolution, whose columns are reused per sample; none for a 1x1
  convolution with stride 1 and no padding). A channels-last 2-d input adds ``w`` (the weight is
  copied to channels-last), a channels-last 3-d input adds ``in`` (it is made contiguous).
* ``matmul``: nothing for stride 1; a strided 1x1 convolution copies the strided input once
  (``N * C_in * prod(out spatial)`` elements). Linear: nothing.

ATen's own dispatch (the node as captured) runs ``onednn`` or ``native``:
:func:`default_primitive` says which, with the rule of ATen's ``use_mkldnn`` (torch 2.14).

>>> import torch
>>> from tilefx.primitives import OpParams, candidates_for, workspace_bytes
>>> p = OpParams("conv", (512, 512, 3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
>>> candidates_for(p)
('onednn', 'native')
>>> round(workspace_bytes("onednn", p, (1, 512, 7, 7)) / 2**20, 2)  # the 9 MiB weight reorder
9.1
>>> round(workspace_bytes("native", p, (1, 512, 7, 7)) / 2**20, 2)  # im2col columns
0.86
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any, Callable, Iterable

import torch
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from . import cache, kernels
from .errors import TilingError

__all__ = ["uses_onednn", "OpParams", "Primitive", "PrimitiveOption", "CallFacts", "PRIMITIVES", "op_params",
           "candidates", "candidates_for", "refusal", "workspace_bytes", "onednn_nchw_workspace",
           "onednn_blocked", "onednn_input_reorder",
           "onednn_channels_last_workspace", "native_layout_copy", "input_facts",
           "measure_workspace", "time_primitives", "options", "default_primitive", "call_params",
           "call_facts", "call_operands", "call_workspace", "emitted_primitive"]

aten = torch.ops.aten

#: oneDNN's channel block for float32 on an AVX-512 machine (16 floats, one vector): its blocked
#: layouts (``nChw16c``) hold channels rounded up to it. Calibrated on AVX-512 only; an AVX2
#: machine blocks by 8, which these formulas over-predict.
ONEDNN_BLOCK = 16

#: oneDNN's scratchpad for a groups-1 convolution on channels-last data (measured: 12336 bytes
#: for most shapes, up to ~140 KiB for 1x1 convolutions of many channels at small maps).
ONEDNN_NHWC_SCRATCH = 12336


# --------------------------------------------------------------------------- the op's parameters


@dataclass(frozen=True)
class OpParams:
    """A convolution's or linear's parameters: everything a primitive's facts depend on except
    the input's shape and layout. Holds no tensor (a cache key that keeps nothing alive).

    ``padding`` is symmetric per spatial axis. ``weight_channels_last``: the weight is stored
    channels-last (a model moved to ``torch.channels_last``).
    """

    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    transposed: bool = False
    weight_channels_last: bool = False

    @property
    def nsp(self) -> int:
        return len(self.weight_shape) - 2 if self.kind == "conv" else 0

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def cin(self) -> int:
        return self.weight_shape[1] * (self.groups if self.kind == "conv" else 1)

    @property
    def cout(self) -> int:
        return self.weight_shape[0]

    def out_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape for ``input_shape``."""
        if self.kind == "linear":
            return tuple(input_shape[:-1]) + (self.cout,)
        sp = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(
            input_shape[2:], self.kernel, self.stride, self.padding, self.dilation))
        return (input_shape[0], self.cout) + sp

    def tiled(self) -> "OpParams":
        """The op as a tile body runs it: on a halo crop that already holds its padding."""
        return replace(self, padding=(0,) * self.nsp)


def _tup(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


@dataclass(frozen=True)
class _Tensor:
    """The facts of a tensor a primitive reads: no data."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str

    @property
    def channels_last(self) -> bool:
        return _channels_last(self.shape, self.stride)


def _tensor_facts(t: Any) -> _Tensor | None:
    """The facts of a tensor (real or fake), a ShapeProp ``TensorMetadata``, or None."""
    if isinstance(t, _Tensor):
        return t
    if isinstance(t, torch.Tensor):
        return _Tensor(tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type)
    if hasattr(t, "shape") and hasattr(t, "stride") and hasattr(t, "dtype"):
        return _Tensor(tuple(t.shape), tuple(t.stride), t.dtype, "cpu")
    return None


def _channels_last(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Channels innermost (the layout ``kernels.memory_format`` calls channels_last)."""
    if len(shape) not in (4, 5) or shape[1] <= 1 or stride[1] != 1:
        return False
    expected, contiguous = 1, True
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != expected:
            contiguous = False
        expected *= n
    return not contiguous


def _params(kind: str, weight: Any, bias: Any, stride=(), padding=(), dilation=(), groups=1,
            transposed=False) -> OpParams | None:
    wf = _tensor_facts(weight)
    if wf is None:
        return None
    shape, dtype, device = wf.shape, wf.dtype, wf.device
    if kind == "linear":
        return OpParams("linear", shape, bias=bias is not None, dtype=dtype, device=device)
    nsp = len(shape) - 2
    k = shape[2:]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * nsp
        else:  # "same": symmetric only when every axis pads an even total
            d = _tup(dilation, nsp)
            totals = [dd * (kk - 1) for kk, dd in zip(k, d)]
            if any(t % 2 for t in totals):
                return None
            padding = tuple(t // 2 for t in totals)
    return OpParams("conv", shape, _tup(stride, nsp), _tup(padding, nsp), _tup(dilation, nsp),
                    int(groups), bias is not None, dtype, device, bool(transposed),
                    wf.channels_last)


_DEFAULT_CONV = {getattr(aten, k) for k in ("conv1d", "conv2d", "conv3d", "convolution",
                                            "_convolution")}


def _value(v: Any, root: torch.nn.Module | None) -> Any:
    """A graph value's tensor facts: its ShapeProp metadata (the example's shapes), its fake
    value (export's: a batch-1 example is captured at batch 2), or (a parameter read in a tile
    body, which carries no metadata) the tensor itself."""
    if not isinstance(v, Node):
        return v
    meta, val = _tensor_facts(v.meta.get("tensor_meta")), _tensor_facts(v.meta.get("val"))
    if meta is not None:
        return replace(meta, device=val.device) if val is not None else meta
    if val is not None:
        return val
    if v.op == "get_attr" and root is not None:
        return attrgetter(v.target)(root)
    return None


def op_params(node: Node, root: torch.nn.Module | None = None) -> OpParams | None:
    """The parameters of a convolution or linear node (as captured, in a tile body, or an
    emitted primitive), or None for any other node or a form no primitive reads (parameters
    computed at run time, ``padding="same"`` with asymmetric padding). ``root``: the module
    that owns the node's parameters, for nodes without metadata (tile bodies)."""
    if node.op != "call_function":
        return None
    args = tuple(_value(a, root) for a in node.args)
    kwargs = {k: _value(v, root) for k, v in node.kwargs.items()}
    return call_params(node.target, args, kwargs)


def input_facts(node: Node, root: torch.nn.Module | None = None) -> tuple[tuple[int, ...], bool] | None:
    """The input's (shape, channels-last layout) of a convolution or linear node, from its
    metadata (or ``root``'s tensors), or None where neither is known."""
    x = _value(node.args[0], root) if node.args else None
    f = _tensor_facts(x)
    return (f.shape, f.channels_last) if f is not None else None


# --------------------------------------------------------------------------- the primitives


@dataclass(frozen=True)
class Primitive:
    """One way to compute a convolution or linear: what it refuses, the call it is, and what
    it holds beyond its output.

    ``refuse(p)``: why it cannot compute ``p`` exactly (None: it can). ``emit(p, x, w, b)``:
    ``(target, args)`` of its call on input ``x``, weight ``w`` and bias ``b`` (tensors, or fx
    nodes when a pass emits it: the timed call and the emitted node are the same call).
    ``workspace(p, input_shape, channels_last)``: bytes beyond the output, or None where no
    formula is known (cuDNN).
    """

    name: str
    summary: str
    refuse: Callable[[OpParams], str | None]
    emit: Callable[..., tuple[Any, tuple]]
    workspace: Callable[[OpParams, tuple[int, ...], bool], int | None]


def _onednn_ok(p: OpParams) -> bool:
    return (p.device == "cpu" and torch.backends.mkldnn.is_available()
            and (p.dtype == torch.float32
                 or (p.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
                 or (p.dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported())))


def _refuse_common(p: OpParams, name: str) -> str | None:
    if p.kind == "conv" and p.transposed:
        return f"{name} is not offered for transposed convolutions"
    if not p.dtype.is_floating_point:
        return f"{name} computes float tensors only, not {p.dtype}"
    return None


def _onednn_refuse(p: OpParams) -> str | None:
    if p.kind != "conv":
        return "onednn is offered for convolutions only (a float32 linear packs no weights)"
    if p.device != "cpu":
        return "onednn runs on CPU only"
    if not _onednn_ok(p):
        return f"oneDNN has no {p.dtype} convolution on this machine"
    return _refuse_common(p, "onednn")


def _onednn_emit(p: OpParams, x, w, b):
    return (torch.ops.tilefx.onednn_convolution.default,
            (x, w, b, list(p.stride), list(p.padding), list(p.dilation), p.groups))


def _nbytes(shape: Iterable[int], p: OpParams) -> int:
    return math.prod(shape) * p.dtype.itemsize


def _both_layouts(p: OpParams) -> bool:
    """A weight whose contiguous layout is also channels-last (1x1 kernels, one input channel
    per group): ATen does not copy it."""
    return p.weight_shape[1] == 1 or math.prod(p.kernel) == 1


def onednn_blocked(channels: int) -> float:
    """Bytes of oneDNN's blocked copy of an NCHW map per byte of the map: its channels rounded
    up to :data:`ONEDNN_BLOCK` (24 channels are held as 32)."""
    return (-(-channels // ONEDNN_BLOCK) * ONEDNN_BLOCK) / max(channels, 1)


def onednn_input_reorder(cin: int) -> float:
    """Bytes of oneDNN's blocked copy of an NCHW convolution's input per byte of the input:
    none for fewer channels than one block (oneDNN reads the plain layout), else
    :func:`onednn_blocked`."""
    return 0.0 if cin < ONEDNN_BLOCK else onednn_blocked(cin)


def onednn_nchw_workspace(in_bytes: int, cin: int, w_bytes: int, out_bytes: int, cout: int,
                          extra_bytes: int = 0) -> int:
    """oneDNN's bytes beyond the output for an NCHW convolution: input (one block of channels
    or more), weight and output reordered to blocked layouts, channels rounded up to the block
    (:func:`onednn_blocked`), plus ``extra_bytes`` held with them (a strided 1x1 convolution's,
    :func:`workspace_bytes`)."""
    in_r = int(in_bytes * onednn_input_reorder(cin))
    out16 = int(out_bytes * onednn_blocked(cout))
    held = max(in_r + w_bytes + out16 + extra_bytes, out16 + out_bytes)
    return max(held - out_bytes, 0)


def onednn_channels_last_workspace(p: OpParams, in_bytes: float, channels_last: bool) -> float:
    """oneDNN's bytes beyond the output when the input (``channels_last``) or the weight is
    channels-last: the input reordered when it is not, the weight copied to channels-last
    (unless its layout is that already) and reordered, and a groups-1 convolution's
    scratchpad. ``in_bytes``: the input's bytes (a tile's window, for the planner)."""
    w = _nbytes(p.weight_shape, p)
    clone = 0 if (p.weight_channels_last or _both_layouts(p)) else w
    return ((0 if channels_last else in_bytes) + clone + w
            + (ONEDNN_NHWC_SCRATCH if p.groups == 1 else 0))


def native_layout_copy(p: OpParams, in_bytes: float, channels_last: bool) -> float:
    """What ATen's native convolution copies for a channels-last input beyond its columns: a
    2-d one's weight, made channels-last (unless its layout is that already); a 3-d one's
    input, made contiguous."""
    if channels_last and p.nsp == 2 and not (p.weight_channels_last or _both_layouts(p)):
        return _nbytes(p.weight_shape, p)
    if channels_last and p.nsp == 3:
        return in_bytes
    return 0


def _onednn_workspace(p: OpParams, shape: tuple[int, ...], channels_last: bool) -> int:
    inp, w, out = _nbytes(shape, p), _nbytes(p.weight_shape, p), _nbytes(p.out_shape(shape), p)
    if channels_last or p.weight_channels_last:
        return onednn_channels_last_workspace(p, inp, channels_last)
    extra = 0
    if (p.nsp <= 2 and all(k == 1 for k in p.kernel) and any(s > 1 for s in p.stride)
            and all(n % st == 0 for n, st in zip(shape[2:], p.stride))):
        # a strided 1x1 (1-2d) whose input divides by its stride gathers one sample's strided
        # input per thread (torch.get_num_threads(), read at call time)
        extra = (torch.get_num_threads() * p.cin * math.prod(p.out_shape(shape)[2:])
                 * p.dtype.itemsize)
    return onednn_nchw_workspace(inp, shape[1], w, out, p.cout, extra)


_NATIVE_OPS = {(2, False): aten._slow_conv2d_forward.default,
               (2, True): aten.slow_conv_dilated2d.default,
               (3, False): aten.slow_conv3d_forward.default,
               (3, True): aten.slow_conv_dilated3d.default}


def _native_refuse(p: OpParams) -> str | None:
    if p.kind != "conv":
        return "native is a convolution primitive; a linear runs as matmul"
    if p.device != "cpu":
        return "native is offered on CPU only"
    if p.groups != 1:
        return (f"native is offered for groups=1 only (got groups={p.groups}: ATen's native "
                "path runs one convolution per group and concatenates them)")
    if p.nsp not in (1, 2, 3):
        return f"native computes 1-3d convolutions, not {p.nsp}-d"
    return _refuse_common(p, "native")


def _native_emit(p: OpParams, x, w, b):
    dilated = any(d != 1 for d in p.dilation)
    if p.nsp == 1:
        return kernels.conv1d_native, (x, w, b, p.stride, p.padding, p.dilation)
    op = _NATIVE_OPS[(p.nsp, dilated)]
    args = (x, w, list(p.kernel), b, list(p.stride), list(p.padding))
    return op, args + ((list(p.dilation),) if dilated else ())


def _native_workspace(p: OpParams, shape: tuple[int, ...], channels_last: bool) -> int:
    out_sp = p.out_shape(shape)[2:]
    per_sample = p.cin * math.prod(p.kernel) * math.prod(out_sp) * p.dtype.itemsize
    if any(d != 1 for d in p.dilation):
        cols = per_sample  # one sample's columns, reused sample by sample
    elif (all(k == 1 for k in p.kernel) and all(s == 1 for s in p.stride)
          and all(q == 0 for q in p.padding)):
        cols = 0
    else:
        cols = shape[0] * per_sample
    return cols + native_layout_copy(p, _nbytes(shape, p), channels_last)


def _matmul_refuse(p: OpParams) -> str | None:
    if p.kind == "linear":
        return _refuse_common(p, "matmul")
    if p.groups != 1 or any(k != 1 for k in p.kernel):
        return (f"matmul computes 1x1 convolutions with groups=1 only (got kernel {p.kernel}, "
                f"groups={p.groups})")
    if any(q != 0 for q in p.padding):
        return f"matmul computes no padding (got padding {p.padding})"
    return _refuse_common(p, "matmul")


def _matmul_emit(p: OpParams, x, w, b):
    if p.kind == "linear":
        return kernels.linear_matmul, (x, w, b)
    return kernels.conv1x1_matmul, (x, w, b, p.stride)


def _matmul_workspace(p: OpParams, shape: tuple[int, ...], channels_last: bool) -> int:
    if p.kind == "linear" or all(s == 1 for s in p.stride):
        return 0
    return shape[0] * p.cin * math.prod(p.out_shape(shape)[2:]) * p.dtype.itemsize


def _cudnn_refuse(p: OpParams) -> str | None:
    if p.kind != "conv" or p.device != "cuda":
        return "cudnn computes convolutions on CUDA only"
    return _refuse_common(p, "cudnn")


def _cudnn_emit(p: OpParams, x, w, b):
    return aten.convolution.default, (x, w, b, list(p.stride), list(p.padding), list(p.dilation),
                                      False, [0] * p.nsp, p.groups)


#: Every primitive, in the order candidates are listed.
PRIMITIVES: dict[str, Primitive] = {pr.name: pr for pr in (
    Primitive("onednn", "oneDNN (ATen's default CPU convolution): reorders weights per call",
              _onednn_refuse, _onednn_emit, _onednn_workspace),
    Primitive("native", "ATen's own im2col + GEMM convolution, without oneDNN",
              _native_refuse, _native_emit, _native_workspace),
    Primitive("matmul", "one matrix product (1x1 convolutions, linear), no weight packing",
              _matmul_refuse, _matmul_emit, _matmul_workspace),
    Primitive("cudnn", "cuDNN, as ATen dispatches a CUDA convolution",
              _cudnn_refuse, _cudnn_emit, lambda p, shape, cl: None),
)}


def _primitive(name: str) -> Primitive:
    if name not in PRIMITIVES:
        raise TilingError(f"unknown primitive {name!r}; the primitives are {sorted(PRIMITIVES)}")
    return PRIMITIVES[name]


def refusal(name: str, params: OpParams) -> str | None:
    """Why primitive ``name`` cannot compute ``params`` exactly (None: it can)."""
    return _primitive(name).refuse(params)


def candidates_for(params: OpParams) -> tuple[str, ...]:
    """The primitives that compute ``params`` exactly on its device, in :data:`PRIMITIVES`
    order."""
    return tuple(n for n, pr in PRIMITIVES.items() if pr.refuse(params) is None)


def candidates(node: Node, root: torch.nn.Module | None = None) -> tuple[str, ...]:
    """The primitives that can compute ``node`` exactly (empty for a node that is not a
    convolution or linear a primitive reads).

    >>> import torch
    >>> from tilefx.capture import capture
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=8))
    >>> gm = capture(m.eval(), torch.randn(1, 8, 16, 16))
    >>> [candidates(n) for n in gm.graph.nodes if n.op == "call_function"]
    [('onednn', 'native', 'matmul'), ('onednn',)]
    """
    p = op_params(node, root)
    return candidates_for(p) if p is not None else ()


def workspace_bytes(name: str, params: OpParams, input_shape: tuple[int, ...],
                    channels_last: bool = False) -> int | None:
    """Bytes primitive ``name`` holds beyond its output while computing ``params`` on an input
    of ``input_shape`` (channels-last or not): the formulas of the module docstring. None where
    no formula is known (cuDNN)."""
    return _primitive(name).workspace(params, tuple(input_shape), channels_last)


def default_primitive(params: OpParams, input_shape: tuple[int, ...]) -> str:
    """The primitive ATen's own dispatch runs for ``params`` on ``input_shape``.

    On CPU, ATen's ``use_mkldnn`` (torch 2.14): bfloat16 and float16 run on oneDNN; float32
    does when the convolution is grouped, its kernel exceeds 3 on both of the last two axes,
    the batch exceeds 1, or the input's first four dims hold more than 20480 elements (a 1-d
    input counts as ``(N, C, 1, L)``). Small groups-1 convolutions, such as a tile's at a small
    window, run native. Linear runs as a matrix product.

    >>> p = OpParams("conv", (64, 64, 3, 3), (1, 1), (1, 1), (1, 1))
    >>> default_primitive(p, (1, 64, 56, 56)), default_primitive(p, (1, 64, 8, 8))
    ('onednn', 'native')
    """
    if params.kind == "linear":
        return "matmul"
    if params.device == "cuda":
        return "cudnn"
    if not _onednn_ok(params) or params.transposed:
        return "native"
    if params.dtype != torch.float32:
        return "onednn"
    k = (1,) * max(2 - params.nsp, 0) + params.kernel
    shape4 = tuple(input_shape[:2]) + (1,) * max(2 - params.nsp, 0) + tuple(input_shape[2:])
    ones = (1,) * len(k)
    big = uses_onednn(input_shape[0], math.prod(shape4[:4]), k[-2:],
                      params.stride or ones, params.dilation or ones, params.groups,
                      torch.get_num_threads())
    return "onednn" if big else "native"


def uses_onednn(batch: int, numel: float, kernel: tuple, stride: tuple, dilation: tuple,
                groups: int, threads: int) -> bool:
    """Whether ATen runs a float32 CPU convolution through oneDNN rather than its own im2col
    path: ATen's dispatch rule (``ConvParams::use_mkldnn``, torch 2.14), checked against
    ``torch._C._select_conv_backend`` by the tests. ``numel`` counts the input's first four
    dims, ``kernel`` is its last two axes. A small single-image input (at most 20480 elements,
    as a tile's window can be) with a kernel of at most 3 on an axis and no groups runs native,
    and so does a 1x1 convolution on one thread.

    >>> uses_onednn(1, 16 * 34 * 34, (3, 3), (1, 1), (1, 1), 1, 2)
    False
    >>> uses_onednn(1, 32 * 34 * 34, (3, 3), (1, 1), (1, 1), 1, 2)
    True
    """
    strided = any(v != 1 for v in stride)
    dilated = any(v != 1 for v in dilation)
    one = all(v == 1 for v in kernel)
    worth = strided or dilated or batch >= 16 or not one or threads > 1
    large = groups > 1 or all(v > 3 for v in kernel) or batch > 1 or numel > 20480
    return worth and large


# --------------------------------------------------------------------------- calls in a graph


@dataclass(frozen=True)
class CallFacts:
    """What a call in a graph computes: which primitive runs it (for a convolution or linear
    as captured: the one ATen's dispatch picks), its parameters, and its input's shape and
    layout."""

    primitive: str
    params: OpParams
    input_shape: tuple[int, ...]
    channels_last: bool

    @property
    def workspace_bytes(self) -> int | None:
        return workspace_bytes(self.primitive, self.params, self.input_shape, self.channels_last)


def _pos(*names: str) -> Callable[[tuple, dict], dict]:
    def read(args: tuple, kwargs: dict) -> dict:
        out = dict(zip(names, args))
        out.update({k: v for k, v in kwargs.items() if k in names})
        return out
    return read


# Every call target a primitive emits -> (primitive, op kind); a primitive of None is the op as
# captured, whose primitive ATen's dispatch decides (as for aten.conv2d, not listed).
_EMITTED: dict[Any, tuple[str | None, str]] = {
    torch.ops.tilefx.onednn_convolution.default: ("onednn", "conv"),
    torch.ops.mkldnn._convolution_pointwise.default: ("onednn", "conv"),
    aten._slow_conv2d_forward.default: ("native", "conv"),
    aten.slow_conv_dilated2d.default: ("native", "conv"),
    aten.slow_conv3d_forward.default: ("native", "conv"),
    aten.slow_conv_dilated3d.default: ("native", "conv"),
    kernels.conv1d_native: ("native", "conv"),
    kernels.conv1x1_matmul: ("matmul", "conv"),
    kernels.linear_matmul: ("matmul", "linear"),
    aten.linear.default: (None, "linear"),
}
_KERNEL_ARGS = {
    kernels.conv1d_native: _pos("input", "weight", "bias", "stride", "padding", "dilation"),
    kernels.conv1x1_matmul: _pos("input", "weight", "bias", "stride"),
    kernels.linear_matmul: _pos("input", "weight", "bias"),
}


def emitted_primitive(target: Any) -> str | None:
    """The primitive a call target is the emitted form of (what ``passes.primitives``
    writes), or None. ``aten.convolution`` is ATen's own dispatch, not an emitted form."""
    entry = _EMITTED.get(target)
    return entry[0] if entry is not None else None


def _bound(target: Any, args: tuple, kwargs: dict) -> dict | None:
    """A convolution's or linear's arguments by name (None: not such a call)."""
    if target not in _EMITTED and getattr(target, "overloadpacket", None) not in _DEFAULT_CONV:
        return None
    if target in _KERNEL_ARGS:
        return _KERNEL_ARGS[target](args, kwargs)
    bound = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
    return bound.kwargs if bound is not None else None


def call_operands(target: Any, args: tuple,
                  kwargs: dict | None = None) -> tuple[Any, Any, Any] | None:
    """``(input, weight, bias)`` of a convolution or linear call (graph nodes or tensors, as
    given), or None for any other call."""
    a = _bound(target, args, kwargs or {})
    return _operands_of(a) if a is not None else None


def _operands_of(a: dict) -> tuple[Any, Any, Any]:
    return (a.get("input", a.get("self", a.get("X"))), a.get("weight", a.get("W")),
            a.get("bias", a.get("B")))


def call_params(target: Any, args: tuple, kwargs: dict | None = None) -> OpParams | None:
    """The parameters of a call ``target(*args, **kwargs)`` whose weight is a tensor (real,
    fake, or ShapeProp metadata): a convolution or linear as captured, or an emitted primitive.
    None for anything else, and for transposed convolutions (no primitive computes them)."""
    a = _bound(target, args, kwargs or {})
    if a is None:
        return None
    _, w, b = _operands_of(a)
    entry = _EMITTED.get(target)
    if (entry[1] if entry is not None else "conv") == "linear":
        return _params("linear", w, b)
    if any(isinstance(a.get(k), Node) for k in ("stride", "padding", "dilation", "groups")):
        return None  # parameters computed at run time
    p = _params("conv", w, b, a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1),
                a.get("groups", 1) or 1, bool(a.get("transposed", False)))
    return None if p is None or p.transposed else p


def call_facts(target: Any, args: tuple, kwargs: dict | None = None) -> CallFacts | None:
    """:func:`call_params` plus the input's shape and layout, and which primitive runs the
    call: the emitted one, or for a call as captured the one ATen's dispatch picks."""
    p = call_params(target, args, kwargs)
    x = call_operands(target, args, kwargs)[0] if p is not None else None
    xf = _tensor_facts(x)
    if xf is None:
        return None
    name = emitted_primitive(target) or default_primitive(p, xf.shape)
    return CallFacts(name, p, xf.shape, xf.channels_last)


def call_workspace(target: Any, args: tuple, kwargs: dict | None = None) -> int | None:
    """Workspace bytes of a call (see :func:`call_facts`); None when it is not a convolution
    or linear call, or no formula is known for its primitive."""
    f = call_facts(target, args, kwargs)
    return f.workspace_bytes if f is not None else None


# --------------------------------------------------------------------------- measured facts


def _operands(p: OpParams, shape: tuple[int, ...], channels_last: bool):
    dev = torch.device(p.device)
    x = torch.randn(shape, dtype=p.dtype, device=dev)
    fan_in = max(p.weight_shape[1] * math.prod(p.kernel), 1)
    w = torch.randn(p.weight_shape, dtype=p.dtype, device=dev) / math.sqrt(fan_in)
    b = torch.randn(p.cout, dtype=p.dtype, device=dev) if p.bias else None
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}
    if channels_last and x.dim() in fmt:
        x = x.contiguous(memory_format=fmt[x.dim()])
    if p.weight_channels_last and w.dim() in fmt:
        w = w.contiguous(memory_format=fmt[w.dim()])
    # Parameters, as a module's are: they require grad, which changes dispatch under no_grad too
    # (torch.matmul copies its input where the weight requires grad).
    w = torch.nn.Parameter(w)
    b = None if b is None else torch.nn.Parameter(b)
    return x, w, b


def _call(name: str, p: OpParams, x, w, b) -> Callable[[], torch.Tensor]:
    target, args = _primitive(name).emit(p, x, w, b)
    return lambda: target(*args)


def measure_workspace(name: str, params: OpParams, input_shape: tuple[int, ...],
                      channels_last: bool = False) -> int:
    """Workspace of one call of primitive ``name``, measured: the call's peak (profiler
    allocator events on CPU, the allocator's counters on CUDA) less its output's bytes."""
    from .measure import peak_memory

    x, w, b = _operands(params, tuple(input_shape), channels_last)
    fn = _call(name, params, x, w, b)
    with torch.no_grad():
        out = fn()
        out_bytes = out.untyped_storage().nbytes()
        del out
        return max(peak_memory(fn, device=params.device) - out_bytes, 0)


#: Measured seconds per call, keyed by (params, input shape, channels_last, threads, primitive):
#: plain values only, so the cache keeps no tensor or module alive.
_TIMES: dict[tuple, float] = {}
_WORKSPACES: dict[tuple, int] = {}


def time_primitives(params: OpParams, input_shape: tuple[int, ...], names: Iterable[str],
                    channels_last: bool = False, rounds: int = 11, quantile: float = 0.25,
                    min_sample_s: float = 2e-3) -> dict[str, float]:
    """Seconds per call of each primitive in ``names`` on ``input_shape``, measured here and
    cached per (params, shape, layout, thread count, primitive).

    Robust to a noisy machine: the primitives run interleaved (the order rotates every round,
    so load hits them alike), each sample times enough back-to-back calls to last
    ``min_sample_s``, and the result is a low quantile of the ``rounds`` samples (the least
    disturbed, not the luckiest).
    """
    shape = tuple(input_shape)
    names = list(names)
    key = (params, shape, channels_last, torch.get_num_threads())
    for n in names:  # another process's measurement on this machine (``tilefx.cache``)
        if key + (n,) not in _TIMES:
            kept = cache.load("primitive_times", key + (n,))
            if isinstance(kept, float):
                _TIMES[key + (n,)] = kept
    todo = [n for n in names if key + (n,) not in _TIMES]
    if todo:
        x, w, b = _operands(params, shape, channels_last)
        calls = {n: _call(n, params, x, w, b) for n in todo}
        sync = torch.cuda.synchronize if params.device == "cuda" else (lambda: None)
        with torch.no_grad():
            reps = {}
            for n, fn in calls.items():
                fn()  # warm up: oneDNN builds its primitive on the first call
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                reps[n] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-7)))
            samples: dict[str, list[float]] = {n: [] for n in todo}
            for r in range(rounds):
                shift = r % len(todo)
                for n in todo[shift:] + todo[:shift]:
                    fn = calls[n]
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(reps[n]):
                        fn()
                    sync()
                    samples[n].append((time.perf_counter() - t0) / reps[n])
        for n, ts in samples.items():
            ts.sort()
            low = ts[min(int(quantile * len(ts)), len(ts) - 1)]
            _TIMES[key + (n,)] = low
            cache.store("primitive_times", key + (n,), low)
        del x, w, b, calls
    return {n: _TIMES[key + (n,)] for n in names}


@dataclass(frozen=True)
class PrimitiveOption:
    """One primitive for one node at one input shape: its workspace (bytes beyond the output)
    and measured seconds per call. ``default``: it is what ATen's dispatch runs for the node
    as captured (choosing it changes nothing but the explicit node)."""

    name: str
    workspace_bytes: int
    time_s: float
    default: bool = False


def _workspace(name: str, p: OpParams, shape: tuple[int, ...], cl: bool) -> int:
    ws = workspace_bytes(name, p, shape, cl)
    if ws is not None and p.dtype == torch.float32:
        return ws
    key = (p, shape, cl, torch.get_num_threads(), name)  # no calibrated formula: measure once
    if key not in _WORKSPACES:
        _WORKSPACES[key] = measure_workspace(name, p, shape, cl)
    return _WORKSPACES[key]


def options(node: Node, input_shape: tuple[int, ...] | None = None, *,
            root: torch.nn.Module | None = None, tile: bool = False,
            channels_last: bool | None = None, timed: bool = True,
            max_workspace_bytes: int = 2**30) -> list[PrimitiveOption]:
    """Every primitive that can compute ``node``, with its workspace and time at
    ``input_shape`` (default: the node's traced input).

    ``tile=True``: ``input_shape`` is a tile's halo crop, which holds the padding already, so
    the op runs unpadded (as in a tile body). ``channels_last``: the input's layout (default:
    the traced input's). ``timed=False`` skips the measurement (``time_s`` is NaN), and so is
    a primitive whose predicted workspace exceeds ``max_workspace_bytes`` never run (native's
    columns for a 64-channel 3x3 convolution at 1024x1024 are 2.3 GiB).

    >>> import torch
    >>> from tilefx.capture import capture
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1)).eval()
    >>> gm = capture(m, torch.randn(1, 256, 14, 14))
    >>> conv = next(n for n in gm.graph.nodes if n.op == "call_function")
    >>> opts = options(conv, (1, 256, 14, 14), timed=False)
    >>> [(o.name, round(o.workspace_bytes / 2**20, 2), o.default) for o in opts]
    [('onednn', 2.44, True), ('native', 1.72, False)]
    """
    p = op_params(node, root)
    if p is None:
        raise TilingError(f"node {node.format_node()} is not a convolution or linear that a "
                          f"primitive computes; primitives apply to convolutions and linears")
    traced = input_facts(node, root)
    if input_shape is None:
        if traced is None:
            raise TilingError(f"node {node.format_node()} carries no input shape; pass "
                              "input_shape")
        input_shape = traced[0]
    if channels_last is None:
        channels_last = traced[1] if traced is not None else False
    shape = tuple(int(s) for s in input_shape)
    if tile:
        p = p.tiled()
    names = candidates_for(p)
    predicted = {n: workspace_bytes(n, p, shape, channels_last) for n in names}
    runnable = [n for n in names if (predicted[n] or 0) <= max_workspace_bytes]
    times = {n: math.nan for n in names}
    if timed:
        times.update(time_primitives(p, shape, runnable, channels_last))
    default = default_primitive(p, shape)
    return [PrimitiveOption(n, _workspace(n, p, shape, channels_last) if n in runnable
                            else predicted[n], times[n], n == default) for n in names]
