"""Streaming regions in the planner: the static prediction of a streaming region's peak and
time (the region strategy that proposes streaming options, ``planner.stream_strips``, asks
it for each candidate region and strip height).

:func:`stream_cost` scores a candidate region (a planner ``Segment``) streamed in strips of a
given height, without running it: the strip schedule is integer geometry
(``tilefx.streaming.strip_rows``), and every byte follows from it and the static model's
per-node facts.

* **Memory.** Storages are allocated at a stored node's first write and live to the end of the
  call: row buffers and FIFOs (``capacity`` rows at full width) and the full-size region
  outputs. A stage call holds the row-buffer reads it copies (the window with its halo and
  padding), its nodes' new rows until their reader has run (in-place ops and views allocate
  nothing), and its ops' scratch memory: ``passes.memory.conv_scratch`` for convolutions at
  the strip's shapes (oneDNN's reorders, or ATen's native im2col buffer for small windows;
  or the primitive the option chose, :func:`lean_primitives`),
  two outputs for max pooling, the full product of a transposed convolution before its rows
  are placed, the blends of a linear interpolation, a folded channels-last block's hidden
  activations (per position, as a tile's). The peak is the largest total over the
  strips' stage calls, in order, as ``passes.memory.simulate`` counts a streaming call.
* **Time.** Every row is computed once (except the rows a transposed convolution produces
  beyond its window), and each node's call on a strip costs what ``tilefx.cost.NodeCost``
  predicts for that many positions, as a tile's call does: its fixed cost once per strip, and
  a position at the in-cache rate where the strip is smaller than the whole map's measured
  knee (on a large map a position costs more; the untiled call is the measured one). Streaming
  also adds a call per stage, read and write, and the bytes the reads and writes copy, at the
  rate the model's own pointwise ops move bytes.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

from torch.fx import Node

from .errors import TilingError
from .passes.receptive_field import facts
from .plan_model import Segment, StaticModel
from .primitive_plan import (MIN_SAVING_BYTES, RELEVANT_SHARE, macs_time_ratio,
                             primitive_extra_s)
from .primitives import candidates_for, default_primitive, time_primitives, workspace_bytes
from .streaming import StreamSpec, check_streamable, stages_of, strip_rows
from .tiling import RegionNode, RegionSpec, source_interval

__all__ = ["StreamCost", "stream_spec", "stream_cost", "stream_costs", "lean_primitives",
           "strip_heights", "STRIP_COUNTS"]

#: Strip counts tried per candidate region (at the example's shape): the strip heights are
#: the region's tallest feature map's rows divided by these.
STRIP_COUNTS = (4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class StreamCost:
    """A streaming region at one strip height.

    ``peak_bytes``: the most the call holds beyond its full-size outputs (row buffers and one
    stage call); ``buffer_bytes``: its row buffers and FIFOs; ``extra_time_s`` and
    ``extra_macs``: what streaming adds to the untiled region; ``strips``: the strips at the
    example's shape (warm-up included), ``nominal_strips`` the tallest map's rows over the
    strip height.
    """

    peak_bytes: float
    buffer_bytes: float
    extra_time_s: float
    extra_macs: float
    strips: int
    nominal_strips: int
    #: ``(node, primitive)``: the region's convolutions on another primitive than ATen's default
    primitives: tuple[tuple[str, str], ...] = ()


def stream_spec(seg: Segment, strip: int, format_node: Callable[[Node], str] = Node.format_node
                ) -> StreamSpec:
    """The :class:`~tilefx.streaming.StreamSpec` of a planner segment streamed at ``strip``
    rows (a :class:`~tilefx.TilingError` naming the node it cannot stream; ``format_node``
    describes a node)."""
    nodes = tuple(RegionNode(n.name, facts(n).rule, format_node(n)) for n in seg.nodes)
    check_streamable(nodes)
    outputs = tuple(o.name for o in seg.outputs)
    nsp = len(facts(seg.nodes[0]).sizes)
    return StreamSpec(RegionSpec(nsp, tuple(sorted(seg.inputs)), nodes, outputs, (1,) * nsp),
                      stages_of(nodes, outputs), strip)


def _shape(n: Node) -> tuple[int, ...] | None:
    tm = n.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def _copy_s_per_byte(model: StaticModel) -> float:
    """Seconds per byte a pointwise op of this model takes (it reads and writes each byte once,
    as a copy does): the median over the model's spatial pointwise nodes."""
    rates = []
    for n in model.nodes:
        if "tilefx" not in n.meta or not facts(n).spatial or facts(n).rule.kind != "pointwise":
            continue
        b = model.bpp(n)
        c = model.cost(n)
        if b > 0 and c.per_pixel_s > 0:
            rates.append(c.per_pixel_s / b)
    return statistics.median(rates) if rates else 0.0


@dataclass(frozen=True)
class _Op:
    """What the static model needs of one region node, computed once per candidate region."""

    name: str
    stage: int
    reads: tuple[tuple[str, bool], ...]  # (source, read from another stage's storage)
    row_bytes: float                     # one row of its output, full width
    allocates: bool                      # not a view or an in-place op of an input
    kind: str                            # "conv", "maxpool", "transposed", "interp", "other"
    pointwise: bool                      # reads a view where it can (a pointwise op)
    linear: bool                         # a linear interpolation
    conv: tuple | None                   # (input prefix shape, OpParams unpadded, channels-last input)
    fixed_s: float
    per_pixel_s: float
    row_px: int                          # positions per row
    scratch_pp: float                    # scratch beyond the kind's model, per output position
    macs_per_input_row: float            # a transposed convolution's MACs per input row


def stream_cost(model: StaticModel, seg: Segment, strip: int) -> StreamCost | None:
    """``seg`` streamed in strips of ``strip`` rows (of its tallest feature map) at the
    example's shape, its convolutions on ATen's default primitives, or None when it cannot be
    streamed."""
    costs = stream_costs(model, seg, strip)
    return costs[0] if costs else None


def stream_costs(model: StaticModel, seg: Segment, strip: int) -> list[StreamCost]:
    """``seg`` streamed in strips of ``strip`` rows: on ATen's default primitives, then, where
    some convolution has one that holds much less scratch on its strip windows
    (:func:`lean_primitives`), with those; empty when it cannot be streamed."""
    try:
        spec = stream_spec(seg, strip, model.format_node)
    except TilingError:
        return []
    by_name = {n.name: n for n in seg.nodes}
    outside = {n.name: n for n in model.nodes if n.name in seg.inputs}
    everything = {**outside, **by_name}
    try:
        rows = strip_rows(spec, {k: facts(v).sizes for k, v in outside.items()})
    except TilingError:
        return []
    sizes = rows.sizes
    nsp = spec.nsp
    info = model.info
    bpp = {nm: model.bpp(v) for nm, v in everything.items()}
    full_rb = {nm: bpp[nm] * math.prod(sizes[nm][1:]) for nm in everything}
    key = {nm: info.get(nm, {}).get("key") for nm in everything}
    stage_of = {n: k for k, st in enumerate(spec.stages) for n in st}
    outputs = set(spec.outputs)
    whole = outputs | set(spec.region.inputs)
    storage = {n: (info.get(n, {}).get("nbytes", full_rb[n] * sizes[n][0]) if n in outputs
                   else rows.capacity[n] * full_rb[n]) for n in spec.stored}
    out_bytes = sum(storage[o] for o in outputs)
    # Reads: bytes per row of each (consumer, producer) window, and whether it is full width.
    read_rb: dict[tuple[str, str], float] = {}
    read_full: dict[tuple[str, str], bool] = {}
    read_width: dict[tuple[str, str], tuple[int, ...]] = {}
    for (c, p), widths in rows.rest.items():
        w = tuple(w1 - w0 for w0, w1 in widths)
        read_width[(c, p)] = w
        read_rb[(c, p)] = bpp[p] * math.prod(w)
        read_full[(c, p)] = w == tuple(sizes[p][1:])
    ops: dict[str, _Op] = {}
    reread = dict(zip(by_name, model.reread_s(list(by_name))))
    for n, node in by_name.items():
        rule = facts(node).rule
        kind = info.get(n, {}).get("kind") or (rule.kind if rule.kind in ("transposed", "interp")
                                              else "other")
        conv = None
        if kind == "conv":
            params, traced = model.conv_params(node)
            if params is not None and traced is not None:
                # A strip's read holds its padding: the op runs unpadded on it.
                conv = (tuple(traced[0][:len(traced[0]) - nsp]), params.tiled(), traced[1])
        srcs = tuple(dict.fromkeys(s for s, _ in rule.inputs))
        cost = model.cost(node)
        # A strip's call pays what a tile's does: the fitted fixed part (the call, its weight
        # reorder and a small window's lost kernel efficiency: 4-row strips of a 28-wide map
        # are small windows), and its weights read from memory where the region's layers
        # together hold more than the cache (StaticModel.reread_s).
        fixed = cost.fixed_s + reread[n]
        ops[n] = _Op(
            name=n, stage=stage_of[n],
            reads=tuple((src, stage_of.get(src) != stage_of[n]) for src in srcs),
            row_bytes=full_rb[n],
            allocates=key.get(n) is None or not any(key.get(x) is not None and key[n] == key[x]
                                                    for x in srcs),
            kind=kind, pointwise=rule.kind == "pointwise",
            linear=any(getattr(m, "mode", "") == "linear" for _, maps in rule.inputs for m in maps),
            conv=conv, fixed_s=fixed, per_pixel_s=cost.per_pixel_s,
            row_px=math.prod(sizes[n][1:]),
            scratch_pp=info.get(n, {}).get("transient_pp", 0.0),
            macs_per_input_row=(info.get(n, {}).get("macs", 0) / max(sizes[srcs[0]][0], 1)
                                if rule.kind == "transposed" else 0.0))
    maps0 = {n: facts(by_name[n]).rule.inputs[0][1][0] for n in by_name
             if ops[n].kind == "transposed"}
    pads = {n: facts(by_name[n]).rule.pad for n in by_name}
    # Per stage: the position of the last reader of each allocation (its storage lives until
    # then), through the views and in-place ops that share it (an in-place ReLU after a
    # batch norm keeps the norm's output alive until the ReLU's last reader).
    last_use: dict[str, int] = {}
    for st in spec.stages:
        pos = {n: i for i, n in enumerate(st)}
        owner: dict[str, str] = {}
        for i, n in enumerate(st):
            shared = None if ops[n].allocates else next(
                (x for x, _ in ops[n].reads if x in pos and key.get(x) == key.get(n)), None)
            owner[n] = owner[shared] if shared is not None else n
            for src, _ in ops[n].reads:
                if src in pos:
                    last_use[owner[src]] = max(last_use.get(owner[src], 0), i)
        last_use[owner[st[-1]]] = len(st)  # the write reads it last

    # Each convolution's calls: the window a strip reads of its input, call by call.
    windows: dict[str, list[tuple[int, ...]]] = {}
    for j, new in enumerate(rows.new):
        for n, op in ops.items():
            if op.conv is not None and n in new:
                lo, hi = rows.reads[j][(n, op.reads[0][0])]
                windows.setdefault(n, []).append(
                    op.conv[0] + (hi - lo,) + read_width[(n, op.reads[0][0])])
    copy_rate = _copy_s_per_byte(model)
    call_s = model.cal.pointwise_call_s
    order = {n.name: i for i, n in enumerate(seg.nodes)}

    def price(chosen: dict[str, tuple[str, float]]) -> StreamCost:
        """The region with ``chosen`` convolutions (node -> primitive, extra seconds over its
        calls) on another primitive than ATen's default."""
        most = held = 0.0
        pending: dict[str, float] = {}  # new rows kept for this strip's later readers
        written: set[str] = set()
        extra_time = extra_macs = 0.0
        for j, new in enumerate(rows.new):
            reads = rows.reads[j]
            # Which reads take a producer's new rows (from its value), and the last one of each.
            # (consumer, producer): stored rows and new rows it takes, and whether the new rows
            # are the producer's whole value of this strip (then read as it is, not copied)
            fresh: dict[tuple[str, str], tuple[int, int, bool]] = {}
            last: dict[str, tuple[int, int, str]] = {}
            for (c, src), (lo, hi) in reads.items():
                if stage_of.get(src) == stage_of[c]:
                    continue
                clo, chi = source_interval(lo, hi, sizes[src][0], pads[c])
                a_src = new[src][0] if src in new and src not in whole else chi
                cut = max(clo, min(chi, a_src))
                fresh[(c, src)] = (cut - clo, chi - cut,
                                   src in new and src not in whole and (clo, chi) == new[src])
                if chi > cut:
                    last[src] = max(last.get(src, (-1, -1, "")), (stage_of[c], order[c], c))
            released: dict[str, list[str]] = {}
            for src, (_, _, c) in last.items():
                released.setdefault(c, []).append(src)
            for k, st in enumerate(spec.stages):
                out = st[-1]
                if out not in new:
                    continue
                extra_time += call_s  # the stage body's call
                out_at: dict[str, float] = {}
                peak = 0.0
                # New rows of earlier stages whose last reader is here: alive until that read.
                later = sum(pending.get(src, 0.0) for n in st for src in released.get(n, ()))
                for i, n in enumerate(st):
                    op = ops[n]
                    a, b = new[n]
                    r = b - a
                    transient = 0.0
                    for src, other in op.reads:
                        if not other:
                            continue
                        lo, hi = reads[(n, src)]
                        old, newer, is_value = fresh[(n, src)]
                        padded = hi - lo != old + newer or not read_full[(n, src)]
                        # One piece with no padding is a view for a pointwise op, and for any op
                        # when it is a whole tensor: a stored map read whole, or the producer's
                        # rows of this strip read all at once. Anything else is copied into one
                        # window (stream_kernels.stream_read).
                        view = not padded and (old == 0 or newer == 0) and (
                            op.pointwise or (old == 0 and is_value)
                            or (src in whole and lo == 0 and hi == sizes[src][0]))
                        nb = (hi - lo) * read_rb[(n, src)]
                        extra_time += call_s + (0.0 if view else nb * copy_rate)
                        if not view:
                            transient += nb
                    own = r * op.row_bytes if op.allocates else 0.0
                    ws = 0.0
                    if op.kind == "conv" and op.conv is not None:
                        src = op.reads[0][0]
                        lo, hi = reads[(n, src)]
                        pre, params, channels_last = op.conv
                        ws = model.conv_scratch(params, pre + (hi - lo,) + read_width[(n, src)],
                                                channels_last, chosen.get(n, (None,))[0])
                    elif op.kind == "maxpool":
                        ws = 2 * own
                    elif op.kind == "transposed":
                        src = op.reads[0][0]
                        lo, hi = reads[(n, src)]
                        p0, p1 = maps0[n].produced(lo, hi)
                        ws = 2 * (p1 - p0) * op.row_bytes
                        extra_time += op.per_pixel_s * ((p1 - p0) - r) * op.row_px
                        extra_macs += op.macs_per_input_row * (hi - lo)
                    elif op.kind == "interp":
                        ws = (3 if op.linear else 1) * own
                    # a folded channels-last block's hidden MLP activations, per position
                    ws += op.scratch_pp * r * op.row_px
                    live = sum(v for m, v in out_at.items() if last_use.get(m, -1) >= i)
                    peak = max(peak, live + transient + later)  # its reads, copied
                    later -= sum(pending.get(src, 0.0) for src in released.get(n, ()))
                    peak = max(peak, live + transient + own + ws + later)  # the op
                    out_at[n] = own
                made = 0.0
                if out in rows.stored[j] and out not in written:
                    written.add(out)
                    made = storage[out]
                for n in st:
                    for src in released.get(n, ()):
                        pending.pop(src, None)
                most = max(most, held + sum(pending.values()) + peak + made)
                held += made
                if out in last:  # this strip's readers take its new rows from the value
                    pending[out] = (new[out][1] - new[out][0]) * ops[out].row_bytes
                s0, s1 = rows.stored[j].get(out, (0, 0))
                extra_time += call_s + (s1 - s0) * ops[out].row_bytes * copy_rate  # the write
        # Every node's call per strip it computes in, on the strip's positions, against its call on
        # the whole map: its fixed cost once per strip, and the cache a strip's rows fit in.
        for n, node in by_name.items():
            c = model.cost(node)
            more = ops[n].fixed_s - c.fixed_s  # its weights read from memory
            strip_cost = replace(c, fixed_s=ops[n].fixed_s,
                                 knots=tuple((p, t + more) for p, t in c.knots))
            calls = [(new[n][1] - new[n][0]) * ops[n].row_px for new in rows.new if n in new]
            extra_time += sum(strip_cost.time(px) for px in calls) - strip_cost.untiled(sum(calls))
        for n in by_name:
            if ops[n].kind == "transposed":
                extra_macs -= info.get(n, {}).get("macs", 0)
        extra_time += sum(dt for _, dt in chosen.values())
        buffers = sum(v for n, v in storage.items() if n not in outputs)
        return StreamCost(peak_bytes=max(most - out_bytes, 0.0), buffer_bytes=buffers,
                          extra_time_s=extra_time, extra_macs=max(extra_macs, 0.0),
                          strips=len(rows.new),
                          nominal_strips=-(-max(sizes[n][0] for n in by_name) // strip))

    costs = [price({})]
    lean = lean_primitives(model, {n: ops[n].conv for n in windows}, windows, by_name)
    if lean:
        costs.append(replace(price(lean), primitives=tuple(sorted(
            (n, name) for n, (name, _) in lean.items()))))
    return costs


def lean_primitives(model: StaticModel, convs: dict[str, tuple], windows: dict[str, list[tuple]],
                    nodes: dict[str, Node]) -> dict[str, tuple[str, float]]:
    """The convolutions of a streamed region worth running on another primitive: node ->
    (the primitive of least scratch at its most frequent strip window, the seconds it adds over
    all the node's calls; negative when faster).

    On CPU, oneDNN reorders a convolution's weights at every call, and a strip is a call: a
    512-channel 3x3 holds 9 MiB beside every strip's window, where ATen's native path holds the
    window's im2col columns. A node is chosen where its primitive saves at least
    :data:`~tilefx.primitive_plan.MIN_SAVING_BYTES` and a
    :data:`~tilefx.primitive_plan.RELEVANT_SHARE` of the untiled peak (below that it is never a
    plan's peak). Its time over the default's is measured side by side on that window
    (``primitives.time_primitives``, cached per shape) with ``timing="measured"``, or taken
    from :data:`~tilefx.primitive_plan.MACS_TIME_FACTOR` with ``timing="macs"``, and applied
    to the node's own time (:func:`~tilefx.primitive_plan.primitive_extra_s`).
    """
    floor = max(MIN_SAVING_BYTES, RELEVANT_SHARE * model.baseline_peak)
    chosen = {}
    for n, (_, params, channels_last) in convs.items():
        calls = windows[n]
        shape = Counter(calls).most_common(1)[0][0]
        default = default_primitive(params, shape)
        scratch = {c: workspace_bytes(c, params, shape, channels_last)
                   for c in candidates_for(params)}
        scratch = {c: b for c, b in scratch.items() if b is not None}
        if default not in scratch:
            continue
        best = min(scratch, key=lambda c: (scratch[c], c != default))
        if scratch[default] - scratch[best] < floor:
            continue
        if model.timing == "measured":
            t = time_primitives(params, shape, (default, best), channels_last)
            ratio = t[best] / t[default]
        else:
            ratio = macs_time_ratio(best, default)
        extra = primitive_extra_s(model.untiled_time(nodes[n]), ratio)
        if extra == extra:  # NaN: the primitive could not be timed here
            chosen[n] = (best, extra)
    return chosen


#: A region whose tallest feature map has fewer rows is not streamed: its strips would be a few
#: rows of small maps, where tiles do as well, and pricing them is most of planning's time.
MIN_STREAM_ROWS = 16


def strip_heights(seg: Segment) -> list[int]:
    """The strip heights tried for ``seg``: its tallest feature map's rows over
    :data:`STRIP_COUNTS` (at least one row, each height once, fewer than the whole map); none
    below :data:`MIN_STREAM_ROWS` rows."""
    tallest = max(facts(n).sizes[0] for n in seg.nodes)
    if tallest < MIN_STREAM_ROWS:
        return []
    return sorted({max(1, -(-tallest // s)) for s in STRIP_COUNTS if s <= tallest} - {tallest},
                  reverse=True)
