"""The time model's facts: what one call of each node costs, as a fixed part plus a per-pixel part.

A tile runs every region node on a window instead of the whole map, so a node's time on a
tile is ``fixed_s + per_pixel_s * window pixels``: the fixed part (Python and ATen dispatch,
oneDNN's primitive lookup, and its per-call reorder of a convolution's weights) is paid once
per tile, the per-pixel part once per computed position, halo included. The planner adds
these up per candidate; nothing here knows about plans.

Two sources for the per-node costs:

* :func:`measure_node_costs` times every node of the untiled graph on this machine (one
  interpreted run, fastest of a few), at the example's shape or, for large inputs, at a
  reduced shape with the same aspect (per-pixel rates carry over). Kernels differ far more
  than their MACs say (a depthwise convolution runs ~10x fewer MACs per second than a dense
  one, pointwise ops cost bandwidth, not MACs), so measured times are the default.
* :func:`mac_node_costs` derives them from MACs and the :class:`Calibration` alone, without
  running a kernel: deterministic, for tests and for graphs that cannot run twice.

:func:`calibrate` measures the machine constants once per process.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from torch.utils import _pytree as pytree

from . import cache
from .capture import Inputs, as_inputs
from .passes.receptive_field import facts
from .rules import Barrier, SpatialRule

__all__ = ["Calibration", "NodeCost", "calibrate", "measure_node_costs", "mac_node_costs",
           "clear_measurements", "measurement_key", "last_level_cache_bytes", "weight_reread_s",
           "FULL_MAX_PIXELS", "TILE_SCALES", "FINE_TILE_SCALES"]

#: Largest whole map (spatial positions) :func:`measure_node_costs` times; larger inputs are
#: timed at a reduced shape with the same aspect and scaled, so planning a 4096x4096 input
#: stays quick.
FULL_MAX_PIXELS = 1024 * 1024
#: Tile-sized windows the time model measures each node on, as fractions of the map's extent
#: per axis: grids of 2 to 8 tiles per axis run on windows of about these sizes (the finer ones
#: for maps of at least :data:`FINE_SCALES_FROM` positions per axis). The smallest is an
#: 8-way split's: a line fitted through larger windows and extrapolated to it missed what a
#: small window loses (ResNet-50 @224's layer3 on a 7x7 grid, 4x4 windows: its convolutions
#: predicted at 29 ms over 49 tiles, measured 52 ms alone and 69 ms in the loop).
TILE_SCALES = (0.5, 0.25, 0.125)
FINE_TILE_SCALES = (0.25, 0.125, 0.0625)
FINE_SCALES_FROM = 512
#: The smallest side of a tile-sized measurement (a tile's window is a few positions plus its
#: halo on a 7x7 map).
MIN_TILE_SIDE = 2
#: A whole-map run slower than this is timed once (the tile-sized shapes are repeated).
SLOW_FULL_RUN_S = 2.0


@dataclass(frozen=True)
class Calibration:
    """Machine constants of the time model.

    ``mac_rate``: MACs per second of a dense 3x3 convolution (the MAC-based costs only).
    ``call_s``: fixed cost of calling a window op (convolution, pooling) on a small window.
    ``pointwise_call_s``: fixed cost of any other node call (pointwise op, halo crop, tile
    write). ``reorder_s_per_byte``: oneDNN's per-call reorder of a convolution's weights, which
    every tile pays again (zero where convolutions do not reorder, e.g. on CUDA), with the
    weights in cache. ``cold_weight_s_per_byte``: what a call pays more per byte of weights
    read from memory instead (a tile loop over layers whose weights together exceed
    ``cache_bytes`` calls each layer again after all the others have evicted it).
    """

    mac_rate: float
    call_s: float
    pointwise_call_s: float
    reorder_s_per_byte: float
    cold_weight_s_per_byte: float = 0.0
    cache_bytes: int = 32 << 20


@dataclass(frozen=True)
class NodeCost:
    """One call of a node as a function of the positions it computes.

    On a small window a call costs ``fixed_s + per_pixel_s * positions`` (the line through the
    two smallest windows measured, up to the second); between the larger windows measured
    (``knots``: every window's positions and seconds, ascending) it runs linearly from one to
    the next; beyond ``knee_px`` positions (the largest window) the time runs linearly to
    ``full_s``, the call measured on the whole map at ``full_px`` positions (where the map no
    longer fits in cache, a position costs more than on a tile). ``untiled()`` is the whole
    map's call. A cost with no measurement on the whole map is linear beyond its largest knot.

    >>> c = NodeCost(1e-5, 1e-8, full_s=2e-2, full_px=1e6, knee_px=1e5)
    >>> round(c.time(1e4), 9), round(c.untiled(), 9)
    (0.00011, 0.02)
    >>> k = NodeCost(1e-5, 1e-8, knee_px=400, knots=((100, 1.1e-5), (200, 1.2e-5), (400, 2.2e-5)))
    >>> round(k.time(150), 9), round(k.time(300), 9)
    (1.15e-05, 1.7e-05)
    """

    fixed_s: float
    per_pixel_s: float
    full_s: float | None = None
    full_px: float = 0.0
    knee_px: float = math.inf
    knots: tuple[tuple[float, float], ...] = ()

    def time(self, pixels: float) -> float:
        """One call on ``pixels`` positions."""
        ks = self.knots
        for (pa, ta), (pb, tb) in zip(ks[1:], ks[2:]):
            if pa < pixels <= pb:
                return ta + (tb - ta) * (pixels - pa) / (pb - pa)
        if pixels <= self.knee_px or self.full_s is None or self.full_px <= self.knee_px:
            if len(ks) > 2 and pixels > ks[1][0]:  # beyond the last knot, no whole map
                (pa, ta), (pb, tb) = ks[-2], ks[-1]
                return tb + (tb - ta) * (pixels - pb) / (pb - pa)
            return self.fixed_s + self.per_pixel_s * pixels
        at_knee = self.time(self.knee_px) if len(ks) > 2 else self.fixed_s + self.per_pixel_s * self.knee_px
        slope = (self.full_s - at_knee) / (self.full_px - self.knee_px)
        return at_knee + slope * (pixels - self.knee_px)

    def scaled(self, f: float) -> "NodeCost":
        """The same call doing ``f`` of the per-position work (its fixed part unchanged)."""
        def part(t: float) -> float:
            return self.fixed_s + f * (t - self.fixed_s)
        return NodeCost(self.fixed_s, f * self.per_pixel_s,
                        None if self.full_s is None else part(self.full_s),
                        self.full_px, self.knee_px, tuple((p, part(t)) for p, t in self.knots))

    def untiled(self, pixels: float | None = None) -> float:
        """The call on the whole map (``pixels``: its positions, for a cost measured without one)."""
        if self.full_s is not None:
            return self.full_s
        return self.time(pixels or 0.0)


def _fastest(fns, rounds: int = 15) -> list[float]:
    """Fastest time of each callable over interleaved rounds: other processes slow all alike,
    and the minimum is the least disturbed."""
    best = [math.inf] * len(fns)
    with torch.no_grad():
        for f in fns:
            f()
        for _ in range(rounds):
            for k, f in enumerate(fns):
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def calibrate() -> Calibration:
    """Measure the time model's machine constants (well under a second, once per process, and
    kept on disk per machine: ``tilefx.cache``).

    >>> cal = calibrate()
    >>> cal.mac_rate > 1e8 and 0 < cal.pointwise_call_s < 1e-2
    True
    """
    kept = cache.load("calibration", "calibrate")
    if isinstance(kept, dict):
        try:
            return Calibration(**kept)
        except TypeError:
            pass
    cal = _calibrate()
    cache.store("calibration", "calibrate", dataclasses.asdict(cal))
    return cal


def _calibrate() -> Calibration:
    torch.manual_seed(0)
    x = torch.randn(1, 64, 56, 56)
    w = torch.randn(64, 64, 3, 3)
    tiny, w_tiny = torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3)
    # A 1x1 map through a 3x3 convolution with 256 channels: the arithmetic is negligible,
    # what remains is the call and the reorder of its 2.25 MiB of weights.
    dot, w_big = torch.randn(1, 256, 1, 1), torch.randn(256, 256, 3, 3)
    dense, call, pointwise, reorder = _fastest([
        lambda: F.conv2d(x, w, padding=1),
        lambda: F.conv2d(tiny, w_tiny, padding=1),
        lambda: F.relu(tiny.narrow(2, 1, 6).contiguous()),
        lambda: F.conv2d(dot, w_big, padding=1),
    ])
    w_bytes = w_big.numel() * w_big.element_size()
    cache = last_level_cache_bytes()
    # The same call on weights no cache holds: one pass over more distinct weights than the
    # cache holds twice, each called once (measured on 2-core EPYC: 40 us hot, 140 us cold).
    cold = [torch.randn_like(w_big) for _ in range(min(64, 2 * cache // w_bytes + 1))]

    def cold_pass() -> None:
        for wc in cold:
            F.conv2d(dot, wc, padding=1)

    cold_call = _fastest([cold_pass], rounds=3)[0] / len(cold)
    del cold
    return Calibration(
        mac_rate=64 * 56 * 56 * 64 * 9 / dense,
        call_s=call,
        pointwise_call_s=pointwise / 2,  # the probe makes two calls (crop, relu)
        reorder_s_per_byte=max(reorder - call, 0.0) / w_bytes,
        cold_weight_s_per_byte=max(cold_call - reorder, 0.0) / w_bytes,
        cache_bytes=cache,
    )


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache's size (Linux sysfs), or ``default`` where it cannot be read."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=default)


def weight_reread_s(cal: Calibration, weight_bytes: float, loop_weight_bytes: float) -> float:
    """What one call of a layer with ``weight_bytes`` of weights pays, inside a tile or strip
    loop over layers holding ``loop_weight_bytes`` together, beyond its call with the weights in
    cache: nothing while the loop's weights fit in the cache, else reading its weights from
    memory (VGG-16 @224 on a 7x7 grid: 49 calls of each 9 MiB layer, 0.5 ms more each)."""
    if loop_weight_bytes <= cal.cache_bytes:
        return 0.0
    return weight_bytes * cal.cold_weight_s_per_byte


def _pixels(value: Any, nsp: int) -> int:
    if isinstance(value, torch.Tensor) and value.dim() >= nsp + 2:
        return math.prod(value.shape[value.dim() - nsp:])
    return 0


def _fixed(n: Node, cal: Calibration, weight_bytes: Mapping[str, int]) -> float:
    """The per-call part of a node: dispatch, plus a convolution's weight reorder."""
    rule = facts(n).rule if "tilefx" in n.meta else None
    if not isinstance(rule, SpatialRule):
        return cal.pointwise_call_s
    if rule.entry.cost == "conv":
        return cal.call_s + weight_bytes.get(n.name, 0) * cal.reorder_s_per_byte
    if rule.entry.window and rule.kind != "pad":
        return cal.call_s
    return cal.pointwise_call_s


def window_rule(n: Node) -> SpatialRule | None:
    """The rule by which ``n`` runs on a tile's window: its spatial rule, or a norm's
    pointwise application, which a multi-pass region calls on every tile once the norm's
    statistics are known. None: a node no tile calls (its cost is one call on the whole map).

    A norm timed on the whole map only was priced as a fixed cost per call: a 32-channel
    instance norm at 1024x1024 (52 ms) charged in full to each of a multi-pass region's tiles
    and passes, which put BasicUNet's multi-pass plans at 4-7x the untiled time where they
    measure 1.2-1.8x."""
    f = n.meta.get("tilefx")
    if f is None:
        return None
    if f.spatial:
        return f.rule
    if isinstance(f.rule, Barrier) and f.rule.apply is not None:
        return f.rule.apply
    return None


class _Timer(torch.fx.Interpreter):
    """Runs the graph once, timing every node on the whole map and, for the spatial ones, again
    on tile-sized windows of its spatial inputs (each cut to ``scales`` of its extent per axis),
    as a tile body would call it."""

    def __init__(self, gm: GraphModule, nsp: int, scales: tuple[float, ...] = TILE_SCALES):
        super().__init__(gm, garbage_collect_values=True)
        self.nsp = nsp
        self.scales = scales
        self.seconds: dict[str, float] = {}
        self.pixels: dict[str, int] = {}
        #: per node, per tile scale: (output positions, fastest seconds)
        self.windows: dict[str, dict[float, tuple[int, float]]] = {}
        self.cuda = False

    def _call(self, n: Node, args: tuple, kwargs: dict) -> tuple[Any, float]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = getattr(self, n.op)(n.target, args, kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    def run_node(self, n: Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        out, dt = self._call(n, args, kwargs)
        self.seconds[n.name] = min(dt, self.seconds.get(n.name, math.inf))
        px = self.pixels[n.name] = _pixels(out, self.nsp)
        rule = window_rule(n)
        if rule is not None and px > 0:
            self._time_windows(n, rule, args, kwargs, px)
        return out

    def _time_windows(self, n: Node, rule: SpatialRule, args: tuple, kwargs: dict, px: int) -> None:
        spatial = {name for name, _ in rule.inputs}
        for f in self.scales:
            def cut(node_arg: Any, value: Any) -> Any:
                if not (isinstance(node_arg, Node) and node_arg.name in spatial
                        and isinstance(value, torch.Tensor) and value.dim() >= self.nsp + 2):
                    return value
                for ax in range(value.dim() - self.nsp, value.dim()):
                    L = value.shape[ax]
                    value = value.narrow(ax, 0, max(int(L * f), min(L, MIN_TILE_SIDE)))
                return value.contiguous()

            try:
                a = tuple(cut(na, v) for na, v in zip(n.args, args))
                k = {key: cut(n.kwargs.get(key), v) for key, v in kwargs.items()}
                # The first call on a new shape pays oneDNN's primitive creation, which a tile
                # grid pays once for all its tiles: warm, then keep the faster of two.
                self._call(n, a, k)
                out, dt = self._call(n, a, k)
                dt = min(dt, self._call(n, a, k)[1])
            except Exception:  # an op whose other arguments fix the shape (a view, a size)
                return
            p = _pixels(out, self.nsp)
            if not 0 < p < px:
                return  # the output did not shrink with its input (an interpolation to a size)
            best = self.windows.setdefault(n.name, {}).get(f, (p, math.inf))[1]
            self.windows[n.name][f] = (p, min(dt, best))


def _reduced(inputs: Inputs, max_pixels: int) -> Inputs:
    """``inputs`` with every image-like input cut to at most ``max_pixels`` positions (the
    first one's count; all by the same factor per axis, keeping the aspect)."""
    x = inputs.spatial
    nsp = x.dim() - 2
    total = math.prod(x.shape[2:])
    if total <= max_pixels:
        return inputs
    f = (max_pixels / total) ** (1.0 / nsp)

    def cut(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() != nsp + 2:
            return t
        for ax, L in enumerate(t.shape[2:]):
            t = t.narrow(2 + ax, 0, max(int(L * f), 1))
        return t.contiguous()

    return Inputs(*pytree.tree_map(cut, (inputs.args, inputs.kwargs)))


def _time_nodes(gm: GraphModule, inputs: Inputs, repeats: int, slow_s: float) -> _Timer:
    """Time every node ``repeats`` times (the fastest is kept: the first run pays oneDNN's
    primitive creation, and load that comes and goes slows one run), twice only when one run
    takes over ``slow_s``."""
    x = inputs.spatial
    fine = min(x.shape[2:]) >= FINE_SCALES_FROM
    timer = _Timer(gm, x.dim() - 2, FINE_TILE_SCALES if fine else TILE_SCALES)
    timer.cuda = x.device.type == "cuda"
    with torch.no_grad():
        for r in range(max(repeats, 2)):
            t0 = time.perf_counter()
            timer.run(*inputs.flat)
            if r >= 1 and time.perf_counter() - t0 > slow_s:
                break
    return timer


def measure_node_costs(gm: GraphModule, example_inputs: Any, cal: Calibration, *,
                       weight_bytes: Mapping[str, int] = {}, full_max_pixels: int = FULL_MAX_PIXELS,
                       repeats: int = 3) -> dict[str, NodeCost]:
    """Time each node of ``gm`` on this machine, on the whole map and on tile-sized windows.

    ``gm`` must carry receptive-field facts (``annotate``). Every node is timed on the whole
    map (inputs above ``full_max_pixels`` positions at a reduced shape with the same aspect,
    scaled to the example's positions), and every spatial node again on windows of its inputs
    cut to :data:`TILE_SCALES` of their extent, as tile bodies call it. The windows give
    ``fixed + per_pixel * positions`` (the fixed part also holds what small windows lose in
    kernel efficiency, which every tile pays); the whole map gives the untiled call (on a large
    map a position costs more than on a tile, which stays in cache). A node that cannot run on
    a window (its other arguments fix its shape) is timed on the whole map only, and its fixed
    part is the call's dispatch and weight reorder. ``weight_bytes`` maps convolution nodes to
    their weights' bytes (``passes.memory.record``'s ``w_bytes``), which oneDNN reorders on
    every call. ``example_inputs`` as for ``tilefx.capture.capture``.
    """
    inputs = as_inputs(example_inputs)
    key = measurement_key(gm, inputs, cal, weight_bytes, full_max_pixels, repeats)
    if key in _MEASURED:
        _MEASURED.move_to_end(key)
        return dict(_MEASURED[key])
    costs = _costs_from_json(cache.load("node_costs", key))
    if costs is None:
        costs = _measure(gm, inputs, cal, weight_bytes, full_max_pixels, repeats)
        cache.store("node_costs", key, {k: dataclasses.asdict(c) for k, c in costs.items()})
    _MEASURED[key] = costs
    while len(_MEASURED) > _MEASURED_KEPT:
        _MEASURED.popitem(last=False)
    return dict(costs)


def _costs_from_json(value: Any) -> dict[str, NodeCost] | None:
    """Node costs as ``tilefx.cache`` stored them, or None where there are none (or they do
    not read as costs)."""
    if not isinstance(value, dict):
        return None
    try:
        return {k: NodeCost(**{**c, "knots": tuple(tuple(pt) for pt in c.get("knots", ()))})
                for k, c in value.items()}
    except (TypeError, ValueError):
        return None


#: Measured costs per graph, shape and machine constants, kept for the life of the process
#: (plain floats: no graph, tensor or weight is held), so the same model at the same shape
#: plans the same, run after run, and a second plan costs no second measurement; and on disk
#: (``tilefx.cache``), so that a second process on this machine plans the same too.
_MEASURED: "collections.OrderedDict[tuple, dict[str, NodeCost]]" = collections.OrderedDict()
_MEASURED_KEPT = 32


def clear_measurements() -> None:
    """Forget the per-process cache of measured node costs (the next plan measures afresh)."""
    _MEASURED.clear()


def measurement_key(gm: GraphModule, inputs: Inputs, *settings: Any) -> tuple:
    """What a measurement on this machine depends on: the graph's code, its parameters' and
    inputs' shapes and layouts, ``settings`` and the thread count (plain values: it holds no
    graph, tensor or weight)."""
    def sig(t: Any) -> Any:
        return (tuple(t.shape), t.dtype, t.device.type, t.is_contiguous()) if isinstance(t, torch.Tensor) else repr(t)

    params = tuple((k, sig(v)) for k, v in itertools.chain(gm.named_parameters(), gm.named_buffers()))
    return (gm.code, params, tuple(sig(t) for t in inputs.flat),
            repr(settings), torch.get_num_threads())


def _measure(gm: GraphModule, inputs: Inputs, cal: Calibration, weight_bytes: Mapping[str, int],
             full_max_pixels: int, repeats: int) -> dict[str, NodeCost]:
    run_at = _reduced(inputs, full_max_pixels)
    try:
        timer = _time_nodes(gm, run_at, repeats, SLOW_FULL_RUN_S)
    except Exception:  # the capture holds only at the example's shape
        if run_at is inputs:
            raise
        run_at = inputs
        timer = _time_nodes(gm, run_at, repeats, SLOW_FULL_RUN_S)
    scale = math.prod(inputs.spatial.shape[2:]) / max(math.prod(run_at.spatial.shape[2:]), 1)
    costs = {}
    for n in gm.graph.nodes:
        if n.name not in timer.seconds:
            continue
        t1, p1 = timer.seconds[n.name], timer.pixels[n.name]
        spatial = window_rule(n) is not None and p1 > 0
        if not spatial:
            costs[n.name] = NodeCost(t1, 0.0, full_s=t1)
            continue
        floor = min(_fixed(n, cal, weight_bytes), t1)
        points = sorted(dict(timer.windows.get(n.name, {}).values()).items())  # distinct sizes
        if not points:
            costs[n.name] = NodeCost(floor, (t1 - floor) / p1, full_s=t1 * scale, full_px=p1 * scale)
            continue
        if len(points) == 1:
            points.append((p1, t1))
        # Noise only slows a call: a window timed slower than a larger one is taken at the
        # larger one's time.
        knots, best = [], math.inf
        for p, t in reversed(points):
            best = min(best, t)
            knots.append((p, best))
        knots.reverse()
        (pa, ta), (pb, tb) = knots[0], knots[1]
        slope = max((tb - ta) / (pb - pa), 0.0) if pb > pa else 0.0
        # Noise can put the intercept below the call's own cost or above the time.
        fixed = min(max(ta - slope * pa, floor), ta)
        per_pixel = (tb - fixed) / pb
        pk, tk = knots[-1]
        # The whole map at the example's positions: a measurement at a reduced shape grows
        # linearly (at the rate between the largest window and the map).
        big_slope = max((t1 - tk) / (p1 - pk), 0.0) if p1 > pk else per_pixel
        full_s = t1 + big_slope * (p1 * scale - p1)
        costs[n.name] = NodeCost(fixed, per_pixel, full_s=full_s, full_px=p1 * scale,
                                 knee_px=pk if pk < p1 else math.inf,
                                 knots=tuple(knots) if len(knots) > 2 else ())
    return costs


def mac_node_costs(gm: GraphModule, macs: Mapping[str, int], cal: Calibration, *,
                   weight_bytes: Mapping[str, int] = {}) -> dict[str, NodeCost]:
    """Per-node costs from MACs alone (no kernel runs): ``macs / mac_rate`` spread per pixel.

    ``macs`` maps node names to their MACs at the traced shape, ``weight_bytes`` convolutions
    to their weights' bytes (both from ``passes.memory.record``).
    """
    costs = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        fixed = _fixed(n, cal, weight_bytes)
        t = macs.get(n.name, 0) / cal.mac_rate
        sizes = facts(n).sizes if window_rule(n) is not None else None
        if sizes:
            costs[n.name] = NodeCost(fixed, t / max(math.prod(sizes), 1))
        else:
            costs[n.name] = NodeCost(fixed + t, 0.0)
    return costs
