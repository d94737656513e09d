"""Plans and their frontier: what the planner returns, and the rule that picks one plan.

A :class:`Plan` is a sequence of :class:`RegionChoice` (each a merge node with a tile grid or
a strip height, applied in order with ``tile_rewrite`` or ``stream_rewrite``; an empty sequence
is the untiled model), the skips it computes again (``recompute``) and the primitives it
chooses for untiled layers (``primitives``), with the planner's predictions. A :class:`Frontier` holds the Pareto-optimal plans (peak memory against
predicted time) and chooses among them:

* ``memory_budget``: the fastest plan whose peak fits with a :data:`BUDGET_MARGIN` to spare
  (a TilingError with the lowest reachable peak otherwise);
* ``max_overhead``: the lowest peak whose predicted time is within ``1 + max_overhead`` of
  the untiled time (plans within :data:`PEAK_TIE` of that peak count as equal, and the fastest
  of them is chosen: a near-tie in peak is never decided by noise in the predicted times;
  where the untiled model is one of them, it is chosen: a rewrite is for memory);
* neither: memory first, the same rule with ``max_overhead=DEFAULT_MAX_OVERHEAD``;
* ``max_extra_compute`` (with any of the above): only plans whose extra MACs (halos computed
  again, skips computed again) are at most that fraction of the untiled model's take part
  (:meth:`Frontier.within_compute`; the untiled model, at none, always does).

``knee()`` is the other named choice: the plan that maximizes
``log(baseline_peak / peak) - KNEE_SLOPE * log(time / baseline_time)``, i.e. where a 1% longer
run stops buying at least ``KNEE_SLOPE``% less memory.

These records are the one interface every kind of plan option extends: a new way to run a
region (several passes for statistics over the whole map, streaming strips) or a choice per
node (a convolution primitive) becomes a field of :class:`RegionChoice` or :class:`Plan` with
a default that means today's behaviour, its candidates join the same frontier, and the choice
rule above applies to all of them unchanged.

>>> a = Plan((), 100, 100, 0.0, 1.0, 1.0)
>>> b = Plan((RegionChoice(("add_3",), (2, 2)),), 40, 100, 0.1, 1.1, 1.0)
>>> c = Plan((RegionChoice(("add_3",), (4, 4)),), 30, 100, 0.3, 1.6, 1.0)
>>> front = Frontier.of([c, a, b, Plan((), 120, 100, 0.0, 1.2, 1.0)])  # the last is dominated
>>> [p.peak_bytes for p in front]
[100, 40, 30]
>>> front.choose().peak_bytes, front.choose(max_overhead=0.6).peak_bytes  # +15% by default
(40, 30)
>>> front.knee().peak_bytes
40
>>> front.choose(memory_budget=45).peak_bytes   # 40 bytes plus the 5% margin fit in 45
40
>>> front.choose().pareto() == list(front)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, TypeVar

from .errors import TilingError

__all__ = ["RegionChoice", "Plan", "Frontier", "pareto", "KNEE_SLOPE", "BUDGET_MARGIN",
           "DEFAULT_MAX_OVERHEAD", "PEAK_TIE"]

#: The default time bound: without options, the lowest peak predicted within 15% more time
#: than the untiled model (the time model's error against measured ratios stays within about
#: 10% on the benchmark rows, so the bound holds where the prediction does).
DEFAULT_MAX_OVERHEAD = 0.15
#: Peaks within this fraction of each other are equal to the choice rule.
PEAK_TIE = 0.03
#: The knee's exchange rate between log peak and log time (see the module docstring).
KNEE_SLOPE = 2.0
#: A memory_budget is met by plans predicted at least this fraction below it: the static
#: model's error against measured peaks stays under 5% on the benchmark models.
BUDGET_MARGIN = 0.05


T = TypeVar("T")


def pareto(items: Iterable[T], peak: Callable[[T], float], time: Callable[[T], float]) -> list[T]:
    """The items no other item beats on both peak and time: fastest (highest peak) first."""
    kept: list[T] = []
    for it in sorted(items, key=lambda i: (time(i), peak(i))):
        if not kept or peak(it) < peak(kept[-1]):
            kept.append(it)
    return kept


def _undominated(plans: list[Plan]) -> list[Plan]:
    """The plans no other plan matches or beats on peak, predicted time and extra MACs, with
    one of them strictly better (equal plans: the first)."""
    def key(p: Plan) -> tuple[float, float, float]:
        return (p.peak_bytes, p.time_s, p.extra_compute or 0.0)

    keys = [key(p) for p in plans]
    return [p for i, (p, k) in enumerate(zip(plans, keys))
            if not any(all(a <= b for a, b in zip(o, k)) and (o != k or j < i)
                       for j, o in enumerate(keys) if j != i)]


@dataclass(frozen=True)
class RegionChoice:
    """One region: the merge node(s) it ends before, its tile grid, and where it starts.

    ``start`` names the tensors the region begins after (they and what computes them run
    untiled); empty, the region reaches back to the graph's inputs or an earlier region.
    ``multipass``: see ``passes.tile_rewrite``.
    """

    merge: tuple[str, ...]
    tiles: tuple[int, ...]
    start: tuple[str, ...] = ()
    #: the region reaches through statistics over the whole map (group and instance norms,
    #: squeeze-and-excitation), found exactly by extra passes over its tiles
    multipass: bool = False
    #: strip height in rows of the region's tallest feature map: the region streams in
    #: strips, every row once, with row buffers (``passes.stream_rewrite``); ``tiles`` is then
    #: the strip count at the planned shape. 0: tiles, as the grid says
    stream: int = 0
    #: ``(node, primitive)``: convolutions inside the region run by a primitive other than
    #: ATen's default (``tilefx.stream_plan`` prices them per strip), emitted by
    #: ``passes.primitives`` after the rewrite
    primitives: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        after = f"{','.join(self.start)} .. " if self.start else ""
        passes = " multi-pass" if self.multipass else ""
        if self.stream:
            return f"{after}{','.join(self.merge)} streamed in strips of {self.stream} rows"
        return f"{after}{','.join(self.merge)} @ {'x'.join(map(str, self.tiles))}{passes}"


@dataclass(frozen=True)
class Plan:
    """A tiling plan with its predicted peak memory and time.

    ``extra_compute`` is the fraction of the model's MACs the halos add; ``time_s`` and
    ``baseline_time_s`` come from the calibrated cost model (``overhead = time/baseline - 1``).
    A plan the user fixed carries no predictions (they are None). A plan the planner chose
    carries the :class:`Frontier` it was chosen from (``frontier``, ``pareto()``).
    """

    regions: tuple[RegionChoice, ...]
    peak_bytes: int | None
    baseline_peak_bytes: int | None
    extra_compute: float | None
    time_s: float | None
    baseline_time_s: float | None
    frontier: "Frontier | None" = field(default=None, compare=False, repr=False)
    #: skips computed again from the graph's inputs for their late readers instead of stored
    #: (``passes.recompute``), applied before the regions
    recompute: tuple[str, ...] = ()
    #: ``(node, primitive)``: convolutions and linears run untiled by a primitive other than
    #: ATen's default (``tilefx.primitive_plan``), emitted by ``passes.primitives``; a region's
    #: own choices are its ``RegionChoice.primitives`` (both: :attr:`every_primitive`)
    primitives: tuple[tuple[str, str], ...] = ()
    #: ``time_s`` was measured when the plan was chosen (``tilefx.autotune``), not predicted
    tuned: bool = False

    @property
    def rewrite(self) -> tuple:
        """What the plan does to the graph (regions, recomputed skips, primitives), without its
        predictions: two plans with equal ``rewrite`` produce the same module."""
        return (self.regions, self.recompute, self.primitives)

    @property
    def changes_nothing(self) -> bool:
        """Whether this is the model as captured: no region, no recomputed skip, no primitive.

        >>> Plan((), 8, 8, 0.0, 1.0, 1.0).changes_nothing
        True
        >>> Plan((), 8, 1, 0.0, 1.0, 1.0, primitives=(("conv2d", "native"),)).changes_nothing
        False
        """
        return not any(self.rewrite)

    @property
    def every_primitive(self) -> dict[str, str]:
        """Every primitive the plan chooses, node -> primitive: the untiled layers'
        (``primitives``) and those inside its regions (``RegionChoice.primitives``)."""
        chosen = dict(self.primitives)
        for r in self.regions:
            chosen.update(r.primitives)
        return chosen

    @property
    def predicted(self) -> bool:
        """Whether the planner chose (and so predicted) this plan."""
        return self.peak_bytes is not None

    @property
    def overhead(self) -> float | None:
        """Predicted time over the untiled model's, minus one."""
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
        return list(self.frontier) if self.frontier is not None else [self]

    @property
    def label(self) -> str:
        """What the plan does, in words: ``"layer2 @ 4x4 then layer3 @ 2x2"``, ``"untiled"``,
        with the recomputed skips and the number of layers on another primitive."""
        what = " then ".join(map(str, self.regions)) if self.regions else "untiled"
        if self.recompute:
            what = f"compute {', '.join(self.recompute)} again; {what}"
        chosen = self.every_primitive
        if chosen:
            what += f"; {len(chosen)} layer(s) on another primitive"
        return what

    def __str__(self) -> str:
        what = self.label
        if not self.predicted:
            return f"{what} (fixed by the user; no predictions)"
        return (f"{what}: peak {self.peak_bytes / 2**20:.2f} MiB ({self.ratio:.1f}x lower than "
                f"{self.baseline_peak_bytes / 2**20:.2f} MiB), extra MACs {self.extra_compute:+.1%}, "
                f"{'measured' if self.tuned else 'predicted'} time {self.overhead:+.1%}")


@dataclass(frozen=True)
class Frontier:
    """The Pareto-optimal plans of one model at one input shape, highest peak first.

    Build it with :meth:`of` (which drops dominated plans); iterate it, or :meth:`choose`.
    """

    plans: tuple[Plan, ...]
    #: the plans no other plan beats on peak, predicted time and extra MACs at once: what a MAC
    #: limit (:meth:`within_compute`) chooses among. A plan that computes every MAC once can
    #: be off the peak/time frontier (a U-Net whose skip is computed again streams to a lower
    #: peak in less time) and still be the best plan under the limit. The untiled model is
    #: always one.
    candidates: tuple[Plan, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, plans: Iterable[Plan]) -> "Frontier":
        """The plans no other plan beats on both peak and predicted time (and, kept for
        :meth:`within_compute`, those no plan beats on extra MACs too)."""
        plans = [replace(p, frontier=None) for p in plans]
        kept = pareto(plans, lambda p: p.peak_bytes, lambda p: p.time_s)
        if not kept:
            raise TilingError("the planner found no plan at all; please report this")
        # The untiled model stays a candidate even where a plan beats it on every count: a
        # tie with it in peak goes to it (:meth:`choose`).
        cands = _undominated(plans)
        cands += [p for p in plans if p.changes_nothing and p not in cands][:1]
        return cls(tuple(kept), tuple(cands))

    def __iter__(self) -> Iterator[Plan]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)

    def untiled(self) -> Plan | None:
        """The untiled model among this frontier's candidates (kept there even where a plan
        beats it on every count), or None where the frontier has none (a grid the user
        fixed)."""
        return next((p for p in self.candidates or self.plans if p.changes_nothing), None)

    def lowest_peak(self) -> Plan:
        """The plan with the lowest predicted peak (the last)."""
        return self._chosen(self.plans[-1])

    def knee(self) -> Plan:
        """The plan where a 1% longer run stops buying ``KNEE_SLOPE``% less memory."""
        def utility(p: Plan) -> float:
            return (math.log(p.baseline_peak_bytes / max(p.peak_bytes, 1))
                    - KNEE_SLOPE * math.log(p.time_s / p.baseline_time_s))

        return self._chosen(max(self.plans, key=utility))

    def within_compute(self, max_extra_compute: float | None) -> "Frontier":
        """The frontier of the plans whose extra MACs are at most ``max_extra_compute`` of the
        untiled model's (``None``: every plan). The untiled model always qualifies.

        >>> front = Frontier.of([Plan((), 100, 100, 0.0, 1.0, 1.0),
        ...                      Plan((RegionChoice(("a",), (2, 2)),), 30, 100, 0.2, 1.1, 1.0),
        ...                      Plan((RegionChoice(("a",), (4, 1), stream=8),), 40, 100, 0.01, 1.05, 1.0),
        ...                      Plan((RegionChoice(("a",), (8, 1), stream=4),), 35, 100, 0.01, 1.2, 1.0)])
        >>> [p.peak_bytes for p in front]   # the 4-row strips are slower than the 2x2 tiles
        [100, 40, 30]
        >>> [p.peak_bytes for p in front.within_compute(0.03)]   # but compute less
        [100, 40, 35]
        """
        if max_extra_compute is None:
            return self
        if not max_extra_compute >= 0:  # NaN too
            raise TilingError(f"max_extra_compute={max_extra_compute!r}: give a fraction of the "
                              "untiled model's MACs, 0 or more (0: no MAC computed twice)")
        return Frontier.of(p for p in self.candidates or self.plans
                           if (p.extra_compute or 0.0) <= max_extra_compute + 1e-12)

    def choose(self, memory_budget: int | None = None, max_overhead: float | None = None,
               max_extra_compute: float | None = None) -> Plan:
        """The plan the options ask for (the module docstring gives the rule)."""
        if max_extra_compute is not None:
            return self.within_compute(max_extra_compute).choose(memory_budget, max_overhead)
        pool = list(self.plans)
        if memory_budget is not None:
            pool = [p for p in pool if p.peak_bytes * (1 + BUDGET_MARGIN) <= memory_budget]
            if not pool:
                best = self.plans[-1]
                raise TilingError(
                    f"memory_budget={memory_budget} bytes ({memory_budget / 2**20:.1f} MiB) "
                    f"cannot be met: the lowest predicted peak reachable is {best.peak_bytes} "
                    f"bytes ({best.peak_bytes / 2**20:.1f} MiB, {best}; plans must be predicted "
                    f"{BUDGET_MARGIN:.0%} below the budget); raise the budget"
                )
        if memory_budget is not None and max_overhead is None:
            return self._chosen(min(pool, key=lambda p: (p.time_s, p.peak_bytes)))
        bound = DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead
        within = [p for p in pool if p.overhead <= bound + 1e-12]
        pool = within or [min(pool, key=lambda p: p.time_s)]
        lowest = min(p.peak_bytes for p in pool)
        ties = [p for p in pool if p.peak_bytes <= lowest * (1 + PEAK_TIE)]
        # A tie with the untiled model (where the frontier offers it) goes to the untiled
        # model, even where a tiled plan is predicted faster: a rewrite is for memory.
        untiled = self.untiled()
        if (untiled is not None and untiled.peak_bytes <= lowest * (1 + PEAK_TIE)
                and (memory_budget is None
                     or untiled.peak_bytes * (1 + BUDGET_MARGIN) <= memory_budget)):
            return self._chosen(untiled)
        return self._chosen(min(ties, key=lambda p: (p.time_s, p.peak_bytes)))

    def _chosen(self, p: Plan) -> Plan:
        """``p`` carrying this frontier (the frontier's own plans carry none: no cycles)."""
        return replace(p, frontier=self)
