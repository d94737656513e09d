"""The planner's static model: what one annotated graph costs, tiled or not, without running it.

The planner never runs the model's kernels per candidate. It times the untiled graph once
(``tilefx.cost``), fake-runs the annotated graph once (``passes.memory.record``: storages,
aliases, bytes, MACs, scratch memory), then scores each candidate region with integer window
arithmetic:

* **Cuts.** A merge candidate is a node before which exactly one computed tensor is alive and
  read later (a single-tensor cut: ResNet's block boundaries, MobileNet's block outputs and the
  convolutions inside blocks with no residual, and the graph's output when it reads a spatial
  tensor: a segmentation network can be tiled whole), or a U-Net level (a downsampling with at
  most :data:`MAX_SKIPS` skips alive). A region spans the spatial ancestors of the merge node
  after the previous region's cut.
* **Memory.** Windows are separable per axis (a tile's window is the product of per-axis
  intervals), so the windows of a ``t``-way split are computed once per axis and the bytes of
  every node in every tile are outer products. One tile's liveness follows the body the rewrite
  emits: every value lives until its last reader, halo crops are views unless the read leaves
  the map (then ``F.pad`` copies it), plus the CPU scratch model of ``passes.memory``. The
  region call holds its full-size output buffers and the largest tile; the rest of the graph is
  the untiled liveness, so a plan's peak is the max over the outer steps.
* **Time.** Every node costs ``fixed + per_pixel x positions`` per call (``tilefx.cost``): by
  default measured once on the untiled graph (the one time the planner runs kernels), or from
  MACs alone with ``timing="macs"``. A region on ``T`` tiles pays each node's fixed part ``T``
  times and its per-pixel part on every window (halos included), plus a crop and a write call
  per window op and region output per tile.

The model holds the graph only while the planner runs: its caches live on the instance, so
dropping the model frees the graph and the weights it references.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from torch.fx import GraphModule, Node

from .capture import Inputs
from .cost import Calibration, NodeCost, mac_node_costs, measure_node_costs
from .errors import TilingError
from .passes.memory import Step, liveness, record
from .passes.receptive_field import facts
from .passes.regions import (Region, ancestors_within, find_region, member_rule, phases_of,
                             tensor_valued)
from .rules import SpatialRule
from .tiling import RegionNode, propagate_axis, split

__all__ = ["StaticModel", "Segment", "TileCost", "tile_cost", "outer_peaks", "MAX_SKIPS"]

#: Skip tensors a region ending at a downsampling may leave alive (U-Net levels).
MAX_SKIPS = 3


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


class StaticModel:
    """What the planner knows about an annotated graph at the example input."""

    def __init__(self, gm: GraphModule, inputs: Inputs, cal: Calibration, timing: str):
        self.gm = gm
        # Caches on the instance (a method-level lru_cache would keep every model, its graph
        # and its weights alive for the life of the process).
        self._regions: dict[int, list[Node]] = {}
        self._windows: dict[tuple[int, ...], Any] = {}
        self._segments: dict[tuple[int, int, bool], Segment | None] = {}
        self._mregions: dict[int, Region | None] = {}
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
        if timing == "measured":
            self.costs = measure_node_costs(gm, inputs, cal, weight_bytes=weight_bytes)
        elif timing == "macs":
            self.costs = mac_node_costs(gm, {k: v["macs"] for k, v in self.info.items()}, cal,
                                        weight_bytes=weight_bytes)
        else:
            raise TilingError(f"timing={timing!r}: use 'measured' (default) or 'macs'")
        self.base_time = sum(self.cost(n).time(self.positions(n)) for n in self.nodes)
        self.cuts = self._cuts()

    def cost(self, n: Node) -> NodeCost:
        return self.costs.get(n.name, NodeCost(0.0, 0.0))

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

    def _cuts(self) -> list[int]:
        """Positions of single-tensor cuts whose node reads the crossing tensor.

        Only cuts before a window op (convolution, pooling), an upsampling, or at a tensor read
        twice (a block input) are kept: a cut before a pointwise op buffers a tensor as large
        as the one before it and saves nothing.
        """
        last: dict[Node, int] = {}
        for n in self.nodes:
            for u in n.all_input_nodes:
                last[u] = self.index[n]
        cuts = []
        self.cut_bytes = {}
        self.cut_tensor: dict[int, Node] = {}  # the one tensor alive across each cut
        self.skip_ends = []
        alive: set[Node] = set()
        for i, n in enumerate(self.nodes):
            alive = {u for u in alive if last.get(u, -1) >= i}
            # Only tensors count: shape scalars (SymInts of a dynamic capture) stay alive to
            # the end of many graphs, and a region reads them as they are.
            ins = [u for u in n.all_input_nodes if u.op != "get_attr" and tensor_valued(u)]
            if (1 < len(alive) <= MAX_SKIPS + 1 and _downsamples(facts(n).rule)
                    and all(facts(u).spatial for u in alive)):
                # A U-Net's encoder: the tensors alive across a downsampling are the current map
                # and the skips the decoder reads later. A region can end here with every one
                # of them as an output (assembled full-size), only as a plan's last region.
                self.skip_ends.append(i)
            if len(alive) == 1 and i > 0 and ins and set(ins) <= alive:
                (t,) = alive
                rule = facts(n).rule
                window = _window(rule)
                # The output is a cut too: a network spatial to its end (segmentation, super-
                # resolution) is tiled whole, its output assembled in the region's buffer.
                # The crossing value must be a tensor: a split's list of pieces cannot be a
                # region's output or input (timm's CSPResNet crashed on one).
                tensor = hasattr(t.meta.get("tensor_meta"), "shape")
                # Before an upsampling the crossing tensor is the smaller one: a region can
                # start there (a U-Net decoder's full-resolution tail).
                grows = (tensor and n.op != "output" and facts(n).spatial and facts(n).sizes
                         and facts(t).sizes and math.prod(facts(n).sizes) > math.prod(facts(t).sizes))
                if tensor and facts(t).spatial and (window or grows or len(t.users) > 1
                                                    or n.op == "output"):
                    cuts.append(i)
                    self.cut_bytes[i] = self.bpp(t) * math.prod(facts(t).sizes)
                    self.cut_tensor[i] = t
            if n.op not in ("placeholder", "get_attr") and n.users and tensor_valued(n):
                alive.add(n)
        return cuts

    def chain_cuts(self) -> list[int]:
        """Cuts whose tensor is no larger than its neighbours': where a later region may start."""
        c, b = self.cuts, self.cut_bytes
        return [x for k, x in enumerate(c)
                if (k == 0 or b[x] <= b[c[k - 1]]) and (k == len(c) - 1 or b[x] <= b[c[k + 1]])]

    def _region(self, end: int) -> list[Node]:
        if end not in self._regions:
            try:
                self._regions[end] = find_region(self.gm, [self.nodes[end]])[0]
            except TilingError:
                self._regions[end] = []
        return self._regions[end]

    def full_windows(self, end: int, axis: int, t: int):
        key = (end, axis, t)
        if key not in self._windows:
            region = self._region(end)
            self._windows[key] = _region_windows(self, region, axis, t) if region else None
        return self._windows[key]

    def segment(self, start: int, end: int, multipass: bool = False) -> Segment | None:
        """The candidate region from cut ``start`` to merge node ``end``, or None.
        ``multipass``: the region through statistics over the whole map (None when it has none:
        then it is the single-pass region)."""
        key = (start, end, multipass)
        if key not in self._segments:
            self._segments[key] = (self._multipass_segment(start, end) if multipass
                                   else self._segment(start, end))
        return self._segments[key]

    def _multipass_segment(self, start: int, end: int) -> Segment | None:
        # A multi-pass region after a single-tensor cut is the part after the cut of the one
        # from the graph's input (everything after the cut reads only the cut tensor), with
        # its passes regrouped.
        if end not in self._mregions:
            try:
                self._mregions[end] = find_region(self.gm, [self.nodes[end]], multipass=True)
            except TilingError:
                self._mregions[end] = None
        full = self._mregions[end]
        if full is None or not any(ph.statistics for ph in full.phases):
            return None
        region = [n for n in full.nodes if self.index[n] >= start]
        inside = set(region)
        seeds = {u for u in self.nodes[end].all_input_nodes if u in set(full.nodes)}
        if not region or not seeds <= inside:
            return None
        if any(not facts(n).spatial and n.args[0] not in inside for n in region):
            return None  # a norm whose input is the cut tensor: its moments are not this region's
        stats = {s for ph in full.phases for s, src in ph.statistics if src in inside}
        outputs = [o for o in full.outputs if o in inside]
        if any(not facts(o).sizes or not hasattr(o.meta.get("tensor_meta"), "shape")
               for o in outputs):
            return None
        phases = phases_of(region, outputs, stats - inside)
        if not any(ph.statistics for ph in phases):
            return None
        read = {s for n in region for s, _ in member_rule(n, True).inputs}
        subs = []
        for k, ph in enumerate(phases):
            targets = list(dict.fromkeys(list(ph.outputs) + [src for _, src in ph.statistics]))
            nodes = list(ph.nodes)
            subs.append(Segment(start, end, nodes, targets,
                                {s for n in nodes for s, _ in member_rule(n, True).inputs}
                                - {n.name for n in nodes},
                                own_windows=True, key=(start, end, k)))
        return Segment(start, end, region, outputs, read - {n.name for n in region},
                       own_windows=True, phases=subs, key=(start, end, "all"))

    def _segment(self, start: int, end: int) -> Segment | None:
        region = [n for n in self._region(end) if self.index[n] >= start]
        seeds = {u for u in self.nodes[end].all_input_nodes if "tilefx" in u.meta and facts(u).spatial}
        own = bool(start) and not seeds & set(region)
        if own:
            # The region from the graph's input stops short of this merge node (a squeeze-and-
            # excitation gate between them is computed from a barrier); one that starts after
            # the cut does not: the gate is then computed before it and read as a value.
            try:
                region = find_region(self.gm, [self.nodes[end]], [self.cut_tensor[start]])[0]
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


# --------------------------------------------------------------------------- per-axis windows


def _axis_windows(model: StaticModel, seg: Segment, axis: int, t: int):
    """Per node, per tile index along ``axis``: window length, crop target length, padded.

    A region after a single-tensor cut is a suffix of the region of the same merge node from the
    graph input, with the same outputs, so windows are computed once per merge node and sliced;
    a region that is not (``own_windows``) gets its own.
    """
    if seg.key and seg.key[2] != "all":
        # A pass of a multi-pass region: windows propagate back from the tensors it writes or
        # reduces, so they are the same for every start; computed once from the graph input.
        names = tuple(o.name for o in seg.outputs)
        key = (seg.end, names, axis, t)
        if key not in model._windows:
            whole = model._mregions[seg.end].nodes
            nodes = ancestors_within(set(seg.outputs), set(whole))
            model._windows[key] = _region_windows(
                model, [n for n in whole if n in nodes], axis, t, list(seg.outputs))
        full = model._windows[key]
    elif seg.own_windows:
        key = (seg.key or (seg.start, seg.end), axis, t)
        if key not in model._windows:
            model._windows[key] = _region_windows(model, seg.nodes, axis, t, seg.outputs)
        full = model._windows[key]
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
    shared_source: bool  # its source has several readers: the halo crop is a copy


@dataclass
class Body:
    """The storage structure of one tile body, independent of the tile grid.

    ``held[i, s]`` is 1 while storage ``s`` is alive at node ``i``; ``owner[s]`` is the node
    allocating storage ``s``; per node: MACs, per-pixel seconds and scratch bytes per output
    position; ``fixed_s`` is the per-tile fixed time (every node's call plus crops and writes).
    """

    held: np.ndarray
    owner: list[int]
    storage_bpp: np.ndarray
    ops: list[WindowOp]
    macs_pp: np.ndarray
    time_pp: np.ndarray
    fixed_s: float
    scratch_pp: np.ndarray


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
    for i, n in enumerate(seg.nodes):
        rule: SpatialRule = member_rule(n, True)
        info = model.info.get(n.name, {})
        if _window(rule) or info.get("kind"):
            src = by_name[rule.inputs[0][0]]
            tm = src.meta.get("tensor_meta")
            cin = tm.shape[1] if hasattr(tm, "shape") and len(tm.shape) > 1 else 1
            ops.append(WindowOp(
                position=i, kind=info.get("kind"), source_bpp=model.bpp(src), channels_in=cin,
                weight_bytes=info.get("w_bytes", 0), out_bpp=model.bpp(n),
                channels_out=info.get("channels", 1), pointwise=info.get("pw", False),
                pad_copies=_window(rule) and rule.kind != "pad",
                shared_source=readers.get(src.name, 0) > 1))
    macs_pp = np.array([model.info.get(nm, {}).get("macs", 0) / max(math.prod(facts(by_name[nm]).sizes), 1)
                        for nm in names])
    costs = [model.cost(n) for n in seg.nodes]
    time_pp = np.array([c.per_pixel_s for c in costs])
    fixed = float(sum(c.fixed_s for c in costs))
    # Per tile: a halo crop per window-op input and a write per region output, each a call.
    calls = sum(len(member_rule(n, True).inputs) for n in seg.nodes
                if _window(member_rule(n, True))) + len(seg.outputs)
    fixed += calls * model.cal.pointwise_call_s
    # Scratch memory a node holds while it runs, per output position (a folded channels-last
    # block's hidden MLP activation), beyond the workspace models of ``ops``.
    scratch_pp = np.array([model.info.get(nm, {}).get("transient_pp", 0.0) for nm in names])
    seg.body = Body(held=A, owner=owner, storage_bpp=bpp_storage, ops=ops, macs_pp=macs_pp,
                    time_pp=time_pp, fixed_s=fixed, scratch_pp=scratch_pp)
    return seg.body


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
    trans = body.scratch_pp[:, None] * Ls
    for op in body.ops:
        i, cout = op.position, op.channels_out
        crop = op.source_bpp * outer([ax[1][i] for ax in axes])
        out_b = op.out_bpp * Ls[i]
        if op.shared_source:  # a window narrowed out of a producer read by several ops: halo_crop copies it
            trans[i] += crop
        elif op.pad_copies:  # F.pad copies the crop when the read leaves the map on any axis
            padded = 1.0 - outer([1.0 - ax[2][i].astype(float) for ax in axes])
            trans[i] += padded * crop
        if model.workspace == "cpu":
            if op.kind == "conv":
                in_r = crop if op.channels_in > 4 else 0.0
                out16 = out_b * (-(-cout // 16) * 16) / max(cout, 1)
                held = np.maximum(in_r + op.weight_bytes + out16 + (out_b if op.pointwise else 0.0),
                                  out16 + out_b)
                trans[i] += np.maximum(held - out_b, 0.0)
            elif op.kind == "maxpool":
                trans[i] += 2 * out_b
    peak = float((live + trans).max()) if live.size else 0.0
    sums = [ax[0].sum(axis=1) for ax in axes]
    tiled_px = functools.reduce(np.multiply, sums)  # per node: positions summed over all tiles
    full_px = np.array([math.prod(facts(n).sizes) for n in seg.nodes])
    extra_macs = float((body.macs_pp * (tiled_px - full_px)).sum())
    n_tiles = math.prod(grid)
    extra_time = float((body.time_pp * (tiled_px - full_px)).sum()) + (n_tiles - 1) * body.fixed_s
    return TileCost(peak, extra_macs, extra_time)


# --------------------------------------------------------------------------- outside the regions


def outer_peaks(model: StaticModel, segs: list[Segment]) -> tuple[float, list[float]]:
    """(peak of the untiled steps, bytes alive at each region call) for a cut sequence."""
    region_of = {}
    for k, seg in enumerate(segs):
        for n in seg.nodes:
            region_of[n.name] = k
    steps: list[Step] = []
    region_pos = {}
    for st in model.steps:
        k = region_of.get(st.name)
        if k is None:
            steps.append(st)
            continue
        if k not in region_pos:
            region_pos[k] = len(steps)
            steps.append(Step(f"region{k}"))
        rs = steps[region_pos[k]]
        rs.reads.extend(st.reads)
    for k, seg in enumerate(segs):
        rs = steps[region_pos[k]]
        for o in seg.outputs:
            info = model.info.get(o.name, {})
            rs.allocs.append((info.get("key", o.name), info.get("nbytes", 0)))
    _, _, curve = liveness(steps, model.keep)
    at = {k: curve[p][1] for k, p in region_pos.items()}
    rest = max((b for i, (_, b) in enumerate(curve) if i not in region_pos.values()), default=0)
    return rest, [at[k] for k in range(len(segs))]
