"""The planner: candidate plans, their predicted peak and time, the Pareto frontier.

A plan is a sequence of regions (``tilefx.plans``). The static model (``tilefx.plan_model``)
finds the graph's **boundaries**, the places where a plan may switch between untiled layers and
a region (a single-tensor cut, or a U-Net level with its skips alive), and scores candidate
regions between two boundaries without running the model per candidate. Each region's options
come from the region strategies in :data:`STRATEGIES`; the plans join one
:class:`~tilefx.plans.Frontier`, and the frontier's rule chooses (``memory_budget``,
``max_overhead``, memory first within a default time bound otherwise).

**The search is a dynamic program over the boundaries.** A plan is a path from the graph's input
to its output, each step either untiled layers to the next boundary or a region from one
boundary to a later one, which stores its outputs full-size there (a checkpoint the next region
starts from). The tensors stored across a boundary are full-size whatever ran before it, so
the peak of a step depends on that step alone: a plan's peak is the max of its steps' and its
time the sum. The Pareto-optimal partial plans up to each boundary are therefore combined
exactly with every next step (kept to :data:`MAX_PARTIALS` per boundary), and plans of any
number of regions (up to :data:`MAX_REGIONS`) are searched in time quadratic in the number of
boundaries, not exponential in the number of regions. The untiled plan is always a candidate,
so no choice is worse than it.

A region strategy is a function ``(model, segment, tiles) -> list[RegionOption]``: the ways it
can run one candidate region, each with its predicted cost. :func:`recompute_tiles` runs a
region on a tile grid, each tile recomputing its halo; :func:`multipass_tiles` runs a region
through statistics over the whole map in several passes. Every other way of running a region
(streaming strips with row buffers) is a strategy added to :data:`STRATEGIES`, and its options
join the same frontier.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, NamedTuple

from torch.fx import GraphModule

from .capture import as_inputs
from .cost import Calibration, NodeCost, calibrate
from .errors import TilingError
from .passes.receptive_field import facts
from .passes.recompute import (is_splittable, recompute_origin, recompute_skips, skip_chain,
                               why_not_again)
from .passes.regions import tensor_valued
from .plan_model import MAX_SKIPS, Boundary, Segment, StaticModel, tile_cost
from .primitive_plan import alternatives, span_options
from .plans import BUDGET_MARGIN, KNEE_SLOPE, Frontier, Plan, RegionChoice, pareto
from .stream_plan import stream_costs, strip_heights

__all__ = ["RegionChoice", "Plan", "Frontier", "RegionOption", "plan", "frontier", "fixed_plan",
           "recompute_tiles", "multipass_tiles", "recompute_variants", "variant_costs", "stream_strips", "STRATEGIES", "MAX_PASSES", "calibrate", "Calibration", "MAX_TILES",
           "MAX_REGIONS", "MAX_SKIPS", "KNEE_SLOPE", "BUDGET_MARGIN", "TIME_TIE"]

#: Tile counts tried per axis.
MAX_TILES = 8
#: Regions a plan may chain, each starting where the one before it ends or after untiled
#: layers (its start is a stored checkpoint).
MAX_REGIONS = 16


class RegionOption(NamedTuple):
    """One way to run one candidate region, with what it costs beside the untiled model.

    ``peak_bytes`` is the peak inside the region call beyond its full-size output buffers;
    ``extra_time_s`` and ``extra_macs`` are what the option adds to the untiled model's.
    ``choice`` is the :class:`RegionChoice` to apply, its ``merge`` and ``start`` left empty:
    the planner fills in the boundaries of the region the option is for.
    ``before_outputs_bytes``: the peak of the passes that run before the output buffers
    exist (a multi-pass region's statistics passes).
    """

    peak_bytes: float
    extra_time_s: float
    extra_macs: float
    choice: RegionChoice
    before_outputs_bytes: float = 0.0


def _grids(model: StaticModel, tiles: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    return [tiles] if tiles else [(t,) * model.nsp for t in range(1, MAX_TILES + 1)]


def recompute_tiles(model: StaticModel, seg: Segment,
                    tiles: tuple[int, ...] | None) -> list[RegionOption]:
    """Square tile grids of 1 to :data:`MAX_TILES` per axis (or the user's ``tiles``), each
    tile recomputing its halo: the Pareto-optimal ones."""
    if seg.phases is not None:
        return []
    options = []
    for grid in _grids(model, tiles):
        c = tile_cost(model, seg, grid)
        if c is None:
            break  # finer grids do not fit either
        options.append(RegionOption(c.peak_bytes, c.extra_time_s, c.extra_macs,
                                    RegionChoice((), grid)))
    return pareto(options, lambda o: o.peak_bytes, lambda o: o.extra_time_s)


def multipass_tiles(model: StaticModel, seg: Segment,
                    tiles: tuple[int, ...] | None) -> list[RegionOption]:
    """A multi-pass region (statistics over the whole map, found exactly by extra passes) on
    each grid: peak of its largest pass, and every pass's recomputation as extra time."""
    if seg.phases is None or len(seg.phases) > MAX_PASSES:
        return []

    def untiled(nodes):
        return (sum(model.untiled_time(n) for n in nodes),
                sum(model.info.get(n.name, {}).get("macs", 0) for n in nodes))

    base_t, base_m = untiled(seg.nodes)
    full = [untiled(ph.nodes) for ph in seg.phases]
    # A norm of the stored input: its moments are one reduction over that tensor (about half
    # of what the untiled norm costs, which also applies it).
    stats_t = sum(0.5 * model.untiled_time(n) for n in seg.outer_statistics)
    options = []
    for grid in _grids(model, tiles):
        costs = [tile_cost(model, ph, grid) for ph in seg.phases]
        if any(c is None for c in costs):
            break
        time = sum(c.extra_time_s + t for c, (t, _) in zip(costs, full)) + stats_t - base_t
        macs = sum(c.extra_macs + m for c, (_, m) in zip(costs, full)) - base_m
        early = max((c.peak_bytes for c in costs[:-1]), default=0.0)
        options.append(RegionOption(costs[-1].peak_bytes, time, macs,
                                    RegionChoice((), grid, multipass=True), early))
    return pareto(options, lambda o: o.peak_bytes, lambda o: o.extra_time_s)


#: Passes a multi-pass region may take (each recomputes the region up to its statistics).
MAX_PASSES = 4


def stream_strips(model: StaticModel, seg: Segment,
                  tiles: tuple[int, ...] | None) -> list[RegionOption]:
    """The region streamed in strips (every row once, row buffers; ``tilefx.stream_plan``) at
    a few strip heights, each on ATen's default primitives and, where a convolution's scratch
    on a strip is worth it, on leaner ones: the Pareto-optimal options. None for a multi-pass
    region or a user-fixed tile grid."""
    if seg.phases is not None or tiles:
        return []
    options = []
    for h in strip_heights(seg):
        for c in stream_costs(model, seg, h):
            options.append(RegionOption(c.peak_bytes, c.extra_time_s, c.extra_macs, RegionChoice(
                (), (c.nominal_strips,) + (1,) * (model.nsp - 1), stream=h,
                primitives=c.primitives)))
    return pareto(options, lambda o: o.peak_bytes, lambda o: o.extra_time_s)

#: The ways a region can run; each proposes options for every candidate region (a single-pass
#: segment, and the multi-pass one where the region has statistics over the whole map).
STRATEGIES: tuple[Callable[[StaticModel, Segment, Any], list[RegionOption]], ...] = (
    recompute_tiles, multipass_tiles, stream_strips,
)


def plan(gm: GraphModule, example_inputs: Any, *, memory_budget: int | None = None,
         max_overhead: float | None = None, max_extra_compute: float | None = None,
         max_regions: int = MAX_REGIONS, calibration: Calibration | None = None,
         timing: str = "measured", tiles: tuple[int, ...] | None = None) -> Plan:
    """Choose a plan for an annotated GraphModule: its regions (merge node(s), tiles or strips,
    passes), the skips it computes again and the primitives of its untiled layers.

    ``gm`` must carry ``tensor_meta`` and receptive-field facts (``tilefx.prepare``); it is
    not modified. ``example_inputs``: one tensor, a tuple, or ``capture.Inputs``. The
    predictions come from ``tilefx.plan_model``; the choice rule is ``tilefx.plans``'.
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
    return frontier(gm, example_inputs, max_regions=max_regions, calibration=calibration,
                    timing=timing, tiles=tiles).choose(memory_budget, max_overhead,
                                                       max_extra_compute)


class _Candidate(NamedTuple):
    peak_bytes: float
    time_s: float
    extra_macs: float
    regions: tuple[RegionChoice, ...]
    recompute: tuple[str, ...] = ()
    primitives: tuple[tuple[str, str], ...] = ()


#: Partial plans kept per boundary by the search: beyond this many Pareto-optimal ones, the
#: fastest per 2% band of peak.
MAX_PARTIALS = 48


def _thin(cands: list[_Candidate]) -> list[_Candidate]:
    if len(cands) <= MAX_PARTIALS:
        return cands
    kept: dict[int, _Candidate] = {}
    for c in cands:  # fastest first
        kept.setdefault(round(math.log(max(c.peak_bytes, 1.0)) / math.log(1.02)), c)
    return sorted(kept.values(), key=lambda c: (c.time_s, c.peak_bytes))


def frontier(gm: GraphModule, example_inputs: Any, *, max_regions: int = MAX_REGIONS,
             calibration: Calibration | None = None, timing: str = "measured",
             tiles: tuple[int, ...] | None = None) -> Frontier:
    """Every Pareto-optimal plan for an annotated GraphModule (arguments as for :func:`plan`).

    The plans of the graph itself and of its variants that compute a U-Net's long skips again
    instead of storing them (:func:`recompute_variants`) join one frontier.

    >>> import torch, torchvision
    >>> from tilefx import prepare
    >>> x = torch.randn(1, 3, 224, 224)
    >>> front = frontier(prepare(torchvision.models.resnet18().eval(), x), x, timing="macs")
    >>> front.plans[0].regions   # the fastest plan is the untiled model
    ()
    >>> front.lowest_peak().peak_bytes < front.plans[0].peak_bytes
    True
    """
    inputs = as_inputs(example_inputs)
    if tiles is not None and math.prod(tiles) == 1:
        raise TilingError(
            f"tiles={tiles}: one tile is the whole map, which does not lower peak memory, so the "
            "planner never chooses it; ask for at least 2 tiles on some axis, leave tiles unset "
            "to let the planner choose, or pass merge= with tiles=1 to run a region as one tile")
    cal = calibration or calibrate()
    model = StaticModel(gm, inputs, cal, timing)
    base_time, base_peak = model.base_time, model.baseline_peak
    final = _search(model, tiles, max_regions)
    for skips in recompute_variants(model):
        variant = recompute_skips(gm, skips)
        vmodel = StaticModel(variant, inputs, cal, timing, costs=variant_costs(variant, model))
        more = vmodel.total_macs - model.total_macs
        final += [c._replace(extra_macs=c.extra_macs + more, recompute=skips)
                  for c in _search(vmodel, tiles, max_regions)]
    if not final:
        raise TilingError(
            f"tiles={tiles}: no merge node has a region whose outputs are at least that many "
            f"positions per axis at input shape {tuple(inputs.spatial.shape)}; use fewer tiles "
            "or a larger input"
        )
    return Frontier.of(
        Plan(regions=c.regions, peak_bytes=int(round(c.peak_bytes)),
             baseline_peak_bytes=int(base_peak), extra_compute=c.extra_macs / max(model.total_macs, 1),
             time_s=c.time_s, baseline_time_s=base_time, recompute=c.recompute,
             primitives=c.primitives)
        for c in final)  # all of them: a MAC limit chooses among plans off the frontier too


def _search(model: StaticModel, tiles: tuple[int, ...] | None, max_regions: int) -> list[_Candidate]:
    """The Pareto-optimal plans of one graph: a path over its boundaries (module docstring)."""
    bounds = model.boundaries
    alts = alternatives(model, model.timing)
    starts = {b.position for b in model.chain_starts()}
    too_deep: set[int] = set()  # starts whose multi-pass regions already took too many passes

    def region_options(a: Boundary, b: Boundary) -> list[tuple[Segment, list[RegionOption]]]:
        """Per way of drawing the region from boundary ``a`` to merge ``b`` (single- or
        multi-pass), the segment and every strategy's options on it."""
        groups = []
        multi = None
        if a.position not in too_deep:
            multi = model.segment(a, b, multipass=True)
            if multi is not None and len(multi.phases) > MAX_PASSES:
                too_deep.add(a.position)  # a later merge needs at least as many passes
                multi = None
        for seg in (model.segment(a, b), multi):
            opts = [o for strategy in STRATEGIES for o in strategy(model, seg, tiles)] if seg else []
            opts = [o for o in opts if math.prod(o.choice.tiles) > 1]  # one tile is no region
            if opts:
                groups.append((seg, opts))
        return groups

    def key(c: _Candidate) -> Any:
        # With a user-fixed grid a plan must tile something: keep tiled partial plans apart.
        return bool(c.regions) if tiles else None

    # A step's peak depends only on what runs in it (the tensors stored across a boundary are
    # full-size whatever ran before), so a plan's peak is the max of its steps' and its time the
    # sum: the Pareto-optimal partial plans up to each boundary combine exactly with every next
    # step. Every region step by its choice: its peak, its option, and the other options of
    # the same region (for the tie-break on extra MACs, :func:`_fewer_macs`).
    steps_of: dict[RegionChoice, tuple[float, RegionOption, list]] = {}
    partial: list[list[_Candidate]] = [[] for _ in bounds]
    partial[0] = [_Candidate(0.0, model.base_time, 0.0, ())]
    for j in range(1, len(bounds)):
        b = bounds[j]
        # The span since the previous boundary run untiled, with each Pareto-optimal choice of
        # primitives for its convolutions and linears (tilefx.primitive_plan).
        span = [i for i, p in enumerate(model.step_pos) if bounds[j - 1].position <= p < b.position]
        untiled = span_options([model.baseline_curve[i] for i in span],
                               {k: alts[i] for k, i in enumerate(span) if i in alts})
        cands = [c._replace(peak_bytes=max(c.peak_bytes, o.peak_bytes), time_s=c.time_s + o.extra_time_s,
                            primitives=c.primitives + o.primitives)
                 for c in partial[j - 1] for o in untiled]
        for i in range(j):
            a = bounds[i]
            if a.position not in starts or not partial[i]:
                continue
            if not any(len(c.regions) < max_regions for c in partial[i]):
                continue
            merge = (model.nodes[b.position].name,)
            start = tuple(t.name for t in a.alive)
            groups = []
            for seg, opts in region_options(a, b):
                rest, at, out_bytes = model.span_peaks(seg, a, b)
                groups.append([(max(rest, at + o.peak_bytes, at - out_bytes + o.before_outputs_bytes),
                                o, replace(o.choice, merge=merge, start=start)) for o in opts])
            region_steps = [st for steps in groups for st in steps]
            for pk, o, choice in region_steps:
                steps_of[choice] = (pk, o, region_steps)
            for steps in groups:
                for c in partial[i]:
                    if len(c.regions) >= max_regions:
                        continue
                    for pk, o, choice in steps:
                        # _replace: the primitives chosen for the untiled spans before it stay
                        cands.append(c._replace(peak_bytes=max(c.peak_bytes, pk),
                                                time_s=c.time_s + o.extra_time_s,
                                                extra_macs=c.extra_macs + o.extra_macs,
                                                regions=c.regions + (choice,)))
        by_key: dict[Any, list[_Candidate]] = {}
        for c in cands:
            by_key.setdefault(key(c), []).append(c)
        partial[j] = [c for group in by_key.values()
                      for c in _thin(pareto(group, lambda c: c.peak_bytes, lambda c: c.time_s))]
    slack = TIME_TIE * model.base_time
    return [_fewer_macs(c, steps_of, slack) for c in partial[-1] if c.regions or not tiles]


#: The time model's tie: plans whose predicted times differ by less than this fraction of the
#: untiled model's are equally fast as far as the model can tell (its predictions of measured
#: latency are no closer), and the one that computes less is kept (:func:`_fewer_macs`).
TIME_TIE = 0.02


def _fewer_macs(c: _Candidate, steps_of: dict, slack_s: float) -> _Candidate:
    """``c`` with regions switched to options that recompute less, at the same peak and within
    ``slack_s`` seconds of predicted time in all.

    A plan's peak is its highest step's; the regions below it can run any of their options
    that stays under that peak. Among such options the search keeps the fastest, however
    small the lead: a 2x2 tile grid a few milliseconds ahead of strips that recompute
    nothing. Within the time model's tie the option of fewest extra MACs is the better one
    (recompute is what a faster or a busier machine pays for most), so each region, the most
    recomputing first, takes the option of fewest extra MACs that fits the slack left.
    """
    regions = list(c.regions)
    time_s, macs, left = c.time_s, c.extra_macs, slack_s
    order = sorted(range(len(regions)), key=lambda k: -steps_of[regions[k]][1].extra_macs)
    for k in order:
        _, o, alternatives = steps_of[regions[k]]
        fits = [(o2.extra_macs, o2.extra_time_s - o.extra_time_s, ch)
                for pk, o2, ch in alternatives
                if pk <= c.peak_bytes and o2.extra_macs < o.extra_macs
                and o2.extra_time_s - o.extra_time_s <= left]
        if not fits:
            continue
        m2, dt, ch = min(fits, key=lambda f: (f[0], f[1]))
        regions[k] = ch
        time_s += dt
        macs += m2 - o.extra_macs
        left -= max(dt, 0.0)
    return c._replace(regions=tuple(regions), time_s=time_s, extra_macs=macs)


#: Long skips a plan may compute again (the largest first): one, then the two largest.
MAX_RECOMPUTED_SKIPS = 2


def recompute_variants(model: StaticModel) -> list[tuple[str, ...]]:
    """Which skips the planner also tries to compute again instead of storing: tensors stored
    across at least two U-Net levels whose computation from the graph's inputs holds only
    spatial ops and norms (their statistics are kept), the largest first."""
    levels = [b for b in model.boundaries if b.level]
    crossing: dict[Any, int] = {}
    for b in levels:
        for t in b.alive:
            crossing[t] = crossing.get(t, 0) + 1
    long = [t for t, k in crossing.items() if k >= 2 and len(t.users) > 1
            and why_not_again(t) is None
            and all(facts(n).spatial or is_splittable(n) or not tensor_valued(n)
                    for n in skip_chain(t))]
    long.sort(key=lambda t: -model.bpp(t) * math.prod(facts(t).sizes))
    return [tuple(t.name for t in long[:k]) for k in range(1, min(len(long), MAX_RECOMPUTED_SKIPS) + 1)]


def variant_costs(variant: GraphModule, model: StaticModel) -> dict[str, NodeCost]:
    """Per-node costs of a graph variant from the graph it was made from: a node computed again
    costs what the original does; a split norm's moments and application half of the norm."""
    out = {}
    for n in variant.graph.nodes:
        origin = recompute_origin(n)
        if origin is None:
            if n.name in model.costs:
                out[n.name] = model.costs[n.name]
            continue
        name, role = origin
        c = model.costs.get(name)
        if c is None:
            continue
        if role in ("moments", "apply"):
            c = c.scaled(0.5)
        out[n.name] = c
    return out


def fixed_plan(gm: GraphModule, example_inputs: Any, regions: list[RegionChoice]) -> Plan:
    """The plan of regions the user fixed (``transform(merge=..., tiles=...)``).

    It carries no predictions: the planner did not choose it (``peak_bytes`` and the other
    predictions are None).
    """
    return Plan(regions=tuple(regions), peak_bytes=None, baseline_peak_bytes=None,
                extra_compute=None, time_s=None, baseline_time_s=None)
