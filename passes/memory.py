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

Operators also allocate scratch memory that no fx node names. On CPU, oneDNN (PyTorch's
default convolution backend for float tensors) reorders a convolution's input, weight and
output into blocked layouts for the duration of the call; the ``"cpu"`` workspace model adds
those bytes (:func:`cpu_workspace`). It was calibrated against the profiler's allocator events
(torch 2.14, NCHW float32): a convolution holds ``max(in + w + out16, out16 + out)`` bytes at
once, where ``in`` is its input (not reordered when it has at most 4 channels), ``w`` its weight
and ``out16`` its output with channels rounded up to 16; a strided 1x1 convolution holds one more
output; max pooling holds two outputs besides its own. The weight reorder matters: ResNet's last
3x3 convolutions reorder 9 MiB of weights, a floor no tiling of the early layers can lower.
A convolution of one small window (at most 20480 input elements, one sample, no groups) runs
ATen's native kernel instead (PyTorch's own heuristic), which holds an im2col buffer of its
input's patches instead of oneDNN's reorders.
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
from ..region import TiledRegion
from ..rules import cost_class, schema_args
from ..stream_kernels import NEW_SUFFIX, stream_write
from ..stream_region import StreamRegion
from .channels_last import ChannelsLastBlock

__all__ = ["MemoryProfile", "Step", "simulate", "record", "liveness", "cpu_workspace", "conv_workspace",
           "conv_scratch", "native_conv", "tile_workspace_kind"]


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


def _round_channels(nbytes: int, channels: int, block: int = 16) -> int:
    if channels <= 0:
        return nbytes
    return nbytes * (-(-channels // block) * block) // channels


def conv_workspace(in_bytes: int, cin: int, w_bytes: int, out_bytes: int, cout: int,
                   pointwise_strided: bool) -> int:
    """oneDNN scratch bytes of one NCHW convolution, beyond its output (see the module doc)."""
    in_r = in_bytes if cin > 4 else 0
    out_b = _round_channels(out_bytes, cout)
    held = max(in_r + w_bytes + out_b + (out_bytes if pointwise_strided else 0), out_b + out_bytes)
    return max(held - out_bytes, 0)


def tile_workspace_kind(node: torch.fx.Node, module: nn.Module | None) -> str | None:
    """``"conv"``, ``"maxpool"`` or None: which workspace rule a node falls under (its rule
    table entry's cost class)."""
    return cost_class(node, module)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def cpu_workspace(kind: str | None, x: Any, weight: Any, out: Any, kernel: tuple, stride: tuple) -> int:
    """Scratch bytes of one op on CPU (oneDNN, float): see the module docstring."""
    if kind is None or not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
        return 0
    if kind == "maxpool":
        return 2 * _nbytes(out)
    if kind == "conv" and isinstance(weight, torch.Tensor) and x.dim() >= 3:
        return conv_scratch(tuple(x.shape), tuple(weight.shape), tuple(out.shape), stride,
                            x.element_size(), x.dtype == torch.float32 and x.device.type == "cpu")
    return 0


def conv_scratch(x_shape: tuple, w_shape: tuple, out_shape: tuple, stride: tuple, itemsize: int,
                 float32_cpu: bool = True) -> int:
    """Scratch bytes of one CPU convolution from its shapes: oneDNN's reorders
    (:func:`conv_workspace`), or the im2col buffer of ATen's native kernel where PyTorch picks
    it (:func:`native_conv`).

    >>> conv_scratch((1, 512, 3, 10), (512, 512, 3, 3), (1, 512, 1, 8), (1, 1), 4)  # native
    147456
    """
    kernel = tuple(w_shape[2:])
    if float32_cpu and native_conv(x_shape, w_shape, stride):
        if all(k == 1 for k in kernel) and all(s == 1 for s in stride):
            return 0
        return w_shape[1] * math.prod(kernel) * math.prod(out_shape[2:]) * itemsize
    pw = all(k == 1 for k in kernel) and any(s > 1 for s in stride)
    return conv_workspace(math.prod(x_shape) * itemsize, x_shape[1], math.prod(w_shape) * itemsize,
                          math.prod(out_shape) * itemsize, out_shape[1], pw)


def native_conv(x_shape: tuple, w_shape: tuple, stride: tuple) -> bool:
    """Whether PyTorch runs a float32 CPU 2-d convolution with its native kernel instead of
    oneDNN (``ConvParams::use_mkldnn``): one sample, no groups, not both kernel sides above 3,
    and at most 20480 input elements (a strip or tile of a small map), or a 1x1 convolution on
    one thread."""
    if len(x_shape) != 4:
        return False
    groups = x_shape[1] // max(w_shape[1], 1)
    k = w_shape[2:]
    strided = any(s > 1 for s in stride)
    first = strided or x_shape[0] >= 16 or any(v != 1 for v in k) or torch.get_num_threads() > 1
    second = groups > 1 or all(v > 3 for v in k) or x_shape[0] > 1 or math.prod(x_shape) > 20480
    return not (first and second)


def _op_params(node: torch.fx.Node, args: tuple, kwargs: dict):
    """(input, weight, kernel, stride) of an ATen convolution or pooling node, given its
    evaluated arguments (read by schema name)."""
    a = schema_args(node, args, kwargs)
    x = a.get("input", a.get("self"))
    if cost_class(node) == "conv":
        w, s = a["weight"], a["stride"]
        k = tuple(w.shape[2:]) if isinstance(w, torch.Tensor) else ()
    else:
        w, k, s = None, a["kernel_size"], a["stride"]
    k = tuple(k) if isinstance(k, (tuple, list)) else (k,)
    s = tuple(s) if isinstance(s, (tuple, list)) else (s,)
    return x, w, k, s


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
            x, w, k_, s = _op_params(n, args, kwargs)
            if kind == "conv" and isinstance(w, torch.Tensor):
                info.update(w_bytes=_nbytes(w), pw=all(k == 1 for k in k_) and any(v > 1 for v in s))
            if self.workspace == "cpu":
                step.transient = cpu_workspace(kind, x, w, result, k_, s)
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
    """A TiledRegion call as one step: its output buffers, and one tile's peak as scratch."""
    sched = region.schedule_for(region.input_sizes(args))
    buffers: dict[str, torch.Tensor] = {}
    body_peak = 0
    seen: set = set()
    outside = set(external) | {StorageWeakRef(t.untyped_storage()) for t in _tensors(args)}
    for tile in sched.tiles:
        sig = _tile_signature(tile)
        if sig in seen and buffers:
            continue
        seen.add(sig)
        ext = outside | {StorageWeakRef(b.untyped_storage()) for b in buffers.values()}
        rec = _Recorder(region.body, workspace, external=ext)
        rec.run(*args, buffers, tile)
        peak, _, _ = liveness(rec.steps)
        body_peak = max(body_peak, peak)
    outs = tuple(buffers[o] for o in region.spec.outputs)
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
