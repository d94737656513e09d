"""Per-layer primitive choice for the convolutions and linears a plan runs untiled.

Facts come from ``tilefx.primitives`` (which kernels compute a node exactly, their workspaces
and measured times); this module prices them as plan options. A tile's window is left to
ATen's own dispatch, which already runs small windows natively (``primitives.uses_onednn``).

The choice over one span of untiled steps is exact without a solver: the span's peak is the
largest of its steps' bytes and its time the sum of its nodes', so for every candidate peak
threshold ``P`` the fastest choice takes, at every node, its fastest primitive whose step
fits under ``P`` (the default where nothing fits better). Sweeping ``P`` over the steps'
distinct values gives the whole Pareto frontier of the span (:func:`span_options`); the
planner's dynamic program over boundaries joins it with the region options, whose peaks
combine by max and times by sum in the same way.

>>> alts = {1: [Alternative("conv", "native", step_bytes=40.0, extra_time_s=0.5)]}
>>> [(o.peak_bytes, o.extra_time_s, o.primitives) for o in span_options([30.0, 100.0], alts)]
[(100.0, 0.0, ()), (40.0, 0.5, (('conv', 'native'),))]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import primitives as prim
from .errors import TilingError
from .plans import pareto

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .plan_model import StaticModel

__all__ = ["Alternative", "SpanOption", "alternatives", "span_options", "MACS_TIME_FACTOR",
           "MIN_SAVING_BYTES", "RELEVANT_SHARE", "primitive_extra_s",
           "macs_time_ratio"]

#: With ``timing="macs"`` (no measurement), a primitive's time relative to ATen's default
#: primitive: a rough, deterministic stand-in (measured here, native runs a 512-channel 3x3 at
#: 7x7 about 1.15x oneDNN's time and a 1x1 as a matrix product about as fast).
MACS_TIME_FACTOR = {"onednn": 1.0, "native": 1.25, "matmul": 1.1, "cudnn": 1.0}

#: An alternative is offered only where it lowers its step by at least this much.
MIN_SAVING_BYTES = 64 * 1024

#: Steps below this share of the untiled peak are never the peak of a plan worth having
#: (a 40x reduction), so their alternatives are not timed.
RELEVANT_SHARE = 1 / 40


@dataclass(frozen=True)
class Alternative:
    """A primitive other than ATen's default for one untiled convolution or linear: the bytes
    alive during its step with it, and the time it adds to the default's (negative: faster)."""

    node: str
    primitive: str
    step_bytes: float
    extra_time_s: float


@dataclass(frozen=True)
class SpanOption:
    """One Pareto-optimal primitive choice for a span of untiled steps: its peak, the time it
    adds beside the default primitives, and the (node, primitive) pairs it changes."""

    peak_bytes: float
    extra_time_s: float
    primitives: tuple[tuple[str, str], ...]


def primitive_extra_s(node_s: float, ratio: float) -> float:
    """Seconds a primitive adds to a node whose calls take ``node_s`` on ATen's default
    primitive, where it runs ``ratio`` times the default's time (negative: it saves).

    The ratio is what a side-by-side measurement gives; the scale is the time model's own time
    for the node, so a primitive never makes a node cost less than nothing. The difference of
    two absolute timings did, on a loaded machine: oneDNN's multi-threaded calls measured 48 ms
    on a 3-row strip (0.3 ms idle), so a native strip "saved" 26 ms per call, and ResNet-50
    @224 got plans predicted at minus 1.6 s.

    >>> primitive_extra_s(0.010, 1.5), primitive_extra_s(0.010, 0.5)
    (0.005, -0.005)
    """
    if not 0.0 < ratio < math.inf:  # NaN too: a primitive that could not be timed
        return math.nan
    return node_s * (ratio - 1.0)


def macs_time_ratio(primitive: str, default: str) -> float:
    """``primitive``'s time over ``default``'s without a measurement (``timing="macs"``)."""
    return MACS_TIME_FACTOR.get(primitive, 1.0) / MACS_TIME_FACTOR.get(default, 1.0)


def alternatives(model: "StaticModel", timing: str) -> dict[int, list[Alternative]]:
    """Per step of ``model`` (index into ``model.steps``), the primitives other than ATen's
    default that lower its bytes by at least :data:`MIN_SAVING_BYTES`, with their time beside
    the default: the ratio measured side by side (``primitives.options``, cached per shape)
    with ``timing="measured"``, from :data:`MACS_TIME_FACTOR` with ``timing="macs"``, applied
    to the node's untiled time (:func:`primitive_extra_s`)."""
    out: dict[int, list[Alternative]] = {}
    floor = model.baseline_peak * RELEVANT_SHARE
    for i, st in enumerate(model.steps):
        node = model.by_name.get(st.name)
        if node is None or node.op != "call_function" or model.baseline_curve[i] < floor:
            continue
        if prim.op_params(node, model.gm) is None:
            continue
        try:
            opts = prim.options(node, root=model.gm, timed=False)
        except TilingError:
            continue  # no traced input shape: leave it to ATen
        default = next((o for o in opts if o.default), None)
        if default is None:
            continue
        cheaper = [o for o in opts if not o.default
                   and default.workspace_bytes - o.workspace_bytes >= MIN_SAVING_BYTES]
        if not cheaper:
            continue
        t = model.untiled_time(node)
        if timing == "measured":
            timed = {o.name: o for o in prim.options(node, root=model.gm, timed=True,
                                                     max_workspace_bytes=default.workspace_bytes)}
            base = timed[default.name].time_s
            extra = {o.name: primitive_extra_s(t, timed[o.name].time_s / base) for o in cheaper}
        else:
            extra = {o.name: primitive_extra_s(t, macs_time_ratio(o.name, default.name))
                     for o in cheaper}
        value = model.baseline_curve[i]
        out[i] = [Alternative(node.name, o.name, value - default.workspace_bytes + o.workspace_bytes,
                              extra[o.name]) for o in cheaper if extra[o.name] == extra[o.name]]
    return out


def span_options(values: list[float], alts: dict[int, list[Alternative]]) -> list[SpanOption]:
    """The Pareto-optimal primitive choices over a span whose steps hold ``values`` bytes with
    the default primitives; ``alts`` maps a step's index in ``values`` to its alternatives.
    Highest peak (the defaults) first; see the module docstring for why the sweep is exact."""
    if not values:
        return [SpanOption(0.0, 0.0, ())]
    thresholds = sorted({*values, *(a.step_bytes for v in alts.values() for a in v)}, reverse=True)
    options: list[SpanOption] = []
    for p in thresholds:
        peak, extra, chosen = 0.0, 0.0, []
        feasible = True
        for i, v in enumerate(values):
            fits = [a for a in alts.get(i, ()) if a.step_bytes <= p]
            best = min(fits, key=lambda a: a.extra_time_s, default=None)
            if v <= p and (best is None or best.extra_time_s >= 0):
                peak = max(peak, v)
                continue
            if best is None:
                feasible = False
                break  # nothing fits under p here: lower thresholds fit even less
            peak, extra = max(peak, best.step_bytes), extra + best.extra_time_s
            chosen.append((best.node, best.primitive))
        if not feasible:
            break  # lower thresholds fit even less
        options.append(SpanOption(peak, extra, tuple(chosen)))
    return pareto(options, lambda o: o.peak_bytes, lambda o: o.extra_time_s)
