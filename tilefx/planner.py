"""The planner: candidate plans, their predicted peak and time, the Pareto frontier.

A plan is a sequence of regions (``tilefx.plans``). The planner enumerates cut sequences of up
to :data:`MAX_REGIONS` regions; each region's options come from the region strategies in
:data:`STRATEGIES`, scored by the static model (``tilefx.plan_model``: per-tile peak, extra
MACs, extra time, without running the model per candidate); the plans join one
:class:`~tilefx.plans.Frontier`, and the frontier's rule chooses (``memory_budget``,
``max_overhead``, or the knee).

Regions chain end to start from the graph's input; a lone region may also start at a cut
(``RegionChoice.start``), the layers before it untiled: a U-Net's skips cross every cut of its
encoder and decoder, and only the full-resolution tail after the last skip is worth tiling.

For a fixed sequence of cuts the choices couple only through ``peak = max(...)`` and
``time = sum(...)``, so the per-region option frontiers are combined exactly; plans are pooled
over all cut sequences and the Pareto-optimal ones kept. The untiled plan is always a
candidate, so no choice is worse than it.

A region strategy is a function ``(model, segment, tiles) -> list[RegionOption]``: the ways it
can run one candidate region, each with its predicted cost. Today's only strategy recomputes
halos on a tile grid (:func:`recompute_tiles`); every other way of running a region (several
passes for statistics over the whole map, streaming strips with row buffers) is a strategy
added to :data:`STRATEGIES`, and its options join the same frontier.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any, Callable, NamedTuple

from torch.fx import GraphModule

from .capture import as_inputs
from .cost import Calibration, calibrate
from .errors import TilingError
from .plan_model import MAX_SKIPS, Segment, StaticModel, tile_cost, outer_peaks
from .plans import BUDGET_MARGIN, KNEE_SLOPE, Frontier, Plan, RegionChoice, pareto
from .stream_plan import stream_cost, strip_heights

__all__ = ["RegionChoice", "Plan", "Frontier", "RegionOption", "plan", "frontier", "fixed_plan",
           "recompute_tiles", "multipass_tiles", "stream_strips", "STRATEGIES", "MAX_PASSES", "calibrate", "Calibration", "MAX_TILES",
           "MAX_REGIONS", "MAX_SKIPS", "KNEE_SLOPE", "BUDGET_MARGIN"]

#: Tile counts tried per axis.
MAX_TILES = 8
#: Regions a plan may chain (the tail after a merge tiled again).
MAX_REGIONS = 2


class RegionOption(NamedTuple):
    """One way to run one candidate region, with what it costs beside the untiled model.

    ``peak_bytes`` is the peak inside the region call beyond its full-size output buffers;
    ``extra_time_s`` and ``extra_macs`` are what the option adds to the untiled model's.
    ``choice`` is the :class:`RegionChoice` to apply, its ``merge`` left empty: the planner
    fills in the merge node(s) of the region the option is for.
    """

    peak_bytes: float
    extra_time_s: float
    extra_macs: float
    choice: RegionChoice


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
        return (sum(model.cost(n).time(model.positions(n)) for n in nodes),
                sum(model.info.get(n.name, {}).get("macs", 0) for n in nodes))

    base_t, base_m = untiled(seg.nodes)
    full = [untiled(ph.nodes) for ph in seg.phases]
    options = []
    for grid in _grids(model, tiles):
        costs = [tile_cost(model, ph, grid) for ph in seg.phases]
        if any(c is None for c in costs):
            break
        time = sum(c.extra_time_s + t for c, (t, _) in zip(costs, full)) - base_t
        macs = sum(c.extra_macs + m for c, (_, m) in zip(costs, full)) - base_m
        options.append(RegionOption(max(c.peak_bytes for c in costs), time, macs,
                                    RegionChoice((), grid, multipass=True)))
    return pareto(options, lambda o: o.peak_bytes, lambda o: o.extra_time_s)


#: Passes a multi-pass region may take (each recomputes the region up to its statistics).
MAX_PASSES = 4


def stream_strips(model: StaticModel, seg: Segment,
                  tiles: tuple[int, ...] | None) -> list[RegionOption]:
    """The region streamed in strips (every row once, row buffers; ``tilefx.stream_plan``) at
    a few strip heights: the Pareto-optimal ones. None for a multi-pass region or a user-fixed
    tile grid."""
    if seg.phases is not None or tiles:
        return []
    options = []
    for h in strip_heights(seg):
        c = stream_cost(model, seg, h)
        if c is not None:
            options.append(RegionOption(c.peak_bytes, c.extra_time_s, c.extra_macs, RegionChoice(
                (), (c.nominal_strips,) + (1,) * (model.nsp - 1), stream=h)))
    return pareto(options, lambda o: o.peak_bytes, lambda o: o.extra_time_s)

#: The ways a region can run; each proposes options for every candidate region (a single-pass
#: segment, and the multi-pass one where the region has statistics over the whole map).
STRATEGIES: tuple[Callable[[StaticModel, Segment, Any], list[RegionOption]], ...] = (
    recompute_tiles, multipass_tiles, stream_strips,
)


def plan(gm: GraphModule, example_inputs: Any, *, memory_budget: int | None = None,
         max_overhead: float | None = None, max_regions: int = MAX_REGIONS,
         calibration: Calibration | None = None, timing: str = "measured",
         tiles: tuple[int, ...] | None = None) -> Plan:
    """Choose merge node(s) and tile grids for an annotated GraphModule.

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
                    timing=timing, tiles=tiles).choose(memory_budget, max_overhead)


class _Candidate(NamedTuple):
    peak_bytes: float
    time_s: float
    extra_macs: float
    regions: tuple[RegionChoice, ...]


def frontier(gm: GraphModule, example_inputs: Any, *, max_regions: int = MAX_REGIONS,
             calibration: Calibration | None = None, timing: str = "measured",
             tiles: tuple[int, ...] | None = None) -> Frontier:
    """Every Pareto-optimal plan for an annotated GraphModule (arguments as for :func:`plan`).

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
    model = StaticModel(gm, inputs, calibration or calibrate(), timing)
    base_time, base_peak = model.base_time, model.baseline_peak
    options: dict[tuple[int, int], list[tuple[Segment, list[RegionOption]]]] = {}

    def region_options(a: int, b: int) -> list[tuple[Segment, list[RegionOption]]]:
        """Per way of drawing the region from cut ``a`` to merge ``b`` (single- or multi-
        pass), the segment and every strategy's options on it."""
        if (a, b) not in options:
            groups = []
            for seg in (model.segment(a, b), model.segment(a, b, multipass=True)):
                opts = [o for strategy in STRATEGIES for o in strategy(model, seg, tiles)] if seg else []
                if opts:
                    groups.append((seg, opts))
            options[(a, b)] = groups
        return options[(a, b)]

    # A user-fixed grid asks for tiling: the untiled plan is then no candidate.
    candidates = [] if tiles else [_Candidate(base_peak, base_time, 0.0, ())]
    ends = sorted(set(model.cuts) | set(model.skip_ends))
    chain = model.chain_cuts()
    # A sequence: (start, end) per region. Regions chain end to start from the graph's input;
    # one region alone may also start at a cut, leaving the layers before it untiled (a
    # U-Net's full-resolution decoder tail, after its last skip is read).
    sequences = [((0, e),) for e in ends]
    sequences += [((a, e),) for a in chain for e in ends if e > a]
    for k in range(2, max_regions + 1):
        sequences += [tuple(zip((0,) + seq[:-1], seq))
                      for firsts in itertools.combinations(chain, k - 1)
                      for seq in ((*firsts, last) for last in ends if last > firsts[-1])]
    for bounds in sequences:
        per_bound = [region_options(a, b) for a, b in bounds]
        if not all(per_bound):
            continue
        for groups in itertools.product(*per_bound):
            segs = [seg for seg, _ in groups]
            per_region = [opts for _, opts in groups]
            rest, at = outer_peaks(model, segs)
            merges = [(model.nodes[b].name,) for _, b in bounds]
            # Each region starts after its cut's tensor (after the previous region's output, or
            # the untiled layers before a lone region), as the planner scored it.
            starts = [(model.cut_tensor[a].name,) if a else () for a, _ in bounds]
            for combo in itertools.product(*per_region):
                if any(math.prod(o.choice.tiles) == 1 for o in combo):
                    continue  # a 1x1 region is the untiled computation plus copies
                regions = [replace(o.choice, merge=m, start=st)
                           for m, st, o in zip(merges, starts, combo)]
                candidates.append(_Candidate(
                    peak_bytes=max([rest] + [a + o.peak_bytes for a, o in zip(at, combo)]),
                    time_s=base_time + sum(o.extra_time_s for o in combo),
                    extra_macs=sum(o.extra_macs for o in combo),
                    regions=tuple(regions)))
    if not candidates:
        raise TilingError(
            f"tiles={tiles}: no merge node has a region whose outputs are at least that many "
            f"positions per axis at input shape {tuple(inputs.spatial.shape)}; use fewer tiles "
            "or a larger input"
        )
    # Keep the non-dominated candidates before building plans: there can be many thousands.
    kept = pareto(candidates, lambda c: c.peak_bytes, lambda c: c.time_s)
    return Frontier.of(
        Plan(regions=c.regions, peak_bytes=int(round(c.peak_bytes)),
             baseline_peak_bytes=int(base_peak), extra_compute=c.extra_macs / max(model.total_macs, 1),
             time_s=c.time_s, baseline_time_s=base_time)
        for c in kept)


def fixed_plan(gm: GraphModule, example_inputs: Any, regions: list[RegionChoice]) -> Plan:
    """The plan of regions the user fixed (``transform(merge=..., tiles=...)``).

    It carries no predictions: the planner did not choose it (``peak_bytes`` and the other
    predictions are None).
    """
    return Plan(regions=tuple(regions), peak_bytes=None, baseline_peak_bytes=None,
                extra_compute=None, time_s=None, baseline_time_s=None)
