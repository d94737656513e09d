"""Static memory model: the liveness of a graph's tensors, untiled or tiled.

:func:`simulate` predicts the quantity ``tilefx.measure.peak_memory`` measures (docs/design.md,
"What peak memory means"): the highest total of tensor bytes alive at once during the forward
call. Weights and the caller's input are alive before the call and are not counted; the
tensors the call creates are, its outputs included.

The graph runs once under a ``FakeTensorMode`` (shapes and storages only, no data, no
compute), so the model sees what eager sees: views and in-place ops share their input's
storage (``ReLU(inplace=True)``, ``view``/``reshape``/``flatten``, eval-mode dropout), and a
storage is freed after the last node that reads any of its aliases (fx's generated code drops
every value after its last use). A :class:`~tilefx.region.TiledRegion` call counts its
full-size output buffers plus the peak inside one tile: its body is fake-run once per distinct
tile shape of the schedule. A :class:`~tilefx.stream_region.StreamRegion` call counts its
full-size outputs, its row buffers, and the largest stage call of any strip.

Operators also allocate scratch memory that no fx node names. On CPU (the ``"cpu"`` workspace
model) every convolution and linear call, as captured or as an emitted primitive
(``passes.primitives``), is charged the workspace of the primitive that runs it
(``tilefx.primitives``: for a call as captured, the one ATen's dispatch picks for its input,
so a tile's small window can run native where the whole map runs oneDNN). The formulas were
calibrated against the profiler's allocator events (torch 2.14, float32, NCHW and
channels-last): oneDNN reorders input, weight and output into blocked layouts for the call
with channels rounded up to its block of 16 (on a channels-last input the weight alone,
copied to channels-last first when it is not), native holds its im2col columns, a matrix
product nothing. Max pooling holds two outputs besides its own. The weight reorder matters: ResNet's last 3x3 convolutions reorder 9 MiB of
weights, a floor no tiling of the early layers can lower; the ``native`` primitive lowers it.
ATen's dispatch rule between oneDNN and its own im2col path is
:func:`tilefx.primitives.uses_onednn`; the plan model prices a tile's window with it.
"""

from __future__ import annotations

import math
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
from torch import nn
from torch.fx import GraphModule
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

from ..kernels import Gather, write_tile
from ..primitives import (OpParams, call_facts, default_primitive, onednn_nchw_workspace,
                          uses_onednn, workspace_bytes)
from ..region import TiledRegion
from ..rules import cost_class, schema_args
from ..stream_kernels import NEW_SUFFIX, stream_write
from ..stream_region import StreamRegion
from .channels_last import ChannelsLastBlock

__all__ = ["MemoryProfile", "Step", "simulate", "record", "liveness", "cpu_workspace", "conv_workspace",
           "uses_onednn", "im2col_workspace", "conv_scratch", "tile_workspace_kind"]


@dataclass(frozen=True)
class MemoryProfile:
    """Predicted memory of one forward call.

    ``curve`` holds, for every step (a node of the outer graph; a tiled region is one step),
    the bytes alive while it runs: live tensors, its new outputs and its scratch memory.
    """

    peak_bytes: int
    peak_node: str
    curve: tuple[tuple[str, int], ...]
    workspace: str | None = None

    def __str__(self) -> str:
        return (f"predicted peak {self.peak_bytes / 2**20:.2f} MiB at {self.peak_node} "
                f"({len(self.curve)} steps, workspace model {self.workspace or 'none'})")


@dataclass
class Step:
    """One step of a liveness simulation.

    ``allocs``: storages it creates (key, bytes); ``reads``: storages it reads (they stay
    alive through it); ``transient``: scratch bytes held only while it runs.
    """

    name: str
    allocs: list[tuple[Any, int]] = field(default_factory=list)
    reads: list[Any] = field(default_factory=list)
    transient: int = 0


def liveness(steps: list[Step], keep: Iterable[Any] = ()) -> tuple[int, str, list[tuple[str, int]]]:
    """Peak bytes, the step where it happens, and the curve of a step sequence.

    A storage lives from the step that creates it through the last step that reads it; the
    storages in ``keep`` (the call's outputs) live to the end.

    >>> s = [Step("a", [("a", 4)]), Step("b", [("b", 8)], ["a"]), Step("c", [("c", 2)], ["b"])]
    >>> liveness(s, keep=["c"])
    (12, 'b', [('a', 4), ('b', 12), ('c', 10)])
    """
    last: dict[Any, int] = {}
    for i, st in enumerate(steps):
        for k, _ in st.allocs:
            last[k] = max(last.get(k, i), i)
        for k in st.reads:
            if k in last:
                last[k] = i
    end = len(steps)
    for k in keep:
        if k in last:
            last[k] = end
    frees: dict[int, list[Any]] = {}
    for k, i in last.items():
        frees.setdefault(i, []).append(k)
    size: dict[Any, int] = {}
    live = peak = 0
    peak_at = steps[0].name if steps else ""
    curve = []
    for i, st in enumerate(steps):
        for k, b in st.allocs:
            if k not in size:
                size[k] = b
                live += b
        during = live + st.transient
        curve.append((st.name, during))
        if during > peak:
            peak, peak_at = during, st.name
        for k in frees.get(i, ()):
            live -= size.pop(k, 0)
    return peak, peak_at, curve


# --------------------------------------------------------------------------- workspace models


#: oneDNN scratch bytes of one NCHW convolution, beyond its output (bytes in, bytes out; the
#: planner's vectorised model reads it): ``tilefx.primitives.onednn_nchw_workspace``.
conv_workspace = onednn_nchw_workspace


def tile_workspace_kind(node: torch.fx.Node, module: nn.Module | None) -> str | None:
    """``"conv"``, ``"maxpool"`` or None: which workspace rule a node falls under (its rule
    table entry's cost class)."""
    return cost_class(node, module)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def im2col_workspace(cin: int, kernel: tuple, stride: tuple, padding: tuple, out_positions: float,
                     batch: int, itemsize: int) -> float:
    """Scratch bytes of ATen's im2col convolution: the columns (``cin * prod(kernel)`` rows, one
    column per output position), unless a 1x1 kernel with stride 1 and no padding reads its
    input as they are."""
    if all(v == 1 for v in kernel) and all(v == 1 for v in stride) and not any(padding):
        return 0.0
    return batch * cin * math.prod(kernel) * out_positions * itemsize


def cpu_workspace(node: torch.fx.Node, module: nn.Module | None, args: tuple, kwargs: dict,
                  out: Any) -> int:
    """Scratch bytes of one node's call on CPU, given its evaluated arguments: the workspace
    of the convolution or linear primitive that runs it, or max pooling's (see the module
    docstring)."""
    if node.op == "call_function":
        if node.target is torch.ops.aten.matmul.default and len(args) >= 2:
            return matmul_workspace(*args[:2])
        facts = call_facts(node.target, args, kwargs)
        if facts is not None:
            return facts.workspace_bytes or 0
    if tile_workspace_kind(node, module) == "maxpool" and isinstance(out, torch.Tensor):
        return 2 * _nbytes(out)
    return 0


def _fold_copy(t: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Bytes ``t.reshape(shape)`` copies: none where it is a view, all of ``t`` otherwise."""
    try:
        t.view(shape)
        return 0
    except (RuntimeError, ValueError):  # ValueError: a fake tensor's view
        return _nbytes(t)


def matmul_workspace(a: Any, b: Any) -> int:
    """Scratch bytes of ``aten.matmul`` on CPU: the operands it copies to fold their batch
    dimensions into one for ``bmm`` (or ``a``'s into rows for ``mm``), which it does where the
    batch dimensions are not laid out as one: a window attention's queries and keys, heads
    permuted ahead of windows (Swin V2 @128: 0.75 MiB a call, the measured peak's 18%).
    Broadcast operands are copied expanded."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return 0
    if a.dim() < 2 or b.dim() < 2 or (a.dim() == 2 and b.dim() == 2):
        return 0  # vectors and plain matrix products run on the operands as they are
    if b.dim() == 2:  # a's batch dimensions are folded into the rows of one mm
        return _fold_copy(a, (-1, a.shape[-1]))
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    total = 0
    for t in (a, b):
        e = t.expand(tuple(batch) + tuple(t.shape[-2:]))
        total += _fold_copy(e, (-1,) + tuple(t.shape[-2:]))
    return total


def conv_scratch(params: OpParams, x_shape: tuple, channels_last: bool = False,
                 primitive: str | None = None) -> int:
    """Scratch bytes of one CPU convolution on an input of ``x_shape`` (its layout:
    ``channels_last``), as a streaming strip runs it: the workspace of ``primitive``, by
    default the one ATen's dispatch picks there (:func:`~tilefx.primitives.default_primitive`),
    the same model :func:`simulate` counts: oneDNN's reorders, or ATen's native im2col columns.

    >>> from tilefx.primitives import OpParams
    >>> p = OpParams("conv", (512, 512, 3, 3), (1, 1), (0, 0), (1, 1))
    >>> conv_scratch(p, (1, 512, 3, 10))  # native: 512 * 9 rows of 8 columns
    147456
    """
    name = primitive or default_primitive(params, x_shape)
    return workspace_bytes(name, params, x_shape, channels_last) or 0


def _op_params(node: torch.fx.Node, args: tuple, kwargs: dict):
    """(input, weight, kernel, stride, padding, dilation, groups) of an ATen convolution or
    pooling node, given its evaluated arguments (read by schema name)."""
    a = schema_args(node, args, kwargs)
    x = a.get("input", a.get("self"))
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    if cost_class(node) == "conv":
        w, s = a["weight"], a["stride"]
        k = tuple(w.shape[2:]) if isinstance(w, torch.Tensor) else ()
        nsp = len(k)
        p = a.get("padding", 0)
        p = (0,) * nsp if p == "valid" else (1,) * nsp if isinstance(p, str) else tup(p)
        d, g = tup(a.get("dilation", 1)), a.get("groups", 1)
        return x, w, k, tup(s), p, d, g if isinstance(g, int) else 1
    w, k, s = None, a["kernel_size"], a["stride"]
    return x, w, tup(k), tup(s), (), (), 1


# --------------------------------------------------------------------------- the recorder


def _tensors(value: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(value)
    out = []
    for v in flat:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out.extend(t for t in v.values() if isinstance(t, torch.Tensor))
    return out


class _Recorder(torch.fx.Interpreter):
    """Runs a graph on fake tensors and turns every node into a :class:`Step`."""

    def __init__(self, gm: GraphModule, workspace: str | None, external: set | None = None):
        super().__init__(gm, garbage_collect_values=False)
        self.workspace = workspace
        self.steps: list[Step] = []
        self.external: set = set(external or ())  # storages that exist before the call
        self.keep: list[Any] = []
        self.info: dict[str, dict] = {}  # per node: storage, bytes, workspace parameters, MACs

    def _key(self, t: torch.Tensor) -> StorageWeakRef:
        return StorageWeakRef(t.untyped_storage())

    def run_node(self, n: torch.fx.Node) -> Any:
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        before = {self._key(t) for t in _tensors((args, kwargs))}
        if isinstance(module, (TiledRegion, StreamRegion)):
            region_step = _region_step if isinstance(module, TiledRegion) else _stream_step
            result, step = region_step(module, args, self.workspace, self.external)
            step.name = n.name
            step.reads = list(before)
            self.steps.append(step)
            return result
        result = getattr(self, n.op)(n.target, args, kwargs)
        if n.op in ("placeholder", "get_attr"):
            self.external.update(self._key(t) for t in _tensors(result))
            return result
        if n.op == "output":
            self.keep = [self._key(t) for t in _tensors(result)]
            return result
        if n.op == "call_function" and n.target in (write_tile, stream_write):
            return result  # copies into a buffer the region step accounts for
        step = Step(n.name, reads=[k for k in before if k not in self.external])
        seen = set(before)
        for t in _tensors(result):
            k = self._key(t)
            if k not in seen and k not in self.external:
                step.allocs.append((k, t.untyped_storage().nbytes()))
                seen.add(k)
        kind = tile_workspace_kind(n, module)
        info = self.info[n.name] = {"kind": kind, "macs": _macs(n, module, args, kwargs, result)}
        if isinstance(result, torch.Tensor):
            info.update(key=self._key(result), nbytes=_nbytes(result), channels=(
                result.shape[1] if result.dim() > 1 else 1))
        if isinstance(module, ChannelsLastBlock) and isinstance(result, torch.Tensor):
            step.transient = _block_transient(module, args[0], result, self.workspace, self.external)
            # per output position, so a tile's share follows its window (plan_model.tile_cost)
            info["transient_pp"] = step.transient / max(math.prod(result.shape[2:]), 1)
        if kind is not None:
            x, w, k_, s, p_, d_, g_ = _op_params(n, args, kwargs)
            if kind == "conv" and isinstance(w, torch.Tensor):
                info.update(w_bytes=_nbytes(w), pw=all(k == 1 for k in k_) and any(v > 1 for v in s),
                            kernel=k_, stride=s, dilation=d_ or (1,) * len(k_), groups=g_)
        if self.workspace == "cpu" and n.op == "call_function":
            step.transient = cpu_workspace(n, module, args, kwargs, result)
        self.steps.append(step)
        return result


def _block_transient(block: ChannelsLastBlock, x: torch.Tensor, out: torch.Tensor,
                     workspace: str | None, external: set) -> int:
    """What a folded channels-last block holds beyond its output: its body's own peak (the
    MLP's hidden activation) less the output it leaves behind."""
    inner = _Recorder(block.body, workspace,
                      external=set(external) | {StorageWeakRef(x.untyped_storage())})
    n = block.nsp
    inner.run(x.permute(0, *range(2, n + 2), 1))
    peak, _, _ = liveness(inner.steps)
    return max(int(peak) - out.untyped_storage().nbytes(), 0)


_LINEAR = (torch.ops.aten.linear.default,)
_CONV_PACKETS = {getattr(torch.ops.aten, k) for k in (
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d")}


def _transposed(n: torch.fx.Node) -> bool:
    return (n.target.overloadpacket.__name__.startswith("conv_transpose")
            or bool(schema_args(n).get("transposed")))


def _macs(n: torch.fx.Node, module: nn.Module | None, args: tuple, kwargs: dict, out: Any) -> int:
    """Multiply-accumulates of a convolution or linear node (0 for everything else)."""
    if not isinstance(out, torch.Tensor):
        return 0
    if isinstance(module, ChannelsLastBlock):  # its linear layers, at every position
        positions = out.numel() // max(out.shape[1], 1)
        return positions * sum(
            math.prod(_attr(module.body, m.args[1].target).shape) for m in module.body.graph.nodes
            if m.op == "call_function" and m.target in _LINEAR and m.args[1].op == "get_attr")
    if n.op != "call_function":
        return 0
    if getattr(n.target, "overloadpacket", None) in _CONV_PACKETS:
        w = args[1] if len(args) > 1 else kwargs["weight"]
        if _transposed(n):
            return args[0].numel() * w.shape[1] * math.prod(w.shape[2:])
        return out.numel() * w.shape[1] * math.prod(w.shape[2:])
    if n.target in _LINEAR:
        w = args[1] if len(args) > 1 else kwargs["weight"]
        return out.numel() * w.shape[1]
    return 0


def _attr(root: nn.Module, target: str) -> Any:
    return attrgetter(target)(root)


def _tile_signature(tile) -> tuple:
    lengths = tuple(tuple(hi - lo for lo, hi in w) for w in tile.need.values())
    pads = tuple(tuple(isinstance(s, Gather) or bool(s.pad_lo or s.pad_hi) for s in table)
                 for table in tile.crops.values())
    return lengths, pads


def _region_step(region, args: tuple, workspace: str | None, external: set) -> tuple[Any, Step]:
    """A TiledRegion call as one step: its output buffers (and a multi-pass region's
    statistics), and one tile's peak as scratch."""
    sched = region.schedule_for(region.input_sizes(args))
    buffers = region.new_buffers()
    body_peak = 0
    seen: set = set()
    outside = set(external) | {StorageWeakRef(t.untyped_storage()) for t in _tensors(args)}
    for tile in sched.tiles:
        sig = _tile_signature(tile)
        if sig in seen:
            continue  # a tile shaped like one already simulated
        seen.add(sig)
        ext = outside | {StorageWeakRef(b.untyped_storage()) for b in _tensors(list(buffers.values()))}
        rec = _Recorder(region.body, workspace, external=ext)
        rec.run(*args, buffers, tile)
        peak, _, _ = liveness(rec.steps)
        body_peak = max(body_peak, peak)
    outs = region.results(buffers)
    step = Step("", allocs=[(StorageWeakRef(b.untyped_storage()), b.untyped_storage().nbytes())
                            for b in outs], transient=body_peak)
    return outs, step


def _stream_step(region: StreamRegion, args: tuple, workspace: str | None,
                 external: set) -> tuple[Any, Step]:
    """A StreamRegion call as one step: its full-size outputs, and as scratch the most it holds
    at once: what its state holds when a stage starts (row buffers, outputs, new rows kept for
    later readers of the strip) plus the stage's own peak and the storage its write allocates.
    Stages run in strip order; each body is recorded once per distinct set of rows it computes
    and reads, and otherwise just run (on fake tensors)."""
    sched = region.schedule_for(region.input_sizes(args))
    spec = region.spec
    state: dict[str, Any] = {n: args[i] for n, i in zip(spec.region.inputs, region.spatial_args)}
    inputs = set(state)
    outside = set(external) | {StorageWeakRef(t.untyped_storage()) for t in _tensors(args)}

    def storages() -> dict[Any, tuple[str, int]]:
        out = {}
        for k, t in state.items():
            if k not in inputs:
                out[StorageWeakRef(t.untyped_storage())] = (k, t.untyped_storage().nbytes())
        return out

    peaks: dict[tuple, int] = {}
    most = 0
    for strip in sched.strips:
        for k in strip.stages:
            names = spec.stages[k]
            mine = {key: r for key, r in strip.reads.items() if key[0] in names}
            sig = (k, tuple(strip.rows[n][1] - strip.rows[n][0] for n in names),
                   tuple((key, r.pad_lo, r.pad_hi, r.release,
                          r.pieces and tuple((w, b - a) for w, a, b in r.pieces))
                         for key, r in mine.items()))
            before = storages()
            # New rows of earlier stages this stage's reads drop: alive until that read.
            dropped = {p + NEW_SUFFIX: f"{c}_read_{p}" for (c, p), r in mine.items() if r.release}
            gone = {key for key, (name, _) in before.items() if name in dropped}
            if sig not in peaks:
                ext = outside | set(before)
                rec = _Recorder(region.stages[k], workspace, external=ext)
                rec.run(*args, state, strip)
                steps = list(rec.steps)
                held = Step("held", allocs=[(key, before[key][1]) for key in gone])
                for st in steps:
                    st.reads = list(st.reads) + [key for key in gone
                                                 if dropped[before[key][0]] == st.name]
                peaks[sig] = int(liveness([held] + steps)[0])
            else:
                region.stages[k](*args, state, strip)
            after = storages()
            made = sum(b for key, (name, b) in after.items()
                       if key not in before and not name.endswith(NEW_SUFFIX))
            kept = sum(b for key, (_, b) in before.items() if key not in gone)
            most = max(most, kept + peaks[sig] + made)
    outs = tuple(state[o] for o in spec.outputs)
    out_bytes = sum(b.untyped_storage().nbytes() for b in outs)
    step = Step("", allocs=[(StorageWeakRef(b.untyped_storage()), b.untyped_storage().nbytes())
                            for b in outs], transient=max(most - out_bytes, 0))
    return outs, step


def _default_workspace(example_input: Any) -> str | None:
    ts = _tensors(example_input)
    return "cpu" if ts and all(t.device.type == "cpu" for t in ts) else None


def record(gm: GraphModule, *example_inputs: Any, workspace: str | None = "auto") -> _Recorder:
    """Fake-run ``gm`` and return the recorder: its steps, kept storages and per-node info."""
    if workspace == "auto":
        workspace = _default_workspace(example_inputs)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        rec = _Recorder(gm, workspace)
        rec.run(*fakes)
    return rec


def simulate(gm: GraphModule, *example_inputs: Any, workspace: str | None = "auto") -> MemoryProfile:
    """Predict the peak memory of ``gm(*example_inputs)`` without running its kernels.

    ``workspace``: ``"cpu"`` adds oneDNN's scratch memory (the module docstring says how it
    was calibrated), ``None`` counts tensors only, ``"auto"`` picks ``"cpu"`` for CPU inputs.

    >>> import torch, torchvision
    >>> from tilefx import prepare
    >>> from tilefx.measure import peak_memory
    >>> m = torchvision.models.resnet18().eval(); x = torch.randn(1, 3, 224, 224)
    >>> gm = prepare(m, x)
    >>> p = simulate(gm, x)
    >>> abs(p.peak_bytes - peak_memory(gm, x)) < 0.1 * p.peak_bytes
    True
    """
    rec = record(gm, *example_inputs, workspace=workspace)
    peak, at, curve = liveness(rec.steps, rec.keep)
    return MemoryProfile(int(peak), at, tuple(curve), rec.workspace)
