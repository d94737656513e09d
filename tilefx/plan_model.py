"""The planner's static model: what one annotated graph costs, tiled or not, without running it.

The planner never runs the model's kernels per candidate. It times the untiled graph once
(``tilefx.cost``), fake-runs the annotated graph once (``passes.memory.record``: storages,
aliases, bytes, MACs, scratch memory), then scores each candidate region with integer window
arithmetic:

* **Boundaries.** A region starts and ends at a boundary (:class:`Boundary`): a place before
  which exactly one computed tensor is alive and read later (a single-tensor cut: ResNet's
  block boundaries, MobileNet's block outputs and the convolutions inside blocks with no
  residual, and the graph's output when it reads a spatial tensor: a segmentation network can
  be tiled whole), or a U-Net level (a downsampling or an upsampling with at most
  :data:`MAX_SKIPS` skips alive). A region from boundary ``a`` to merge node ``b`` holds the
  spatial ancestors of ``b`` after the tensors stored across ``a``, as the rewrite draws it
  (``passes.regions.find_region``: no in-place op writing into a stored tensor, so a ResNet
  region starting after a downsampling block's main path ends before its residual ``add_``);
  it writes the tensors alive across ``b`` that it computes, full-size.
* **Memory.** Windows are separable per axis (a tile's window is the product of per-axis
  intervals), so the windows of a ``t``-way split are computed once per axis and the bytes of
  every node in every tile are outer products. One tile's liveness follows the body the rewrite
  emits: every value lives until its last reader, halo crops are views unless the read leaves
  the map (then ``F.pad`` copies it), plus the CPU scratch model of ``passes.memory``. The
  region call holds its full-size output buffers and the largest tile; the rest of the graph is
  the untiled liveness, so a plan's peak is the max over the outer steps.
* **Time.** Every node's call is timed on the whole map and on tile-sized windows
  (``tilefx.cost``: the one time the planner runs kernels), or predicted from MACs alone with
  ``timing="macs"``. A region on ``T`` tiles pays every node's call on every tile's window
  (halos included) at the tile-sized rate, plus a crop and a write call per window op and
  region output per tile, in place of the untiled calls on the whole map.

The model holds the graph only while the planner runs: its caches live on the instance, so
dropping the model frees the graph and the weights it references.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.fx import GraphModule, Node

from .capture import Inputs
from .cost import Calibration, NodeCost, mac_node_costs, measure_node_costs, weight_reread_s
from .errors import TilingError
from .passes.memory import Step, conv_scratch, im2col_workspace, liveness, record, uses_onednn
from .passes.receptive_field import facts
from .passes.regions import find_region, member_rule, mutated_source, tensor_valued
from .primitives import (input_facts, native_layout_copy, onednn_blocked, onednn_channels_last_workspace,
                         onednn_input_reorder, op_params)
from .rules import SpatialRule
from .tiling import RegionNode, propagate_axis, split

__all__ = ["StaticModel", "Segment", "Boundary", "TileCost", "tile_cost", "MAX_SKIPS"]

#: Skip tensors a region ending at a downsampling may leave alive (U-Net levels).
MAX_SKIPS = 3
#: Values (not maps) of at most this many bytes are carried across a boundary as they are.
SMALL_BYTES = 1 << 20


def _downsamples(rule: Any) -> bool:
    """A window op with a stride above 1 on some axis: where an encoder moves a level down."""
    return _window(rule) and any(s > 1 for s in rule.attrs.get("stride", ()))


def _window(rule: Any) -> bool:
    """A window op: its reads leave the map through its pad, and each tile crops its input."""
    return isinstance(rule, SpatialRule) and rule.entry.window


# --------------------------------------------------------------------------- the static model


@dataclass
class Segment:
    """A candidate region: nodes from cut ``start`` up to merge ``end`` (positions in StaticModel)."""

    start: int
    end: int
    nodes: list[Node]
    outputs: list[Node]
    inputs: set[str]
    body: "Body | None" = None  # the tile body's storage structure, computed once
    own_windows: bool = False  # not a suffix of the region from the graph's input
    #: a multi-pass region: one segment per pass (its nodes, and the tensors it writes or
    #: reduces as outputs); None for a single-pass region
    phases: "list[Segment] | None" = None
    key: tuple = ()  # the windows cache's key of a segment with its own windows
    #: norms whose input the region reads from before it: their moments are computed over the
    #: stored input before the first pass
    outer_statistics: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Boundary:
    """A place between two nodes where a plan may switch between untiled layers and a region.

    ``position`` is the index (in ``StaticModel.nodes``) of the first node after it; ``alive``
    the tensors computed before it and read at or after it, stored full-size: a region starting
    here reads them, one ending here writes those it computes (its checkpoints). Position 0 is
    the graph's input (nothing stored); the last boundary is the graph's output node.
    """

    position: int
    alive: tuple[Node, ...]
    level: bool = False  #: a U-Net level: several maps stored (the current one and skips)


class StaticModel:
    """What the planner knows about an annotated graph at the example input."""

    def __init__(self, gm: GraphModule, inputs: Inputs, cal: Calibration, timing: str,
                 costs: dict[str, NodeCost] | None = None):
        """``costs``: per-node costs known already (a graph variant priced from the graph it
        was made from); otherwise ``timing`` says how to get them."""
        self.gm = gm
        self.timing = timing
        # Caches on the instance (a method-level lru_cache would keep every model, its graph
        # and its weights alive for the life of the process).
        self._regions: dict[int, list[Node]] = {}
        self._windows: dict[tuple[int, ...], Any] = {}
        self._segments: dict[tuple[int, int, bool], Segment | None] = {}
        # Per node and per call shape: asked once per candidate region and strip otherwise
        # (ResNet-101 @ 384 prices ~8,000 streamed candidates: 4.8 million scratch queries).
        self._conv: dict[str, tuple[Any, Any]] = {}
        self._scratch: dict[tuple, int] = {}
        self._formats: dict[str, str] = {}
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        rec = record(gm, *inputs.flat)
        self.workspace = rec.workspace
        self.steps = rec.steps
        self.keep = rec.keep
        self.info = rec.info
        self.step_of = {st.name: i for i, st in enumerate(self.steps)}
        self.by_name = {n.name: n for n in self.nodes}
        self.nsp = inputs.spatial.dim() - 2
        peak, _, _ = liveness(self.steps, self.keep)
        self.baseline_peak = peak
        self.total_macs = sum(i["macs"] for i in self.info.values())
        self.cal = cal
        weight_bytes = {k: v["w_bytes"] for k, v in self.info.items() if "w_bytes" in v}
        if costs is not None:
            self.costs = costs
        elif timing == "measured":
            self.costs = measure_node_costs(gm, inputs, cal, weight_bytes=weight_bytes)
        elif timing == "macs":
            self.costs = mac_node_costs(gm, {k: v["macs"] for k, v in self.info.items()}, cal,
                                        weight_bytes=weight_bytes)
        else:
            raise TilingError(f"timing={timing!r}: use 'measured' (default) or 'macs'")
        self.base_time = sum(self.untiled_time(n) for n in self.nodes)
        self.step_pos = [self.index[self.by_name[st.name]] for st in self.steps]
        self.storage_bytes = {k: b for st in self.steps for k, b in st.allocs}
        self.baseline_curve = [v for _, v in liveness(self.steps, self.keep)[2]]
        self.boundaries = self._boundaries()
        # Statistics over space before each position: a multi-pass region needs one inside it.
        self._stats_before = [0]
        for n in self.nodes:
            r = facts(n).rule if "tilefx" in n.meta else None
            self._stats_before.append(self._stats_before[-1] + int(getattr(r, "statistic", None) is not None))

    def conv_params(self, n: Node) -> tuple[Any, Any]:
        """A convolution node's ``primitives.op_params`` and ``input_facts``."""
        if n.name not in self._conv:
            self._conv[n.name] = (op_params(n, self.gm), input_facts(n, self.gm))
        return self._conv[n.name]

    def conv_scratch(self, params: Any, shape: tuple, channels_last: bool,
                     primitive: str | None = None) -> int:
        """``passes.memory.conv_scratch`` of one call (a streamed convolution on a strip)."""
        key = (params, shape, channels_last, primitive)
        if key not in self._scratch:
            self._scratch[key] = conv_scratch(params, shape, channels_last, primitive)
        return self._scratch[key]

    def format_node(self, n: Node) -> str:
        """``n.format_node()``, which names a node in a refusal."""
        if n.name not in self._formats:
            self._formats[n.name] = n.format_node()
        return self._formats[n.name]

    def cost(self, n: Node) -> NodeCost:
        return self.costs.get(n.name, NodeCost(0.0, 0.0))

    def reread_s(self, names: list[str]) -> list[float]:
        """Per node of a tile or strip loop over ``names``: what each call pays to read its
        weights from memory, the loop's weights together exceeding the CPU's cache
        (``tilefx.cost.weight_reread_s``; nothing off CPU, whose calibration this is not)."""
        w = [self.info.get(nm, {}).get("w_bytes", 0) for nm in names]
        loop = sum(w) if self.workspace == "cpu" else 0
        return [weight_reread_s(self.cal, b, loop) for b in w]

    def untiled_time(self, n: Node) -> float:
        """Seconds of ``n``'s call on the whole map (the untiled model's)."""
        return self.cost(n).untiled(self.positions(n))

    def positions(self, n: Node) -> int:
        """Spatial positions of ``n``'s output at the example shape (0 for non-spatial nodes)."""
        if "tilefx" not in n.meta or facts(n).sizes is None or member_rule(n, True) is None:
            return 0
        return math.prod(facts(n).sizes)

    def bpp(self, n: Node) -> float:
        """Bytes per spatial position of ``n``'s output."""
        tm = n.meta.get("tensor_meta")
        sizes = facts(n).sizes
        if not hasattr(tm, "shape") or sizes is None:
            return 0.0
        return tm.shape.numel() * tm.dtype.itemsize / math.prod(sizes)

    def _boundaries(self) -> list[Boundary]:
        """Where a plan may switch between untiled layers and regions (see :class:`Boundary`).

        Single-tensor cuts are kept only before a window op (convolution, pooling), an
        upsampling, the graph's output, or at a tensor read twice (a block input): a cut before
        a pointwise op stores a tensor as large as the one before it and saves nothing. Where
        several tensors are alive (a U-Net's current map and its skips), a level is a boundary
        before a downsampling (the encoder) or an upsampling (the decoder), with at most
        :data:`MAX_SKIPS` skips alive.
        """
        last: dict[Node, int] = {}
        for n in self.nodes:
            for u in n.all_input_nodes:
                last[u] = self.index[n]
        out = [Boundary(0, ())]
        alive: set[Node] = set()
        for i, n in enumerate(self.nodes):
            alive = {u for u in alive if last.get(u, -1) >= i}
            # Only tensors count: shape scalars (SymInts of a dynamic capture) stay alive to
            # the end of many graphs, and a region reads them as they are.
            ins = {u for u in n.all_input_nodes if u.op != "get_attr" and tensor_valued(u)}
            if i > 0 and ins and self._is_boundary(n, alive, ins):
                maps = sum(1 for u in alive if not self._small(u))
                out.append(Boundary(i, tuple(sorted(alive, key=self.index.get)), maps > 1))
            if n.op not in ("placeholder", "get_attr") and n.users and tensor_valued(n):
                alive.add(n)
        if out[-1].position != len(self.nodes) - 1:  # the plan's end, a region end or not
            out.append(Boundary(len(self.nodes) - 1, ()))
        return out

    def _storable(self, t: Node) -> bool:
        """A feature map a region can read whole or write full-size: a tensor (a split's list
        of pieces cannot be a region's input or output; timm's CSPResNet crashed on one) with
        spatial extent, computed by a node a region can hold."""
        return (hasattr(t.meta.get("tensor_meta"), "shape") and facts(t).sizes is not None
                and member_rule(t, True) is not None)

    def _small(self, t: Node) -> bool:
        """A value, not a map (a norm's moments, a per-channel gate): carried across boundaries
        as it is, whatever it costs to keep."""
        f = t.meta.get("tilefx")
        tm = t.meta.get("tensor_meta")
        return (f is not None and (f.sizes is None or math.prod(f.sizes) <= 1)
                and hasattr(tm, "shape") and tm.shape.numel() * tm.dtype.itemsize <= SMALL_BYTES)

    def _is_boundary(self, n: Node, alive: set[Node], ins: set[Node]) -> bool:
        maps = {u for u in alive if not self._small(u)}
        if not maps or not all(self._storable(u) for u in maps):
            return False
        rule = facts(n).rule
        grows = n.op != "output" and facts(n).spatial and facts(n).sizes and any(
            facts(u).sizes and math.prod(facts(n).sizes) > math.prod(facts(u).sizes) for u in ins)
        if len(maps) == 1:
            (t,) = maps
            # Before an upsampling the crossing tensor is the smaller one: a region can start
            # there (a U-Net decoder's full-resolution tail). The output is a cut too: a network
            # spatial to its end (segmentation, super-resolution) is tiled whole.
            return ins <= alive and (_window(rule) or grows or len(t.users) > 1 or n.op == "output")
        # A U-Net level: the tensors alive across a downsampling are the current map and the
        # skips the decoder reads later; across an upsampling, the small map and the skips
        # still to be read.
        return len(maps) <= MAX_SKIPS + 1 and bool(ins & maps) and (_downsamples(rule) or grows)

    def stored_bytes(self, b: Boundary) -> float:
        """Bytes of the tensors stored full-size across boundary ``b``."""
        return sum(self.info.get(t.name, {}).get("nbytes", 0) for t in b.alive)

    def chain_starts(self) -> list[Boundary]:
        """Boundaries worth starting a region at: the graph's input, every U-Net level, and the
        cuts storing no more than their neighbours (a block's narrow input, not the expanded
        map inside it)."""
        bs = self.boundaries[:-1]
        size = [self.stored_bytes(b) for b in bs]
        return [b for k, b in enumerate(bs) if k == 0 or b.level or (
            size[k] <= size[k - 1] and (k == len(bs) - 1 or size[k] <= size[k + 1]))]

    def _region(self, end: int) -> list[Node]:
        if end not in self._regions:
            try:
                self._regions[end] = find_region(self.gm, [self.nodes[end]]).nodes
            except TilingError:
                self._regions[end] = []
        return self._regions[end]

    def full_windows(self, end: int, axis: int, t: int):
        key = (end, axis, t)
        if key not in self._windows:
            region = self._region(end)
            self._windows[key] = _region_windows(self, region, axis, t) if region else None
        return self._windows[key]

    def segment(self, a: Boundary, b: Boundary, multipass: bool = False) -> Segment | None:
        """The candidate region from boundary ``a`` to merge node ``b``, or None.
        ``multipass``: the region through statistics over the whole map (None when it has none:
        then it is the single-pass region)."""
        key = (a.position, b.position, multipass)
        if key not in self._segments:
            self._segments[key] = (self._multipass_segment(a, b) if multipass
                                   else self._segment(a, b))
        return self._segments[key]

    def _multipass_segment(self, a: Boundary, b: Boundary) -> Segment | None:
        start, end = a.position, b.position
        if self._stats_before[end] == self._stats_before[start]:
            return None  # no statistic over space between the boundaries: a single pass
        try:
            reg = find_region(self.gm, [self.nodes[end]], list(a.alive), multipass=True)
        except TilingError:
            return None
        if not any(ph.statistics for ph in reg.phases) and not reg.outer_statistics:
            return None  # no statistic inside: the single-pass region
        inside = set(reg.nodes)
        if not {u for u in self.nodes[end].all_input_nodes} & inside:
            return None  # stops short of the merge node
        if any(not facts(o).sizes or not hasattr(o.meta.get("tensor_meta"), "shape")
               for o in reg.outputs):
            return None
        read = {s for n in reg.nodes for s, _ in member_rule(n, True).inputs}
        subs = []
        for k, ph in enumerate(reg.phases):
            targets = list(dict.fromkeys(list(ph.outputs) + [src for _, src in ph.statistics]))
            nodes = list(ph.nodes)
            subs.append(Segment(start, end, nodes, targets,
                                {s for n in nodes for s, _ in member_rule(n, True).inputs}
                                - {n.name for n in nodes},
                                own_windows=True, key=(start, end, k)))
        return Segment(start, end, list(reg.nodes), list(reg.outputs), read - {n.name for n in reg.nodes},
                       own_windows=True, phases=subs, key=(start, end, "all"),
                       outer_statistics=tuple(s for s, _ in reg.outer_statistics))

    def _segment(self, a: Boundary, b: Boundary) -> Segment | None:
        start, end = a.position, b.position
        region = [n for n in self._region(end) if self.index[n] >= start]
        seeds = {u for u in self.nodes[end].all_input_nodes if "tilefx" in u.meta and facts(u).spatial}
        inside = set(region)
        own = bool(start) and (not seeds & inside or any(
            src is not None and src not in inside
            for src in (mutated_source(n, facts(n).rule) for n in region)))
        if own:
            # The suffix of the region from the graph's input is not this region: that region
            # stops short of this merge node (a squeeze-and-excitation gate between them is
            # computed from a barrier) and one that starts after the boundary does not (the gate
            # is then computed before it and read as a value); or an in-place op in the suffix
            # writes into a tensor stored across the boundary (a residual add_ into the main
            # path's output), which a tile cannot, so the region the rewrite draws ends before it.
            try:
                region = find_region(self.gm, [self.nodes[end]], list(a.alive)).nodes
            except TilingError:
                region = []
            if not seeds & set(region):
                return None  # stops short of the merge node too: another pair's region
        if not region:
            return None
        inside = set(region)
        read = {s for n in region for s, _ in facts(n).rule.inputs}
        if own and any(n.name not in read and all(u in inside for u in n.users) for n in region):
            return None  # a node no tile window reaches (a gate's small network)
        outputs = [n for n in region if any(u not in inside for u in n.users)]
        if any(not facts(o).spatial or facts(o).sizes is None
               or not hasattr(o.meta.get("tensor_meta"), "shape") for o in outputs):
            return None
        inputs = read - {n.name for n in region}
        return Segment(start, end, region, outputs, inputs, own_windows=own)

    def untiled_peak(self, a: Boundary, b: Boundary) -> float:
        """The untiled model's peak over the steps from boundary ``a`` to ``b``."""
        vals = [v for p, v in zip(self.step_pos, self.baseline_curve) if a.position <= p < b.position]
        return max(vals, default=0.0)

    def span_peaks(self, seg: Segment, a: Boundary, b: Boundary) -> tuple[float, float, float]:
        """A region from boundary ``a`` to ``b`` in place of its nodes: (peak of the untiled
        steps between ``a`` and ``b``, bytes alive during the region's call with its outputs,
        bytes of its outputs).

        Only the tensors stored across ``a`` come in from before it, whatever ran there (they
        are full-size either way), so a plan's peak is the max of its spans' peaks.
        """
        members = {n.name for n in seg.nodes}
        keys = lambda ts: [self.info[t.name]["key"] for t in ts if "key" in self.info.get(t.name, {})]
        steps = [Step("boundary", [(k, self.storage_bytes.get(k, 0)) for k in keys(a.alive)])]
        region = Step("region")
        for p, st in zip(self.step_pos, self.steps):
            if not a.position <= p < b.position:
                continue
            if st.name in members:
                if region not in steps:
                    steps.append(region)
                region.reads.extend(st.reads)
            else:
                steps.append(st)
        out_bytes = 0.0
        for o in seg.outputs:
            info = self.info.get(o.name, {})
            region.allocs.append((info.get("key", o.name), info.get("nbytes", 0)))
            out_bytes += info.get("nbytes", 0)
        _, _, curve = liveness(steps, list(self.keep) + keys(b.alive))
        at = next((v for st, (_, v) in zip(steps, curve) if st is region), 0.0)
        rest = max((v for st, (_, v) in zip(steps, curve) if st is not region and st is not steps[0]),
                   default=0.0)
        return rest, at, out_bytes


# --------------------------------------------------------------------------- per-axis windows


def _axis_windows(model: StaticModel, seg: Segment, axis: int, t: int):
    """Per node, per tile index along ``axis``: window length, crop target length, padded.

    A region after a single-tensor cut is a suffix of the region of the same merge node from the
    graph input, with the same outputs, so windows are computed once per merge node and sliced;
    a region that is not (``own_windows``: after a squeeze-and-excitation gate, or a pass of a
    multi-pass region, whose windows propagate back from what that pass writes or reduces)
    gets its own.
    """
    if seg.own_windows:
        # Windows propagate back from the outputs only, so regions with the same outputs and
        # other starts share them: computed once over the union of their nodes.
        key = ("own", tuple(o.name for o in seg.outputs), axis, t)
        full = model._windows.get(key, ())
        if full != () and full is not None and not all(n.name in full[0] for n in seg.nodes):
            nodes = set(seg.nodes) | {model.by_name[k] for k in full[0]}
            full = ()
        else:
            nodes = seg.nodes
        if full == ():
            full = model._windows[key] = _region_windows(
                model, sorted(nodes, key=model.index.get), axis, t, seg.outputs)
    else:
        full = model.full_windows(seg.end, axis, t)
    if full is None:
        return None
    rows, L, T, P = full
    idx = [rows[n.name] for n in seg.nodes]
    return L[idx], T[idx], P[idx]


def _region_windows(model: StaticModel, region: list[Node], axis: int, t: int,
                    outputs: list[Node] | None = None):
    """Per node, per tile index along ``axis``: window length (L), length of what it reads of
    its first input (T), and whether that read leaves the map (P). ``outputs`` (default: the
    nodes read outside ``region``) are partitioned by the grid."""
    by_name = model.by_name
    inside = set(region)
    if outputs is None:
        outputs = [n for n in region if any(u not in inside for u in n.users)]
    nodes = [RegionNode(n.name, member_rule(n, True)) for n in region]
    size = {}
    for rn in nodes:
        size[rn.name] = facts(by_name[rn.name]).sizes[axis]
        for src in rn.sources:
            size[src] = facts(by_name[src]).sizes[axis]
    if any(size[o.name] < t for o in outputs):
        return None
    rows = {rn.name: i for i, rn in enumerate(nodes)}
    L = np.zeros((len(nodes), t))
    T = np.zeros((len(nodes), t))
    P = np.zeros((len(nodes), t), dtype=bool)
    for j in range(t):
        aw = propagate_axis(nodes, {o.name: split(size[o.name], t)[j] for o in outputs}, size, axis)
        for i, rn in enumerate(nodes):
            lo, hi = aw.need[rn.name]
            L[i, j] = hi - lo
            if rn.sources:
                src = rn.sources[0]
                rlo, rhi = aw.reads[(rn.name, src)]
                T[i, j] = rhi - rlo
                P[i, j] = rlo < 0 or rhi > size[src]
    return rows, L, T, P


# --------------------------------------------------------------------------- one tile's liveness


class WindowOp(NamedTuple):
    """A node of a tile body whose reads or scratch memory depend on its window."""

    position: int        # in the segment's node list
    kind: str | None     # the scratch model of ``passes.memory`` ("conv", "maxpool") or None
    source_bpp: float    # bytes per position of the tensor it reads
    channels_in: int
    weight_bytes: int
    out_bpp: float       # bytes per position of its output
    channels_out: int
    pointwise: bool      # a 1x1 convolution
    pad_copies: bool     # F.pad copies its crop where the read leaves the map
    shared_source: bool  # the halo crop copies: several ops read the source, or it is stored
    frees_source: int    # the source's storage, when this op is its last reader (else -1):
                         # a copying crop frees it before the op itself runs
    batch: int = 1       # the map's batch size (ATen's dispatch between oneDNN and im2col)
    kernel: tuple = ()   # a convolution's kernel, stride, dilation and groups
    stride: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    itemsize: int = 4    # of its input; ATen's rule is for float32 (others stay on oneDNN)
    params: Any = None   # a convolution's ``primitives.OpParams`` (the weight's layout)
    channels_last: bool = False  # its input's layout (a tile's window keeps it)


@dataclass
class Body:
    """The storage structure of one tile body, independent of the tile grid.

    ``held[i, s]`` is 1 while storage ``s`` is alive at node ``i``; ``owner[s]`` is the node
    allocating storage ``s``; per node: MACs and scratch bytes per output position, and its
    time model on a window (``tilefx.cost.NodeCost`` as arrays: fixed seconds, seconds per
    position up to ``knee_px`` positions, beyond it ``slope`` from ``at_knee``) and on the whole
    map (``untiled_s``); ``calls_s`` is the per-tile time of the crops and writes.
    """

    held: np.ndarray
    owner: list[int]
    storage_bpp: np.ndarray
    ops: list[WindowOp]
    macs_pp: np.ndarray
    fixed: np.ndarray
    time_pp: np.ndarray
    knee_px: np.ndarray
    at_knee: np.ndarray
    slope: np.ndarray
    untiled_s: np.ndarray
    calls_s: float
    scratch_pp: np.ndarray
    op_arrays: dict = None  # ``ops`` as columns (one row per window op), for tile_cost
    #: per node, every window measured (``NodeCost.knots``, weights read from memory added):
    #: positions and seconds, padded with inf; beyond the second a call runs linearly between
    #: two of them
    knot_px: np.ndarray = None
    knot_s: np.ndarray = None

    def window_time(self, px: np.ndarray) -> np.ndarray:
        """Seconds of every node's call on windows of ``px`` positions (nodes x tiles)."""
        k = self.knee_px[:, None]
        small = self.fixed[:, None] + self.time_pp[:, None] * px
        big = self.at_knee[:, None] + self.slope[:, None] * (px - np.where(np.isfinite(k), k, 0.0))
        out = np.where(px <= k, small, big)
        for j in range(1, self.knot_px.shape[1] - 1 if self.knot_px is not None else 0):
            a, b = self.knot_px[:, j, None], self.knot_px[:, j + 1, None]
            inside = (px > a) & (px <= b)
            if inside.any():
                ta, tb = self.knot_s[:, j, None], self.knot_s[:, j + 1, None]
                with np.errstate(invalid="ignore"):
                    out = np.where(inside, ta + (tb - ta) * (px - a) / (b - a), out)
        return out


class TileCost(NamedTuple):
    """One region on one grid: the largest tile's peak inside the call, and what it adds."""

    peak_bytes: float
    extra_macs: float
    extra_time_s: float


def _body(model: StaticModel, seg: Segment) -> Body:
    """The storage structure of a tile body: which storages each step holds, and op params."""
    if seg.body is not None:
        return seg.body
    names = [n.name for n in seg.nodes]
    by_name = {n.name: n for n in model.nodes}
    storage_of: dict[Any, int] = {}
    owner = []  # storage -> node position that allocates it
    alloc_at = {}
    node_storage = []
    for i, n in enumerate(seg.nodes):
        info = model.info.get(n.name, {})
        st = model.steps[model.step_of[n.name]]
        key = info.get("key")
        if st.allocs and key is not None and any(k == key for k, _ in st.allocs):
            storage_of[key] = len(owner)
            alloc_at[len(owner)] = i
            owner.append(i)
            node_storage.append(storage_of[key])
        else:
            node_storage.append(storage_of.get(key, -1))  # a view of an earlier storage or input
    S = len(owner)
    last = {s: alloc_at[s] for s in range(S)}
    pos = {nm: i for i, nm in enumerate(names)}
    for i, n in enumerate(seg.nodes):
        for u in n.all_input_nodes:
            if u.name in pos and node_storage[pos[u.name]] >= 0:
                s = node_storage[pos[u.name]]
                last[s] = max(last[s], i)
    A = np.zeros((len(names), S))
    for s in range(S):
        A[alloc_at[s]:last[s] + 1, s] = 1.0
    bpp_storage = np.array([model.bpp(seg.nodes[owner[s]]) for s in range(S)])
    ops: list[WindowOp] = []
    readers: dict[str, int] = {}
    for n in seg.nodes:
        for s_, _ in member_rule(n, True).inputs:
            readers[s_] = readers.get(s_, 0) + 1
    # A pointwise op reading a stored map from outside the region reads it through a halo crop,
    # which kernels.halo_crop copies (a narrowed window is not contiguous), alive while it runs:
    # MobileNetV3's squeeze-and-excitation scale of a stored map held 1.9 MiB more than the
    # model said at 1024. Bytes per output position, per node.
    crop_pp = np.zeros(len(names))
    for i, n in enumerate(seg.nodes):
        rule: SpatialRule = member_rule(n, True)
        info = model.info.get(n.name, {})
        if rule.kind == "pointwise" and not _window(rule):
            stored = dict.fromkeys(name for name, _ in rule.inputs if name not in pos)
            crop_pp[i] = sum(model.bpp(by_name[name]) for name in stored
                             if facts(by_name[name]).sizes is not None)
        if _window(rule) or info.get("kind"):
            src = by_name[rule.inputs[0][0]]
            tm = src.meta.get("tensor_meta")
            cin = tm.shape[1] if hasattr(tm, "shape") and len(tm.shape) > 1 else 1
            s_src = node_storage[pos[src.name]] if src.name in pos else -1
            conv = info.get("kind") == "conv"
            params, traced = model.conv_params(n) if conv else (None, None)
            ops.append(WindowOp(
                position=i, kind=info.get("kind"), source_bpp=model.bpp(src), channels_in=cin,
                weight_bytes=info.get("w_bytes", 0), out_bpp=model.bpp(n),
                channels_out=info.get("channels", 1), pointwise=info.get("pw", False),
                pad_copies=_window(rule) and rule.kind != "pad",
                # kernels.halo_crop copies a window narrowed out of a map (not contiguous): a
                # source read by several ops (each crops its own window), or one stored
                # before the region (the full map: ShuffleNetV2's stem convolution copied its
                # 0.26 MiB crop of the image, which the model had as a view).
                shared_source=readers.get(src.name, 0) > 1 or src.name not in pos,
                frees_source=s_src if s_src >= 0 and last[s_src] == i else -1,
                batch=tm.shape[0] if hasattr(tm, "shape") else 1,
                kernel=info.get("kernel", ()), stride=info.get("stride", ()),
                dilation=info.get("dilation", ()), groups=info.get("groups", 1),
                itemsize=tm.dtype.itemsize if hasattr(tm, "shape") and tm.dtype == torch.float32 else 0,
                params=params,
                channels_last=bool(traced and traced[1])))
    macs_pp = np.array([model.info.get(nm, {}).get("macs", 0) / max(math.prod(facts(by_name[nm]).sizes), 1)
                        for nm in names])
    costs = [model.cost(n) for n in seg.nodes]
    knee = np.array([c.knee_px if c.full_s is not None and c.full_px > c.knee_px else np.inf
                     for c in costs])
    # Each tile calls every layer again after all the others (StaticModel.reread_s).
    reread = np.array(model.reread_s(names))
    fixed = np.array([c.fixed_s for c in costs]) + reread
    time_pp = np.array([c.per_pixel_s for c in costs])
    at_knee = np.array([c.time(k) if np.isfinite(k) else 0.0 for c, k in zip(costs, knee)])
    slope = np.array([(c.full_s - a) / (c.full_px - k) if np.isfinite(k) else 0.0
                      for c, a, k in zip(costs, at_knee, knee)])
    at_knee = np.where(np.isfinite(knee), at_knee + reread, 0.0)
    width = max((len(c.knots) for c in costs), default=0)
    knot_px = np.full((len(costs), width), np.inf)
    knot_s = np.full((len(costs), width), np.inf)
    for i, c in enumerate(costs):
        if c.knots and np.isfinite(knee[i]):
            knot_px[i, :len(c.knots)] = [p for p, _ in c.knots]
            knot_s[i, :len(c.knots)] = [t + reread[i] for _, t in c.knots]
    untiled_s = np.array([model.untiled_time(n) for n in seg.nodes])
    # Per tile: a halo crop per window-op input and a write per region output, each a call.
    calls = sum(len(member_rule(n, True).inputs) for n in seg.nodes
                if _window(member_rule(n, True))) + len(seg.outputs)
    # Scratch memory a node holds while it runs, per output position (a folded channels-last
    # block's hidden MLP activation, a pointwise op's copied crop), beyond the workspace models
    # of ``ops``.
    scratch_pp = np.array([model.info.get(nm, {}).get("transient_pp", 0.0) for nm in names]) + crop_pp
    col = lambda f, dtype=float: np.array([f(op) for op in ops], dtype=dtype)
    op_arrays = dict(
        pos=col(lambda o: o.position, int), src_bpp=col(lambda o: o.source_bpp),
        channels=col(lambda o: o.channels_in * o.batch),
        # oneDNN's blocked copies of the input and the output, per byte of each
        out_bpp=col(lambda o: o.out_bpp), in16=col(lambda o: onednn_input_reorder(o.channels_in)),
        round16=col(lambda o: onednn_blocked(o.channels_out)),
        w=col(lambda o: o.weight_bytes), pw=col(lambda o: o.pointwise, bool),
        conv=col(lambda o: o.kind == "conv", bool), maxpool=col(lambda o: o.kind == "maxpool", bool),
        shared=col(lambda o: o.shared_source, bool), pads=col(lambda o: o.pad_copies, bool),
        frees=col(lambda o: o.frees_source, int),
        # ATen's own im2col path for small float32 windows (passes.memory.uses_onednn): the
        # elements at or below which it takes it, and its column bytes per output position
        im2col_below=col(lambda o: _im2col_threshold(o)),
        # A channels-last input or weight (tilefx.primitives): oneDNN's layout copies, a part
        # fixed by the weight and the input's reorder where only the weight is channels-last;
        # ATen's native path copies the weight to channels-last.
        layout=col(lambda o: o.params is not None and (o.channels_last or o.params.weight_channels_last), bool),
        layout_in=col(lambda o: not o.channels_last, bool),
        layout_ws=col(lambda o: onednn_channels_last_workspace(o.params, 0, o.channels_last)
                      if o.params is not None else 0.0),
        native_copy=col(lambda o: native_layout_copy(o.params, 0, o.channels_last)
                        if o.params is not None else 0.0),
        cols_pp=col(lambda o: im2col_workspace(o.channels_in, o.kernel, o.stride, (0,) * len(o.kernel),
                                               1, o.batch, o.itemsize) if o.kernel else 0.0))
    seg.body = Body(held=A, owner=owner, storage_bpp=bpp_storage, ops=ops, macs_pp=macs_pp,
                    fixed=fixed, time_pp=time_pp, knee_px=knee, at_knee=at_knee, slope=slope,
                    untiled_s=untiled_s, calls_s=calls * model.cal.pointwise_call_s,
                    scratch_pp=scratch_pp, op_arrays=op_arrays, knot_px=knot_px, knot_s=knot_s)
    return seg.body


def _im2col_threshold(op: WindowOp) -> float:
    """Input elements at or below which ATen runs ``op`` through its im2col path (-1: never,
    whatever its window): ``uses_onednn`` asked at the largest window it could decline."""
    if op.kind != "conv" or not op.kernel or not op.itemsize or len(op.kernel) != 2:
        return -1.0
    big = float("inf")
    if uses_onednn(op.batch, big, op.kernel, op.stride, op.dilation, op.groups, torch.get_num_threads()):
        # oneDNN for large inputs: below 20480 elements ATen's own path, if the rule says so
        return 20480.0 if not uses_onednn(op.batch, 20480, op.kernel, op.stride, op.dilation,
                                          op.groups, torch.get_num_threads()) else -1.0
    return float("inf")  # never oneDNN (a 1x1 convolution on one thread)


def tile_cost(model: StaticModel, seg: Segment, grid: tuple[int, ...]) -> TileCost | None:
    """``seg`` tiled on ``grid``, or None if the grid does not fit its outputs. Extra MACs and
    seconds: the tiled region's predicted MACs and time minus its untiled ones."""
    axes = [_axis_windows(model, seg, a, t) for a, t in enumerate(grid)]
    if any(a is None for a in axes):
        return None
    body = _body(model, seg)
    A, owner, bpp_s = body.held, body.owner, body.storage_bpp

    def outer(arrs):  # per-axis rows -> per-tile products, flattened over the grid
        out = arrs[0]
        for a in arrs[1:]:
            out = out[..., :, None] * a[..., None, :]
            out = out.reshape(*out.shape[:-2], -1)
        return out

    Ls = outer([ax[0] for ax in axes])                     # nodes x tiles
    live = A @ (bpp_s[:, None] * Ls[owner]) if owner else np.zeros_like(Ls)
    total = live + body.scratch_pp[:, None] * Ls
    o = body.op_arrays
    if len(o["pos"]):
        # Every window op at once (one row each): its crop, output and scratch bytes per tile.
        idx = o["pos"]
        crop = o["src_bpp"][:, None] * outer([ax[1][idx] for ax in axes])
        out_b = o["out_bpp"][:, None] * Ls[idx]
        ws = np.zeros_like(out_b)
        if model.workspace == "cpu":
            out16 = out_b * o["round16"][:, None]
            held = np.maximum(o["in16"][:, None] * crop + o["w"][:, None]
                              + out16 + np.where(o["pw"][:, None], out_b, 0.0), out16 + out_b)
            nhwc = np.where(o["layout_in"][:, None], crop, 0.0) + o["layout_ws"][:, None]
            ws = np.where(o["conv"][:, None],
                          np.where(o["layout"][:, None], nhwc, np.maximum(held - out_b, 0.0)), ws)
            # A window of at most im2col_below elements runs ATen's im2col path instead.
            numel = crop / np.maximum(o["src_bpp"][:, None], 1e-30) * o["channels"][:, None]
            small = numel <= o["im2col_below"][:, None]
            ws = np.where(small, o["cols_pp"][:, None] * Ls[idx] + o["native_copy"][:, None], ws)
            ws = np.where(o["maxpool"][:, None], 2 * out_b, ws)
        here = total[idx]
        # A window narrowed out of a producer read by several ops: halo_crop copies it.
        shared = here + crop + ws
        # F.pad copies the crop where the read leaves the map on any axis. Two steps then: the
        # copy beside its source (the op's output not yet allocated), and the op on the copy,
        # its source freed when this op was its last reader.
        padded = 1.0 - outer([1.0 - ax[2][idx].astype(float) for ax in axes])
        frees = o["frees"]
        has = frees >= 0
        src = np.zeros_like(out_b)
        if has.any():
            src[has] = bpp_s[frees[has], None] * Ls[np.asarray(owner)[frees[has]]]
        on_copy = here + padded * (crop - src) + ws
        copying = np.where(padded > 0, here - out_b + padded * crop, 0.0)
        pads = np.maximum(on_copy, copying)
        total[idx] = np.where(o["shared"][:, None], shared,
                              np.where(o["pads"][:, None], pads, here + ws))
    peak = float(total.max()) if total.size else 0.0
    sums = [ax[0].sum(axis=1) for ax in axes]
    tiled_px = functools.reduce(np.multiply, sums)  # per node: positions summed over all tiles
    full_px = np.array([math.prod(facts(n).sizes) for n in seg.nodes])
    extra_macs = float((body.macs_pp * (tiled_px - full_px)).sum())
    n_tiles = math.prod(grid)
    extra_time = (float(body.window_time(Ls).sum()) + n_tiles * body.calls_s
                  - float(body.untiled_s.sum()))
    return TileCost(peak, extra_macs, extra_time)
