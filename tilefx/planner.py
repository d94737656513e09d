"""The planner: candidate plans, their predicted peak and time, the Pareto frontier, the choice.

A plan is a sequence of regions, each a merge node and a tile grid, applied in order with
``tile_rewrite`` (an empty sequence is the untiled model). The planner never runs the model's
kernels per candidate. It times the untiled graph once (``tilefx.cost``), fake-runs the annotated graph once (``passes.memory.record``: storages,
aliases, bytes, MACs, scratch memory), then scores each candidate with integer window
arithmetic:

* **Cuts.** A merge candidate is a node before which exactly one computed tensor is alive and
  read later (a single-tensor cut: ResNet's block boundaries, MobileNet's block outputs and the
  convolutions inside blocks with no residual, and the graph's output when it reads a spatial
  tensor: a segmentation network can be tiled whole). A region spans the spatial ancestors of
  the merge node after the previous region's cut.
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
* **Frontier.** For a fixed sequence of cuts the choices couple only through
  ``peak = max(...)`` and ``time = sum(...)``, so the per-region grid frontiers are combined
  exactly; plans are pooled over all cut sequences (up to :data:`MAX_REGIONS` regions) and the
  Pareto-optimal ones kept. The untiled plan is always a candidate, so no choice is worse than
  it.
* **Choice.** ``memory_budget``: the fastest plan whose peak fits with a
  :data:`BUDGET_MARGIN` to spare (TilingError with the lowest reachable peak otherwise). ``max_overhead``: the lowest peak whose predicted time is within
  ``1 + max_overhead`` of the untiled time. Neither: the knee, the frontier point that maximizes
  ``log(baseline_peak / peak) - KNEE_SLOPE * log(time / baseline_time)``, i.e. where a 1%
  longer run stops buying at least ``KNEE_SLOPE``% less memory.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from .cost import Calibration, NodeCost, calibrate, mac_node_costs, measure_node_costs
from .errors import TilingError
from .capture import Inputs, as_inputs
from .passes.memory import Step, liveness, record
from .passes.receptive_field import facts
from .passes.regions import find_region
from .rules import SpatialRule
from .tiling import RegionNode, propagate_axis, split

__all__ = ["RegionChoice", "Plan", "plan", "fixed_plan", "calibrate", "Calibration", "MAX_TILES", "MAX_REGIONS",
           "KNEE_SLOPE", "BUDGET_MARGIN"]

#: Tile counts tried per axis.
MAX_TILES = 8
#: Regions a plan may chain (the tail after a merge tiled again).
MAX_REGIONS = 2
#: The knee's exchange rate between log peak and log time (see the module docstring).
KNEE_SLOPE = 2.0
#: A memory_budget is met by plans predicted at least this fraction below it: the static
#: model's error against measured peaks stays under 5% on the benchmark models.
BUDGET_MARGIN = 0.05



#: Skip tensors a region ending at a downsampling may leave alive (U-Net levels).
MAX_SKIPS = 3


def _downsamples(rule: Any) -> bool:
    """A window op with a stride above 1 on some axis: where an encoder moves a level down."""
    return _window(rule) and any(s > 1 for s in rule.attrs.get("stride", ()))


def _window(rule: Any) -> bool:
    """A window op: its reads leave the map through its pad, and each tile crops its input."""
    return isinstance(rule, SpatialRule) and rule.entry.window


@dataclass(frozen=True)
class RegionChoice:
    """One region: the merge node(s) it ends before and its tile grid."""

    merge: tuple[str, ...]
    tiles: tuple[int, ...]

    def __str__(self) -> str:
        return f"{','.join(self.merge)} @ {'x'.join(map(str, self.tiles))}"


@dataclass(frozen=True)
class Plan:
    """A tiling plan with its predicted peak memory and time.

    ``extra_compute`` is the fraction of the model's MACs the halos add; ``time_s`` and
    ``baseline_time_s`` come from the calibrated cost model (``overhead = time/baseline - 1``).
    """

    regions: tuple[RegionChoice, ...]
    peak_bytes: int | None
    baseline_peak_bytes: int | None
    extra_compute: float | None
    time_s: float | None
    baseline_time_s: float | None
    frontier: tuple["Plan", ...] = field(default=(), compare=False, repr=False)

    @property
    def predicted(self) -> bool:
        """Whether the planner chose (and so predicted) this plan."""
        return self.peak_bytes is not None

    @property
    def overhead(self) -> float | None:
        if self.time_s is None:
            return None
        return self.time_s / self.baseline_time_s - 1.0

    @property
    def ratio(self) -> float | None:
        """Predicted peak reduction: untiled peak / this plan's peak."""
        if self.peak_bytes is None:
            return None
        return self.baseline_peak_bytes / max(self.peak_bytes, 1)

    def pareto(self) -> list["Plan"]:
        """Every Pareto-optimal plan (peak vs predicted time), lowest peak last."""
        return list(self.frontier) if self.frontier else [self]

    def __str__(self) -> str:
        what = " then ".join(map(str, self.regions)) if self.regions else "untiled"
        if not self.predicted:
            return f"{what} (fixed by the user; no predictions)"
        return (f"{what}: peak {self.peak_bytes / 2**20:.2f} MiB ({self.ratio:.1f}x lower than "
                f"{self.baseline_peak_bytes / 2**20:.2f} MiB), extra MACs {self.extra_compute:+.1%}, "
                f"predicted time {self.overhead:+.1%}")


# --------------------------------------------------------------------------- the static model


@dataclass
class _Segment:
    """A candidate region: nodes from cut ``start`` up to merge ``end`` (positions in _Model)."""

    start: int
    end: int
    nodes: list[Node]
    outputs: list[Node]
    inputs: set[str]
    body: Any = None  # precomputed storage structure of the tile body


class _Model:
    """What the planner knows about an annotated graph at the example input."""

    def __init__(self, gm: GraphModule, inputs: Inputs, cal: Calibration, timing: str):
        self.gm = gm
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
        if "tilefx" not in n.meta or not facts(n).spatial or facts(n).sizes is None:
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

        Only cuts before a window op (convolution, pooling) or at a tensor read twice (a block
        input) are kept: a cut before a pointwise op buffers a tensor as large as the one
        before it and saves nothing.
        """
        last: dict[Node, int] = {}
        for n in self.nodes:
            for u in n.all_input_nodes:
                last[u] = self.index[n]
        cuts = []
        self.cut_bytes = {}
        self.skip_ends = []
        alive: set[Node] = set()
        for i, n in enumerate(self.nodes):
            alive = {u for u in alive if last.get(u, -1) >= i}
            ins = [u for u in n.all_input_nodes if u.op != "get_attr"]
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
                if tensor and facts(t).spatial and (window or len(t.users) > 1 or n.op == "output"):
                    cuts.append(i)
                    self.cut_bytes[i] = self.bpp(t) * math.prod(facts(t).sizes)
            if n.op not in ("placeholder", "get_attr") and n.users:
                alive.add(n)
        return cuts

    def chain_cuts(self) -> list[int]:
        """Cuts whose tensor is no larger than its neighbours': where a later region may start."""
        c, b = self.cuts, self.cut_bytes
        return [x for k, x in enumerate(c)
                if (k == 0 or b[x] <= b[c[k - 1]]) and (k == len(c) - 1 or b[x] <= b[c[k + 1]])]

    @functools.lru_cache(maxsize=None)
    def _region(self, end: int) -> list[Node]:
        try:
            return find_region(self.gm, [self.nodes[end]])[0]
        except TilingError:
            return []

    @functools.lru_cache(maxsize=None)
    def full_windows(self, end: int, axis: int, t: int):
        region = self._region(end)
        return _region_windows(self, region, axis, t) if region else None

    @functools.lru_cache(maxsize=None)
    def segment(self, start: int, end: int) -> _Segment | None:
        region = [n for n in self._region(end) if self.index[n] >= start]
        if not region:
            return None
        inside = set(region)
        outputs = [n for n in region if any(u not in inside for u in n.users)]
        if any(not facts(o).spatial or facts(o).sizes is None
               or not hasattr(o.meta.get("tensor_meta"), "shape") for o in outputs):
            return None
        inputs = {s for n in region for s, _ in facts(n).rule.inputs} - {n.name for n in region}
        return _Segment(start, end, region, outputs, inputs)


# --------------------------------------------------------------------------- per-axis windows


def _axis_windows(model: _Model, seg: _Segment, axis: int, t: int):
    """Per node, per tile index along ``axis``: window length, crop target length, padded.

    A region after a single-tensor cut is a suffix of the region of the same merge node from the
    graph input, with the same outputs, so windows are computed once per merge node and sliced.
    """
    full = model.full_windows(seg.end, axis, t)
    if full is None:
        return None
    rows, L, T, P = full
    idx = [rows[n.name] for n in seg.nodes]
    return L[idx], T[idx], P[idx]


def _region_windows(model: _Model, region: list[Node], axis: int, t: int):
    """Per node, per tile index along ``axis``: window length (L), length of what it reads of
    its first input (T), and whether that read leaves the map (P)."""
    by_name = model.by_name
    inside = set(region)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    nodes = [RegionNode(n.name, facts(n).rule) for n in region]
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


def _body(model: _Model, seg: _Segment):
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
    ops = []  # (position, kind, source bpp, channels in, w bytes, out bpp, channels out, pw, copies)
    readers: dict[str, int] = {}
    for n in seg.nodes:
        for s_, _ in facts(n).rule.inputs:
            readers[s_] = readers.get(s_, 0) + 1
    for i, n in enumerate(seg.nodes):
        rule: SpatialRule = facts(n).rule
        info = model.info.get(n.name, {})
        if _window(rule) or info.get("kind"):
            src = by_name[rule.inputs[0][0]]
            tm = src.meta.get("tensor_meta")
            cin = tm.shape[1] if hasattr(tm, "shape") and len(tm.shape) > 1 else 1
            ops.append((i, info.get("kind"), model.bpp(src), cin, info.get("w_bytes", 0),
                        model.bpp(n), info.get("channels", 1), info.get("pw", False),
                        (_window(rule) and rule.kind != "pad",
                         readers.get(src.name, 0) > 1)))
    macs_pp = np.array([model.info.get(nm, {}).get("macs", 0) / max(math.prod(facts(by_name[nm]).sizes), 1)
                        for nm in names])
    costs = [model.cost(n) for n in seg.nodes]
    time_pp = np.array([c.per_pixel_s for c in costs])
    fixed = float(sum(c.fixed_s for c in costs))
    # Per tile: a halo crop per window-op input and a write per region output, each a call.
    calls = sum(len(facts(n).rule.inputs) for n in seg.nodes
                if _window(facts(n).rule)) + len(seg.outputs)
    fixed += calls * model.cal.pointwise_call_s
    # Scratch memory a node holds while it runs, per output position (a folded channels-last
    # block's hidden MLP activation), beyond the workspace models of ``ops``.
    scratch_pp = np.array([model.info.get(nm, {}).get("transient_pp", 0.0) for nm in names])
    seg.body = (A, owner, bpp_storage, ops, macs_pp, time_pp, fixed, scratch_pp)
    return seg.body


def _tile_cost(model: _Model, seg: _Segment, grid: tuple[int, ...]):
    """(largest tile's peak bytes, extra MACs, extra seconds) of ``seg`` on ``grid``, or None if
    it does not fit. Extra seconds: the tiled region's predicted time minus its untiled time."""
    axes = [_axis_windows(model, seg, a, t) for a, t in enumerate(grid)]
    if any(a is None for a in axes):
        return None
    A, owner, bpp_s, ops, macs_pp, time_pp, fixed, scratch_pp = _body(model, seg)

    def outer(arrs):  # per-axis rows -> per-tile products, flattened over the grid
        out = arrs[0]
        for a in arrs[1:]:
            out = out[..., :, None] * a[..., None, :]
            out = out.reshape(*out.shape[:-2], -1)
        return out

    Ls = outer([ax[0] for ax in axes])                     # nodes x tiles
    live = A @ (bpp_s[:, None] * Ls[owner]) if owner else np.zeros_like(Ls)
    trans = scratch_pp[:, None] * Ls
    for i, kind, src_bpp, cin, w_bytes, out_bpp, cout, pw, copies in ops:
        crop = src_bpp * outer([ax[1][i] for ax in axes])
        out_b = out_bpp * Ls[i]
        pads_copy, shared = copies
        if shared:  # a window narrowed out of a producer read by several ops: halo_crop copies it
            trans[i] += crop
        elif pads_copy:  # F.pad copies the crop when the read leaves the map on any axis
            padded = 1.0 - outer([1.0 - ax[2][i].astype(float) for ax in axes])
            trans[i] += padded * crop
        if model.workspace == "cpu":
            if kind == "conv":
                in_r = crop if cin > 4 else 0.0
                out16 = out_b * (-(-cout // 16) * 16) / max(cout, 1)
                held = np.maximum(in_r + w_bytes + out16 + (out_b if pw else 0.0), out16 + out_b)
                trans[i] += np.maximum(held - out_b, 0.0)
            elif kind == "maxpool":
                trans[i] += 2 * out_b
    peak = float((live + trans).max()) if live.size else 0.0
    sums = [ax[0].sum(axis=1) for ax in axes]
    tiled_px = functools.reduce(np.multiply, sums)  # per node: positions summed over all tiles
    full_px = np.array([math.prod(facts(n).sizes) for n in seg.nodes])
    extra_macs = float((macs_pp * (tiled_px - full_px)).sum())
    n_tiles = math.prod(grid)
    extra_time = float((time_pp * (tiled_px - full_px)).sum()) + (n_tiles - 1) * fixed
    return peak, extra_macs, extra_time


# --------------------------------------------------------------------------- plans


def _outer_peaks(model: _Model, segs: list[_Segment]) -> tuple[float, list[float]]:
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


def _grid_options(model: _Model, seg: _Segment, tiles: tuple[int, ...] | None):
    """Pareto points (peak inside the call beyond its buffers, extra time, extra MACs, grid)."""
    pts = []
    grids = [tiles] if tiles else [(t,) * model.nsp for t in range(1, MAX_TILES + 1)]
    for grid in grids:
        r = _tile_cost(model, seg, grid)
        if r is None:
            break
        peak, extra, extra_time = r
        pts.append((peak, extra_time, extra, grid))
    return _pareto(pts, key=lambda p: (p[0], p[1]))


def _pareto(items, key):
    """Items not dominated in (a, b), both minimized; sorted by a descending."""
    out = []
    for it in sorted(items, key=lambda i: (key(i)[1], key(i)[0])):
        if not out or key(it)[0] < key(out[-1])[0]:
            out.append(it)
    return out


def plan(gm: GraphModule, example_inputs: Any, *, memory_budget: int | None = None,
         max_overhead: float | None = None, max_regions: int = MAX_REGIONS,
         calibration: Calibration | None = None, timing: str = "measured",
         tiles: tuple[int, ...] | None = None) -> Plan:
    """Choose merge node(s) and tile grids for an annotated GraphModule.

    ``gm`` must carry ``tensor_meta`` and receptive-field facts (``tilefx.prepare``); it is
    not modified. ``example_inputs``: one tensor, a tuple, or ``capture.Inputs``. See the module docstring for the models and the choice rule.
    ``timing="measured"`` (default) times the untiled graph once on this machine;
    ``timing="macs"`` predicts time from MACs and ``calibration`` alone (deterministic).
    ``tiles`` fixes every region's tile grid (one count per spatial axis); the planner then
    chooses only the merge node(s).

    >>> import torch, torchvision
    >>> from tilefx import prepare
    >>> x = torch.randn(1, 3, 224, 224)
    >>> gm = prepare(torchvision.models.mobilenet_v2().eval(), x)
    >>> p = plan(gm, x, timing="macs")  # deterministic: times from MACs, not this machine
    >>> p.peak_bytes < p.baseline_peak_bytes
    True
    >>> budget = int(p.pareto()[-1].peak_bytes * (1 + 2 * BUDGET_MARGIN))
    >>> q = plan(gm, x, memory_budget=budget, timing="macs")
    >>> q.peak_bytes * (1 + BUDGET_MARGIN) <= budget
    True
    """
    inputs = as_inputs(example_inputs)
    cal = calibration or calibrate()
    model = _Model(gm, inputs, cal, timing)
    base_time = model.base_time
    base_peak = model.baseline_peak
    starts = [0] + model.cuts
    options: dict[tuple[int, int], list] = {}

    def opts(a: int, b: int):
        if (a, b) not in options:
            seg = model.segment(a, b)
            options[(a, b)] = (seg, _grid_options(model, seg, tiles)) if seg else (None, [])
        return options[(a, b)]

    # A user-fixed grid asks for tiling: the untiled plan is then no candidate.
    candidates = [] if tiles else [(base_peak, base_time, 0.0, ())]
    ends = sorted(set(model.cuts) | set(model.skip_ends))
    sequences = [(c,) for c in ends]
    chain = model.chain_cuts()
    for k in range(2, max_regions + 1):
        sequences += [(*firsts, last) for firsts in itertools.combinations(chain, k - 1)
                      for last in ends if last > firsts[-1]]
    for seq in sequences:
        bounds = list(zip((0,) + seq[:-1], seq))
        segs, grids = [], []
        for a, b in bounds:
            seg, g = opts(a, b)
            if seg is None or not g:
                break
            segs.append(seg)
            grids.append(g)
        else:
            rest, at = _outer_peaks(model, segs)
            for combo in itertools.product(*grids):
                peak = max([rest] + [a + c[0] for a, c in zip(at, combo)])
                tm = base_time + sum(c[1] for c in combo)
                extra = sum(c[2] for c in combo)
                if any(math.prod(c[3]) == 1 for c in combo):
                    continue  # a 1x1 region is the untiled computation plus copies
                regions = tuple(RegionChoice((model.nodes[b].name,), c[3])
                                for (a, b), c in zip(bounds, combo))
                candidates.append((peak, tm, extra, regions))
    if not candidates:
        raise TilingError(
            f"tiles={tiles}: no merge node has a region whose outputs are at least that many "
            f"positions per axis at input shape {tuple(inputs.spatial.shape)}; use fewer tiles "
            "or a larger input"
        )
    front = _pareto(candidates, key=lambda c: (c[0], c[1]))
    plans = [Plan(regions=c[3], peak_bytes=int(round(c[0])), baseline_peak_bytes=int(base_peak),
                  extra_compute=c[2] / max(model.total_macs, 1), time_s=c[1],
                  baseline_time_s=base_time) for c in front]
    frontier = tuple(plans)
    for p in plans:
        object.__setattr__(p, "frontier", frontier)
    return _choose(plans, memory_budget, max_overhead)


def fixed_plan(gm: GraphModule, example_inputs: Any, regions: list[RegionChoice]) -> Plan:
    """The plan of regions the user fixed (``transform(merge=..., tiles=...)``).

    It carries no predictions: the planner did not choose it (``peak_bytes`` and the other
    predictions are None).
    """
    return Plan(regions=tuple(regions), peak_bytes=None, baseline_peak_bytes=None,
                extra_compute=None, time_s=None, baseline_time_s=None)


def _choose(plans: list[Plan], memory_budget: int | None, max_overhead: float | None) -> Plan:
    pool = plans
    if memory_budget is not None:
        pool = [p for p in pool if p.peak_bytes * (1 + BUDGET_MARGIN) <= memory_budget]
        if not pool:
            best = min(plans, key=lambda p: p.peak_bytes)
            raise TilingError(
                f"memory_budget={memory_budget} bytes ({memory_budget / 2**20:.1f} MiB) cannot be "
                f"met: the lowest predicted peak reachable is {best.peak_bytes} bytes "
                f"({best.peak_bytes / 2**20:.1f} MiB, {best}; plans must be predicted "
                f"{BUDGET_MARGIN:.0%} below the budget); raise the budget"
            )
    if max_overhead is not None:
        within = [p for p in pool if p.overhead <= max_overhead + 1e-12]
        pool = within or [min(pool, key=lambda p: p.time_s)]
        return min(pool, key=lambda p: (p.peak_bytes, p.time_s))
    if memory_budget is not None:
        return min(pool, key=lambda p: (p.time_s, p.peak_bytes))

    def utility(p: Plan) -> float:
        return (math.log(p.baseline_peak_bytes / max(p.peak_bytes, 1))
                - KNEE_SLOPE * math.log(p.time_s / p.baseline_time_s))

    return max(pool, key=utility)
