"""Autotuning the time bound: measure the few frontier plans near it, beside the untiled graph.

The time model (``tilefx.cost``) prices every node from timings at the window sizes tiles run
at, but a tile body's small calls cost more together than apart (dispatch, the halo crops'
copies, caches shared with the rest of the loop): on 2 CPU cores it under-predicts
MobileNetV2 @224 on a 3x3 grid by half. A plan chosen for "at most +15%" must hold when it
runs, so the default choice measures instead of trusting the prediction near the bound:

* the candidates are the frontier's plans predicted within ``SLACK`` times the bound (the
  model can err either way), highest peak first, so that measured time falls along the list;
* the lowest-peak candidate is measured first (measured times do not always rise along the
  frontier: ResNet-50 @1024's lowest-peak plan ran at 0.58x while plans above it ran slower),
  then a bisection over the rest finds the lowest-peak plan whose measured latency ratio is
  within the bound, and what is left of :data:`MAX_TUNED` measures the plans just past its
  last failure (a plan that fails can sit between two that pass); each plan is applied and
  timed interleaved with the untiled graph (``tilefx.measure.latency``: medians of
  alternating runs, so load hits both), for about :data:`SEARCH_S` seconds (at least
  :data:`REPEATS` rounds);
* the untiled model (ratio 1, never measured) is the fallback when no candidate passes, also
  where it is off the frontier because the time model predicts a tiled plan faster;
* a plan that passes with less than ``1 - CONFIRM_WITHIN`` of the bound to spare is measured
  again and the slower of its two ratios counts: one lucky run under load must not choose a
  plan that then runs over the bound;
* the chosen plan is then **verified**: measured once more, on its own, with enough rounds to
  run about :data:`VERIFY_S` seconds (at least :data:`VERIFY_REPEATS`). The search keeps the
  plan whose measurement came out low among several, so that measurement is biased low (the
  winner's curse), and 3 rounds are few (DenseNet-121 @1024's lowest-peak plan, the one plan
  measured, tuned at 3.77x and ran 2.59x in its benchmark row); the verifying run is
  independent of the choice, and it is the time the plan carries. A plan whose verifying run
  is over the bound fails: the search goes on among the higher peaks with what is left of
  :data:`MAX_TUNED` and :data:`MORE_AFTER_FAILED` more plans, and its new choice is verified
  in turn; after :data:`MAX_VERIFIED` failed verifications the choice is the untiled model;
* the untiled graph's own time can move while the tuner runs: glibc serves an allocation from
  a free chunk of its heap when one fits and maps fresh pages only when none does, and a
  minute of tiled plans leaves the heap large and full of free chunks, so the untiled graph's
  large tensors stop taking page faults (DenseNet-121 @1024: 440k faults and 1050 ms a call
  in a fresh process, 220k and 750 ms after the search; ``malloc_trim`` drops the pages but
  not the chunks, and a trimmed heap served them again at 290k faults and 900 ms). Ratios
  measured before such a move read low against the baseline the process now has, and the one
  the user's process keeps after planning. So where the verifying run's untiled median is
  more than :data:`BASELINE_MOVED` away from the search's, the plan is verified again, until
  two verifying runs agree (at most :data:`MAX_SETTLE` more runs), and the last one counts;
  where it then fails, the search's ratios taken against a baseline that has moved since are
  re-expressed against the untiled time the process has now (``ratio * then / now``: a
  plan's own time holds still while the untiled graph's moves), so the next choice is not
  made from stale ratios (timm's vgg16 @512: each of the three plans verified ran within 5%
  of its search time, 1.27-1.44 s, while the untiled graph fell from 1.2-1.4 s to 0.98-1.07
  s between search and verification);
* the chosen plan carries its measured time (``time_s`` = verified ratio x the predicted
  untiled time, ``tuned=True``), and the choice is kept with the node timings'
  key, per process and on disk (``tilefx.cache``), so planning the same model at the same
  shape again, in this process or the next, chooses the same plan.

Running the candidates needs the untiled graph to run once per candidate: where it does not
fit, plan with ``memory_budget`` (never tuned) or ``tune=False``.

>>> from tilefx.plans import Frontier, Plan
>>> front = Frontier.of([Plan((), 100, 100, 0.0, 1.0, 1.0), Plan(("a",), 50, 100, 0.0, 1.05, 1.0),
...                      Plan(("b",), 20, 100, 0.0, 1.1, 1.0)])
>>> ratio = {(): 1.0, ("a",): 1.1, ("b",): 1.4}   # what "measuring" finds
>>> p = choose_measured(front, lambda p, repeats: ratio[p.regions], 0.15)
>>> p.regions, p.tuned, round(p.overhead, 2)
(('a',), True, 0.1)
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from dataclasses import replace
from typing import Any, Callable

from . import cache
from .measure import latency
from .plans import PEAK_TIE, Frontier, Plan

__all__ = ["choose_measured", "measure_ratio", "clear_tuned", "rounds_for", "search_repeats",
           "verify_repeats", "Ratio", "MAX_TUNED", "SLACK", "REPEATS", "SEARCH_S", "CONFIRM_WITHIN",
           "VERIFY_REPEATS", "VERIFY_S", "MAX_VERIFIED", "BASELINE_MOVED", "MAX_SETTLE",
           "MORE_AFTER_FAILED"]

#: Plans measured at most per choice (a bisection over up to 2**7 candidates, then
#: the plans past its last failure).
MAX_TUNED = 8
#: Candidates: plans predicted within this factor of the bound's time.
SLACK = 1.25
#: Timed rounds of each candidate and of the untiled graph while searching, after one warm-up
#: round: at least REPEATS, and as many more as fit in about SEARCH_S seconds (predicted), up
#: to SEARCH_MAX_REPEATS. A 3-round ratio of a 25 ms plan ranged 0.97x to 1.23x where its
#: 25-round ratio ran 1.09x to 1.19x (MobileNetV2 @224): short plans need more rounds.
REPEATS = 3
SEARCH_S = 0.5
SEARCH_MAX_REPEATS = 15
#: A pass measured above this share of the bound's ratio is measured once more (the slower
#: measurement counts).
CONFIRM_WITHIN = 0.8
#: The verifying run of the chosen plan: at least this many rounds ...
VERIFY_REPEATS = 5
#: ... and as many more as fit in about this many seconds (predicted), up to VERIFY_MAX_REPEATS.
#: 3 s gave a 450 ms model 5 rounds, and its verified 1.40x ran 0.90x in its benchmark row
#: (EfficientNet-B0 @1024): at 1024 an untiled call spends about 45% of its CPU time in page
#: faults (ResNet-50: 645k minor faults, 1.1 s of kernel time per call), whose cost comes and
#: goes with the machine's state, so rounds must span seconds.
VERIFY_S = 6.0
VERIFY_MAX_REPEATS = 25
#: Chosen plans verified at most per choice before the untiled model is taken.
MAX_VERIFIED = 3

#: The untiled graph's median moved when a verifying run's differs from the search's (or from
#: the previous verifying run's) by more than this fraction either way. Medians of the same
#: graph in one state agree within a few percent at 1024 (IQRs 1-5%); DenseNet-121 @1024's
#: moved 35% when the heap grew under it.
BASELINE_MOVED = 0.15
#: Verifying runs at most after the first, while the untiled median keeps moving.
MAX_SETTLE = 2
#: Plans the search may measure beyond MAX_TUNED after each failed verification: the failure
#: says the plans near the bound run slower than the search saw (usually because the untiled
#: graph sped up under it), so the plans with more room, at higher peaks, deserve a look
#: before the untiled model is taken (timm's vgg16 @512 fell back to the untiled model while
#: higher-peak plans, 4x to 20x lower, ran at 0.78x-0.88x in a fresh process).
MORE_AFTER_FAILED = 2

#: Every measurement the tuner takes, at DEBUG (``logging.getLogger("tilefx.autotune")``).
log = logging.getLogger(__name__)

_TUNED: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_TUNED_KEPT = 32


def clear_tuned() -> None:
    """Forget the per-process cache of tuned choices (the next plan measures afresh)."""
    _TUNED.clear()


def search_repeats(p: Plan) -> int:
    """Rounds of a search measurement of ``p``: about :data:`SEARCH_S` seconds of ``p`` and the
    untiled graph together, by the predicted times, within [REPEATS, SEARCH_MAX_REPEATS]."""
    return rounds_for(p, SEARCH_S, REPEATS, SEARCH_MAX_REPEATS)


def verify_repeats(p: Plan) -> int:
    """Rounds of the verifying run of ``p``: about :data:`VERIFY_S` seconds of ``p`` and the
    untiled graph together, by the predicted times, within [VERIFY_REPEATS, VERIFY_MAX_REPEATS]."""
    return rounds_for(p, VERIFY_S, VERIFY_REPEATS, VERIFY_MAX_REPEATS)


def rounds_for(p: Plan, seconds: float, least: int, most: int) -> int:
    """Timed rounds of ``p`` beside the untiled graph that last about ``seconds``, by their
    predicted (or tuned) times, within [least, most]; a plan never priced takes the untiled
    time, a plan without a baseline ``least``."""
    if not p.baseline_time_s:
        return least
    pair = p.baseline_time_s + (p.time_s if p.time_s is not None else p.baseline_time_s)
    return max(least, min(most, math.ceil(seconds / pair)))


class Ratio(float):
    """A measured latency ratio (a float) that keeps the untiled median it was taken against,
    ``untiled_s`` (None where unknown): the tuner compares those medians to notice that the
    baseline moved (the module docstring)."""

    untiled_s: float | None

    def __new__(cls, value: float, untiled_s: float | None = None) -> "Ratio":
        obj = super().__new__(cls, value)
        obj.untiled_s = untiled_s
        return obj


def measure_ratio(baseline: Callable, candidate: Callable, args: tuple,
                  repeats: int = REPEATS) -> Ratio:
    """The candidate's median latency over the baseline's, timed interleaved in one process."""
    stats = latency({"base": baseline, "plan": candidate}, *args, repeats=repeats, warmup=1)
    # Which side moved, when a ratio swings between runs: at 1024 it is mostly the untiled
    # graph, whose page faults come and go (design.md, "the time model").
    log.debug("timed untiled %s, plan %s", stats["base"], stats["plan"])
    return Ratio(stats["plan"].median_s / stats["base"].median_s, stats["base"].median_s)


def _untiled_of(r: float) -> float | None:
    """The untiled median a measured ratio was taken against (a :class:`Ratio`), else None."""
    return getattr(r, "untiled_s", None)


def _moved(now: float | None, was: float | None) -> bool:
    """Whether the untiled median ``now`` lies more than BASELINE_MOVED from ``was``."""
    if not now or not was:
        return False
    return abs(math.log(now / was)) > math.log1p(BASELINE_MOVED)


def _rebase(measured: dict[int, float], now: float | None) -> None:
    """Re-express the search's ratios taken against an untiled median more than
    BASELINE_MOVED from ``now`` (the latest verifying run's) against ``now``: a plan's own time
    holds still while the untiled graph's moves with the heap's state (the module docstring),
    so ``ratio * then / now`` is what the plan would measure against the baseline the process
    has now. Ratios without their untiled median are left as they are."""
    for i, r in list(measured.items()):
        then = _untiled_of(r)
        if now and then and _moved(now, then):
            measured[i] = Ratio(r * then / now, now)


def choose_measured(front: Frontier, ratio_of: Callable[[Plan, int], float], max_overhead: float,
                    key: Any = None, allow_untiled: bool = True) -> Plan:
    """The lowest-peak plan of ``front`` whose measured latency ratio is within
    ``1 + max_overhead`` (the module docstring gives the search). ``ratio_of(plan, repeats)``
    measures one plan's latency over the untiled graph's, in ``repeats`` timed rounds; ``key``
    (hashable) caches the choice.

    ``allow_untiled=False`` (the user fixed a tile grid: the frontier holds tiled plans only)
    keeps the untiled model out: when no plan passes, the choice is the measured plan that ran
    fastest, or the frontier's fastest predicted plan where none was measured."""
    plans = list(front)  # highest peak first
    # The untiled model is the fallback that always runs within the bound (ratio 1). It is
    # off the frontier where the time model predicts a tiled plan faster (EfficientNet-B0
    # @1024: 0.53x): then it is the frontier's kept candidate, or where the frontier has
    # none it is rebuilt from the frontier's baseline, never assumed to be the first plan.
    untiled = front.untiled() or _untiled(plans[0])
    cache_key = None if key is None else (key, round(max_overhead, 6), allow_untiled)
    if cache_key is not None:
        # This process's choice, else one another process on this machine made and kept on
        # disk (``tilefx.cache``; its rewrite by ``repr``, with the node timings it was
        # planned from, the frontier is this one).
        kept = _TUNED.get(cache_key)
        if kept is None:
            stored = cache.load("tuned", cache_key)
            if isinstance(stored, list) and len(stored) == 2:
                kept = tuple(stored)
        if kept is not None:
            ident, ratio = kept
            for p in [*plans, untiled]:
                if repr(p.rewrite) == ident:
                    _TUNED[cache_key] = kept
                    return _tuned(front, p, ratio)
    limit = 1 + max_overhead
    # A plan within PEAK_TIE of the untiled peak is no candidate: a tie with the untiled model
    # goes to it, however the times would come out. A rewrite is for memory, and one that does
    # not lower the peak is not worth its loops (Swin-S @384 was given twelve regions at the
    # untiled peak, measured 2% faster).
    cands = [p for p in plans if not p.changes_nothing
             and p.time_s <= p.baseline_time_s * limit * SLACK
             and not (allow_untiled and untiled.peak_bytes <= p.peak_bytes * (1 + PEAK_TIE))]
    measured: dict[int, float] = {}
    # The untiled medians measured since the last verifying run (that run's own first): what
    # the next verifying run's baseline is compared with.
    untiled_seen: list[float] = []

    def timed(p: Plan, repeats: int, why: str) -> float:
        r = ratio_of(p, repeats)
        log.debug("%s %s: %.3fx over untiled (%d rounds; predicted %.3fx, bound %.3fx)",
                  why, " then ".join(map(str, p.regions)), r, repeats,
                  p.time_s / p.baseline_time_s, limit)
        return r

    def searched(p: Plan, why: str) -> float:
        r = timed(p, search_repeats(p), why)
        if _untiled_of(r):
            untiled_seen.append(_untiled_of(r))
        return r

    def measure(p: Plan) -> float:
        r = searched(p, "searched")
        if CONFIRM_WITHIN * limit < r <= limit:
            r = max(r, searched(p, "confirmed"))
        return r

    # Plans the search may measure: MAX_TUNED, and MORE_AFTER_FAILED more per failed
    # verification.
    allowed = [MAX_TUNED]

    def search(lo: int, hi: int) -> int:
        """Measure until the allowance is spent; ``cands[lo]`` passes (-1: the untiled model),
        ``cands[hi]`` fails. Returns the lowest-peak pass found."""
        while hi - lo > 1 and len(measured) < allowed[0]:
            # The lowest peak first (measured times need not rise along the frontier), then
            # halves.
            mid = hi - 1 if not measured else (lo + hi) // 2
            measured[mid] = measure(cands[mid])
            if measured[mid] <= limit:
                lo = mid
            else:
                hi = mid
        # Measured times need not rise along the frontier (EfficientNet-B0 @1024: three
        # neighbours of falling peak ran 1.05x, 0.95x, 0.80x): what is left of the budget steps
        # past the last failure, to the lower-peak plans predicted fastest, the next ones along
        # the frontier.
        while len(measured) < allowed[0]:
            i = next((i for i in range(lo + 1, len(cands)) if i not in measured), None)
            if i is None:
                break
            measured[i] = measure(cands[i])
            if measured[i] <= limit:
                lo = i
        return lo

    lo = search(-1, len(cands))
    chosen, ratio = _choose(cands, measured, lo, limit, untiled, plans[0], allow_untiled)
    # The verifying run: the choice above favours plans whose measurement came out low, so
    # the time a plan carries is measured again, independently; a plan over the bound then
    # is dropped for the next passing one.
    for attempt in range(MAX_VERIFIED + 1):
        if chosen.changes_nothing or ratio is None:
            break
        if attempt == MAX_VERIFIED:
            # Every plan verified ran over the bound: the untiled model, or (a grid the user
            # fixed) the fastest as measured.
            chosen, ratio = _choose(cands, measured, -1, limit, untiled, plans[0], allow_untiled)
            break
        ratio = timed(chosen, verify_repeats(chosen), "verified")
        ratio = _settle(chosen, ratio, untiled_seen, timed)
        if _untiled_of(ratio):
            untiled_seen[:] = [_untiled_of(ratio)]
        if ratio <= limit or lo < 0:  # within the bound, or nothing passed (a fixed grid)
            break
        i = next(i for i, p in enumerate(cands) if p is chosen)
        # The search's ratios taken against an untiled graph that has moved since are
        # re-expressed against its time now, before they choose again.
        _rebase(measured, _untiled_of(ratio))
        measured[i] = max(measured[i], ratio)  # it fails now: search on below it
        allowed[0] += MORE_AFTER_FAILED
        lo = search(max((j for j, r in measured.items() if r <= limit), default=-1), i)
        chosen, ratio = _choose(cands, measured, lo, limit, untiled, plans[0], allow_untiled)
    if cache_key is not None:
        _TUNED[cache_key] = (repr(chosen.rewrite), ratio)
        cache.store("tuned", cache_key, [repr(chosen.rewrite), ratio])
        while len(_TUNED) > _TUNED_KEPT:
            _TUNED.popitem(last=False)
    return _tuned(front, chosen, ratio)


def _settle(p: Plan, ratio: float, untiled_seen: list[float],
            timed: Callable[[Plan, int, str], float]) -> float:
    """``p``'s verified ratio once the untiled graph's median has stopped moving: while the
    last verifying run's untiled median lies BASELINE_MOVED away from the one before (first
    the median of ``untiled_seen``), ``p`` is verified again, at most MAX_SETTLE more times;
    the last run counts."""
    was = statistics.median(untiled_seen) if untiled_seen else None
    for _ in range(MAX_SETTLE):
        now = _untiled_of(ratio)
        if not _moved(now, was):
            break
        log.debug("the untiled graph ran %.1f ms verifying, %.1f ms before: verifying again",
                  now * 1e3, was * 1e3)
        was = now
        ratio = timed(p, verify_repeats(p), "verified again")
    return ratio


def _choose(cands: list[Plan], measured: dict[int, float], lo: int, limit: float,
            untiled: Plan, first: Plan, allow_untiled: bool) -> tuple[Plan, float | None]:
    """The choice from the measurements so far: ``cands[lo]`` is the lowest-peak plan measured
    within ``limit`` (-1: none). The ratio is None where the chosen plan was never measured."""
    if lo < 0 and allow_untiled:
        return untiled, 1.0
    if lo < 0:
        # Nothing passes and the grid is the user's: the fastest as measured, else predicted.
        return (min(((cands[i], r) for i, r in measured.items()), key=lambda pr: pr[1])
                if measured else (first, None))
    # Among the measured plans that pass, peaks within PEAK_TIE count as equal: the faster.
    # The untiled model never ties with them: plans within PEAK_TIE of its peak are no
    # candidates (``choose_measured``), so a tie with it goes to it however the times came out.
    lowest = cands[lo].peak_bytes
    passing = [(cands[i], r) for i, r in measured.items() if r <= limit]
    return min(((p, r) for p, r in passing if p.peak_bytes <= lowest * (1 + PEAK_TIE)),
               key=lambda pr: (pr[1], pr[0].peak_bytes))


def _untiled(p: Plan) -> Plan:
    """The untiled model, priced as ``p``'s baseline."""
    return Plan((), p.baseline_peak_bytes, p.baseline_peak_bytes, 0.0, p.baseline_time_s,
                p.baseline_time_s)


def _tuned(front: Frontier, p: Plan, ratio: float | None) -> Plan:
    if p.changes_nothing or ratio is None:
        # the untiled model (its time is the baseline's), or a plan never measured
        return replace(p, frontier=front)
    return replace(p, time_s=ratio * p.baseline_time_s, tuned=True, frontier=front)
