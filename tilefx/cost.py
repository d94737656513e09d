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

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from torch.utils import _pytree as pytree

from .capture import Inputs, as_inputs
from .passes.receptive_field import facts
from .rules import SpatialRule

__all__ = ["Calibration", "NodeCost", "calibrate", "measure_node_costs", "mac_node_costs",
           "MEASURE_MAX_PIXELS"]

#: Largest input (spatial positions) :func:`measure_node_costs` times at; larger inputs are
#: timed at a reduced shape with the same aspect, so planning a 2048x2048 input stays quick.
MEASURE_MAX_PIXELS = 320 * 320


@dataclass(frozen=True)
class Calibration:
    """Machine constants of the time model.

    ``mac_rate``: MACs per second of a dense 3x3 convolution (the MAC-based costs only).
    ``call_s``: fixed cost of calling a window op (convolution, pooling) on a small window.
    ``pointwise_call_s``: fixed cost of any other node call (pointwise op, halo crop, tile
    write). ``reorder_s_per_byte``: oneDNN's per-call reorder of a convolution's weights, which
    every tile pays again (zero where convolutions do not reorder, e.g. on CUDA).
    """

    mac_rate: float
    call_s: float
    pointwise_call_s: float
    reorder_s_per_byte: float


@dataclass(frozen=True)
class NodeCost:
    """One call of a node: ``fixed_s + per_pixel_s * output positions`` seconds."""

    fixed_s: float
    per_pixel_s: float

    def time(self, pixels: float, calls: int = 1) -> float:
        return calls * self.fixed_s + self.per_pixel_s * pixels


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
    """Measure the time model's machine constants (well under a second, once per process).

    >>> cal = calibrate()
    >>> cal.mac_rate > 1e8 and 0 < cal.pointwise_call_s < 1e-2
    True
    """
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
    return Calibration(
        mac_rate=64 * 56 * 56 * 64 * 9 / dense,
        call_s=call,
        pointwise_call_s=pointwise / 2,  # the probe makes two calls (crop, relu)
        reorder_s_per_byte=max(reorder - call, 0.0) / w_bytes,
    )


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


class _Timer(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule, nsp: int):
        super().__init__(gm, garbage_collect_values=True)
        self.nsp = nsp
        self.seconds: dict[str, float] = {}
        self.pixels: dict[str, int] = {}
        self.cuda = False

    def run_node(self, n: Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = super().run_node(n)
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.seconds[n.name] = min(dt, self.seconds.get(n.name, math.inf))
        self.pixels[n.name] = _pixels(out, self.nsp)
        return out


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


def _time_nodes(gm: GraphModule, inputs: Inputs, repeats: int) -> _Timer:
    x = inputs.spatial
    timer = _Timer(gm, x.dim() - 2)
    timer.cuda = x.device.type == "cuda"
    with torch.no_grad():
        for _ in range(repeats):
            timer.run(*inputs.flat)
    return timer


def measure_node_costs(gm: GraphModule, example_inputs: Any, cal: Calibration, *,
                       weight_bytes: Mapping[str, int] = {}, max_pixels: int = MEASURE_MAX_PIXELS,
                       repeats: int = 3) -> dict[str, NodeCost]:
    """Time each node of ``gm`` on this machine and split it into fixed and per-pixel parts.

    ``gm`` must carry receptive-field facts (``annotate``). Every node is timed at two shapes,
    the example's (or, above ``max_pixels`` positions, a reduced one with the same aspect) and
    half of it per axis, and ``fixed + per_pixel * positions`` is fitted through both: the
    fixed part then also holds what small windows lose in kernel efficiency, which a tile
    grid pays per tile. Where the model cannot run at the half shape (a size fixed in the
    graph), one shape is timed and the fixed part is the call's dispatch and weight reorder.
    ``weight_bytes`` maps convolution nodes to their weights' bytes (``passes.memory.record``'s
    ``w_bytes``), which oneDNN reorders on every call. ``example_inputs`` as for
    ``tilefx.capture.capture``.
    """
    inputs = as_inputs(example_inputs)
    small = _reduced(inputs, max_pixels)
    try:
        big = _time_nodes(gm, small, repeats)
    except Exception:  # the capture holds only at the example's shape
        if small is inputs:
            raise
        big = _time_nodes(gm, inputs, repeats)
        small = inputs
    half_sizes = math.prod(max(L // 2, 1) for L in small.spatial.shape[2:])
    try:
        half = _time_nodes(gm, _reduced(small, half_sizes), repeats)
    except Exception:
        half = None
    costs = {}
    for n in gm.graph.nodes:
        if n.name not in big.seconds:
            continue
        t1, p1 = big.seconds[n.name], big.pixels[n.name]
        spatial = "tilefx" in n.meta and facts(n).spatial and p1 > 0
        if not spatial:
            costs[n.name] = NodeCost(t1, 0.0)
            continue
        floor = min(_fixed(n, cal, weight_bytes), t1)
        fixed, per_pixel = floor, (t1 - floor) / p1
        if half is not None and n.name in half.seconds and 0 < half.pixels[n.name] < p1:
            t2, p2 = half.seconds[n.name], half.pixels[n.name]
            slope = (t1 - t2) / (p1 - p2)
            if slope > 0:
                fitted = t1 - slope * p1
                # Noise can put the intercept below the call's own cost or above the time.
                fixed = min(max(fitted, floor), t1)
                per_pixel = (t1 - fixed) / p1
        costs[n.name] = NodeCost(fixed, per_pixel)
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
        sizes = facts(n).sizes if "tilefx" in n.meta and facts(n).spatial else None
        if sizes:
            costs[n.name] = NodeCost(fixed, t / max(math.prod(sizes), 1))
        else:
            costs[n.name] = NodeCost(fixed + t, 0.0)
    return costs
