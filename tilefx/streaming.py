"""Strip schedules of a streaming region: which rows every node computes in every strip, and
how many rows each row buffer holds. Pure integer geometry for one input shape.

A **streaming region** runs its nodes in strips along the stream axis (the first spatial axis),
at full extent along the others. In every strip each node computes the rows its consumers need
next and no others, so every output row of every node is computed exactly once; a node whose
rows are read by later strips keeps them in a **row buffer**. Producers run ahead of their
consumers by the receptive-field delay between them, so an edge whose consumer is far
downstream (a U-Net skip: the encoder's rows wait until the decoder reaches them) holds a FIFO
of rows. Its size follows from the two row schedules, as a buffer in cyclo-static dataflow
(CSDF) is sized from its actors' firing sequences: the rows the producer has computed less the
first row a consumer will still read, at its largest over the strips.

**The schedule.** Strip ``j`` asks every region output for the rows ``[0, e(j))`` (``e`` grows
by the strip height, in rows of the tallest output). Backward window propagation
(:func:`tilefx.tiling.propagate_axis`, the same function the tile grid uses) turns that into
``done_n(j)``: the rows each node must have computed by the end of strip ``j``. Node ``n``
computes rows ``[done_n(j-1), done_n(j))`` in strip ``j``, reading through its op's window map
the rows ``[lo, hi)`` of each input. A row of a producer is dropped once no later read starts
at or below it. The first strip would compute every producer's whole lead at once (a U-Net's
encoder is ~100 rows ahead at full resolution), so the schedule opens with warm-up strips in
which every node advances by the same fraction of that lead.

**Stages.** A node whose only reader reads it position by position (a convolution's batch
norm, its activation, a residual add, a 1x1 convolution) computes the same rows as its reader
in every strip. Such chains form one **stage**: one body call per strip, no row buffer inside.
Only a stage's last node is stored (a row buffer, or the full-size output buffer of a region
output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import TilingError
from .kernels import CropTable
from .stream_kernels import RowRead, RowWrite
from .tiling import RegionNode, RegionSpec, crop_table, extents, propagate_axis, source_interval
from .windows import IDENTITY

__all__ = ["StreamSpec", "Strip", "RowSchedule", "StreamSchedule", "stages_of",
           "check_streamable", "strip_rows", "strip_schedule", "WARMUP_RATIO"]

Interval = tuple[int, int]

#: In warm-up strips every node advances by this many times its steady rows per strip (the
#: rows it computes per strip once the outputs advance), so no strip computes a node's whole
#: lead over the outputs at once.
WARMUP_RATIO = 1.5


@dataclass(frozen=True)
class StreamSpec:
    """The static facts of a streaming region: its nodes, inputs and outputs (``region``, a
    :class:`~tilefx.tiling.RegionSpec` whose grid is unused), its stages (node names in
    topological order; the last one of each is stored), and the strip height ``strip`` in
    rows of its tallest output."""

    region: RegionSpec
    stages: tuple[tuple[str, ...], ...]
    strip: int

    @property
    def nsp(self) -> int:
        return self.region.nsp

    @property
    def nodes(self) -> tuple[RegionNode, ...]:
        return self.region.nodes

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.region.outputs

    @property
    def stored(self) -> tuple[str, ...]:
        """The nodes whose rows are stored: every stage's last node."""
        return tuple(s[-1] for s in self.stages)


@dataclass
class Strip:
    """One strip: the stages that run (indices into ``StreamSpec.stages``), the new rows of
    every node that computes, the row-buffer reads and writes, and per-node op data
    (``extra``, a rule table entry's ``tile_data``, as a tile's)."""

    index: int
    stages: tuple[int, ...]
    rows: dict[str, Interval] = field(default_factory=dict)
    reads: dict[tuple[str, str], RowRead] = field(default_factory=dict)
    writes: dict[str, RowWrite] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RowSchedule:
    """The integer part of a schedule: which rows every node computes and reads, per strip.

    ``new[j]``: the rows each node computing in strip ``j`` computes; ``reads[j]``: what each
    such node reads of each input along the stream axis (global rows, possibly off the map);
    ``rest``: what each read covers along the other spatial axes (the same in every strip);
    ``done[n]``: rows of ``n`` computed by the end of each strip; ``keep[n]``: per strip, the
    first row of ``n`` a read of this or a later strip still needs (a row buffer holds
    ``[keep, done)`` after its write); ``capacity[n]``: a stored node's ring size in rows (the
    full extent for a region output); ``carried[n]``: the most rows a stored node keeps from one
    strip to the next (``k - s`` rows, times dilation, for a window op's input; a U-Net skip's
    FIFO holds the decoder's delay); ``warmup``: strips before the first output rows' strip.
    """

    sizes: dict[str, tuple[int, ...]]
    new: tuple[dict[str, Interval], ...]
    reads: tuple[dict[tuple[str, str], Interval], ...]
    rest: dict[tuple[str, str], tuple[Interval, ...]]
    done: dict[str, tuple[int, ...]]
    keep: dict[str, tuple[int, ...]]
    capacity: dict[str, int]
    carried: dict[str, int]
    warmup: int

    def computed(self) -> dict[str, int]:
        """Rows each node computes over all strips (its extent: every row once)."""
        out: dict[str, int] = {}
        for new in self.new:
            for n, (a, b) in new.items():
                out[n] = out.get(n, 0) + b - a
        return out


@dataclass
class StreamSchedule:
    """A streaming region's schedule for one input shape: its rows (:class:`RowSchedule`) and
    the records each strip's bodies read."""

    rows: RowSchedule
    strips: list[Strip]

    @property
    def sizes(self) -> dict[str, tuple[int, ...]]:
        return self.rows.sizes

    @property
    def capacity(self) -> dict[str, int]:
        return self.rows.capacity

    @property
    def carried(self) -> dict[str, int]:
        return self.rows.carried

    @property
    def warmup(self) -> int:
        return self.rows.warmup

    def computed(self) -> dict[str, int]:
        return self.rows.computed()


# --------------------------------------------------------------------------- structure


def _identity_reader(rn: RegionNode, src: str) -> bool:
    """``rn`` reads ``src`` position by position on every axis (a pointwise op, a 1x1
    convolution, a pad of zero rows): no halo, and never off the map."""
    maps = [m for s, m in rn.rule.inputs if s == src]
    return len(maps) == 1 and all(m == IDENTITY for m in maps[0])


def stages_of(nodes: tuple[RegionNode, ...], outputs: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Group a region's nodes into stages: a node joins its reader's stage when that reader is
    its only one in the region, reads it position by position, and it is no region output.

    >>> from tilefx.rules import SpatialRule
    >>> from tilefx.windows import Affine
    >>> def node(name, src, m):
    ...     return RegionNode(name, SpatialRule("op", "conv" if m != IDENTITY else "pointwise",
    ...                                         ((src, (m, m)),)))
    >>> conv, bn, relu = node("conv", "x", Affine(3, 1, 1, 1)), node("bn", "conv", IDENTITY), \\
    ...     node("relu", "bn", IDENTITY)
    >>> stages_of((conv, bn, relu, node("conv2", "relu", Affine(3, 1, 1, 1))), ("conv2",))
    (('conv', 'bn', 'relu'), ('conv2',))
    """
    readers: dict[str, list[RegionNode]] = {}
    for rn in nodes:
        for src in dict.fromkeys(rn.sources):
            readers.setdefault(src, []).append(rn)
    owner: dict[str, str] = {}
    for rn in reversed(nodes):
        rs = readers.get(rn.name, [])
        if rn.name not in outputs and len(rs) == 1 and _identity_reader(rs[0], rn.name):
            owner[rn.name] = owner[rs[0].name]
        else:
            owner[rn.name] = rn.name
    groups: dict[str, list[str]] = {}
    for rn in nodes:
        groups.setdefault(owner[rn.name], []).append(rn.name)
    order = {rn.name: i for i, rn in enumerate(nodes)}
    return tuple(tuple(groups[k]) for k in sorted(groups, key=order.__getitem__))


def check_streamable(nodes: tuple[RegionNode, ...]) -> None:
    """Refuse, with a :class:`TilingError` naming the node, what a streaming region cannot run:
    channel splits (a tuple of pieces has no rows to buffer) and norms applied from statistics
    over the whole map (multi-pass regions stream nothing)."""
    for rn in nodes:
        what = None
        if rn.rule.kind == "select":
            what = "an item of a channel split (a split's pieces are not buffered by rows)"
        elif rn.rule.kind == "norm_apply":
            what = "a norm over space (its statistics span the whole map)"
        if what is not None:
            raise TilingError(
                f"cannot stream node {rn.format or rn.name}: {what}. End the streaming region "
                "before it (merge= an earlier node) or tile this region instead (tiles=...)")


# --------------------------------------------------------------------------- the schedule


def _output_targets(spec: StreamSpec, sizes: dict, strips: int, j: int) -> dict[str, Interval]:
    """Rows ``[0, e)`` each region output must hold after strip ``j`` of ``strips``."""
    ref = max(sizes[o][0] for o in spec.outputs)
    out = {}
    for o in spec.outputs:
        n = sizes[o][0]
        e = n if j >= strips - 1 else min(n, max(1, -(-(j + 1) * spec.strip * n // ref)))
        out[o] = (0, e)
    return out


def _ring(lo: int, hi: int, cap: int | None) -> tuple[tuple[int, int], ...]:
    """Ring positions of rows ``[lo, hi)`` in a ring of ``cap`` rows (None: stored whole)."""
    if hi <= lo:
        return ()
    if cap is None:
        return ((lo, hi),)
    out, r = [], lo
    while r < hi:
        p = r % cap
        n = min(hi - r, cap - p)
        out.append((p, p + n))
        r += n
    return tuple(out)


def strip_rows(spec: StreamSpec, input_sizes: dict[str, tuple[int, ...]]) -> RowSchedule:
    """The rows every node of ``spec`` computes and reads in every strip, for these input
    extents (spatial sizes by input name), and the row buffers they need.

    >>> from tilefx.rules import SpatialRule, ZEROS
    >>> from tilefx.windows import Affine
    >>> conv = lambda name, src: RegionNode(name, SpatialRule("aten.conv2d", "conv",
    ...     ((src, (Affine(3, 1, 1, 1), Affine(3, 1, 1, 1))),), ZEROS))
    >>> nodes = (conv("c1", "x"), conv("c2", "c1"), conv("c3", "c2"))
    >>> spec = StreamSpec(RegionSpec(2, ("x",), nodes, ("c3",), (1, 1)),
    ...                   stages_of(nodes, ("c3",)), strip=4)
    >>> s = strip_rows(spec, {"x": (16, 16)})
    >>> s.carried["c1"], s.carried["c2"], s.capacity["c2"]   # 3x3 convolutions keep 2 rows
    (2, 2, 6)
    >>> s.computed() == {"c1": 16, "c2": 16, "c3": 16}       # every row once
    True
    """
    region = spec.region
    nodes = region.nodes
    sizes = extents(region, input_sizes)
    nsp = region.nsp
    if spec.strip < 1:
        raise TilingError(f"strip height {spec.strip}: give at least one row")
    by_name = {rn.name: rn for rn in nodes}
    outputs = set(region.outputs)

    # The other spatial axes are whole in every strip: their reads are fixed for the shape.
    rest: dict[tuple[str, str], tuple[Interval, ...]] = {
        (rn.name, src): () for rn in nodes for src, _ in rn.rule.inputs}
    for axis in range(1, nsp):
        ax = {k: v[axis] for k, v in sizes.items()}
        aw = propagate_axis(nodes, {o: (0, ax[o]) for o in region.outputs}, ax, axis)
        for key in rest:
            rest[key] += (aw.reads[key],)

    # Stream axis: cumulative rows per strip, by backward propagation from the outputs.
    h0 = {k: v[0] for k, v in sizes.items()}
    ref = max(h0[o] for o in region.outputs)
    strips = -(-ref // spec.strip)

    def pull(pieces: dict[str, Interval]) -> dict[str, Interval]:
        return propagate_axis(nodes, pieces, h0, 0).need

    first = pull(_output_targets(spec, sizes, strips, 0))
    # Warm-up: the first strip's lead of every node is spread backwards over earlier strips,
    # each node falling back by WARMUP_RATIO times its steady rate per strip (the pipeline's
    # schedule continued back in time, so producers stay just ahead of their consumers). The
    # number of warm-up strips follows the nodes that compute at least a row per strip; a
    # smaller map computes what remains of its lead in the first warm-up strip.
    rate = {n: spec.strip * h0[n] / ref for n in by_name}
    lead = {n: first[n][1] - first[n][0] for n in by_name}
    big = [n for n in by_name if rate[n] >= 1.0] or list(by_name)
    warmup = max(0, max(math.ceil(lead[n] / (WARMUP_RATIO * max(rate[n], 1.0))) for n in big) - 1)
    cumulative: list[dict[str, Interval]] = []
    for k in range(warmup, 0, -1):
        pieces = {}
        for n, (a, _) in first.items():
            t = lead[n] - math.ceil(k * WARMUP_RATIO * rate[n])
            if t > 0:
                pieces[n] = (a, a + t)
        reached = _ancestors(set(pieces), by_name)
        need = propagate_axis(tuple(rn for rn in nodes if rn.name in reached), pieces, h0, 0).need
        cumulative.append({n: need.get(n, (first[n][0], first[n][0])) for n in by_name})
    cumulative.append(first)
    cumulative += [pull(_output_targets(spec, sizes, strips, j)) for j in range(1, strips)]

    start = {n: first[n][0] for n in by_name}
    done: dict[str, list[int]] = {n: [] for n in by_name}
    prev = dict(start)
    reads: list[dict[tuple[str, str], Interval]] = []
    news: list[dict[str, Interval]] = []
    for j, need in enumerate(cumulative):
        new: dict[str, Interval] = {}
        for rn in nodes:
            lo, hi = need[rn.name]
            if lo != start[rn.name] or hi < prev[rn.name]:
                raise TilingError(  # pragma: no cover - window maps are monotone
                    f"node {rn.format or rn.name} would compute rows out of order in strip {j}; "
                    "please report this as a tilefx bug")
            if hi > prev[rn.name]:
                new[rn.name] = (prev[rn.name], hi)
            done[rn.name].append(hi)
        for st in spec.stages:
            active = {n in new for n in st}
            if len(active) > 1 or (active == {True} and len({new[n] for n in st}) > 1):
                raise TilingError(  # pragma: no cover - a stage's nodes share their rows
                    f"stage {st} computes different rows in strip {j}; please report this")
        touched: dict[tuple[str, str], Interval] = {}
        for rn in nodes:
            if rn.name not in new:
                continue
            a, b = new[rn.name]
            for src, maps in rn.rule.inputs:
                lo, hi = maps[0].in_window(a, b, h0[src], h0[rn.name])
                touched[(rn.name, src)] = (lo, hi)
                _, chi = source_interval(lo, hi, h0[src], rn.rule.pad)
                have = h0[src] if src in region.inputs else done[src][-1]
                if chi > have:
                    raise TilingError(  # pragma: no cover - propagate_axis pulled these rows
                        f"node {rn.format or rn.name} reads rows up to {chi} of {src} in strip "
                        f"{j}, before they are computed; please report this as a tilefx bug")
        reads.append(touched)
        news.append(new)
        prev = {n: done[n][-1] for n in by_name}

    # Row buffers: what later reads still need, at its largest over the strips.
    total = len(cumulative)
    lowest: dict[str, list[float]] = {n: [math.inf] * total for n in by_name}
    for j, touched in enumerate(reads):
        for (c, src), (lo, hi) in touched.items():
            if src in lowest:
                clo, _ = source_interval(lo, hi, h0[src], by_name[c].rule.pad)
                lowest[src][j] = min(lowest[src][j], clo)
    keep: dict[str, tuple[int, ...]] = {}
    capacity: dict[str, int] = {}
    carried: dict[str, int] = {}
    for n in by_name:
        suffix, run = [0] * total, math.inf
        for j in range(total - 1, -1, -1):
            run = min(run, lowest[n][j])
            suffix[j] = int(min(run, done[n][j]))
        keep[n] = tuple(suffix)
    for n in spec.stored:
        before = [start[n]] + done[n][:-1]
        low = [min(keep[n][j], before[j]) for j in range(total)]
        carried[n] = max(0, max(before[j] - low[j] for j in range(total)))
        capacity[n] = h0[n] if n in outputs else max(1, max(done[n][j] - low[j] for j in range(total)))
    return RowSchedule(sizes=sizes, new=tuple(news), reads=tuple(reads), rest=rest,
                       done={n: tuple(v) for n, v in done.items()}, keep=keep,
                       capacity=capacity, carried=carried, warmup=warmup)


def strip_schedule(spec: StreamSpec, input_sizes: dict[str, tuple[int, ...]]) -> StreamSchedule:
    """The strips of ``spec`` for these input extents: :func:`strip_rows` and, per strip, the
    records its stage bodies read (row-buffer reads and writes, per-op data)."""
    rows = strip_rows(spec, input_sizes)
    region = spec.region
    sizes = rows.sizes
    nsp = region.nsp
    stage_of = {n: k for k, st in enumerate(spec.stages) for n in st}
    whole = set(region.inputs) | set(region.outputs)  # stored at their own rows
    cap = {n: (None if n in whole else c) for n, c in rows.capacity.items()}
    cap.update({n: None for n in region.inputs})
    h0 = {k: v[0] for k, v in sizes.items()}
    # Crops along the other axes, fixed for the shape.
    rest: dict[tuple[str, str], CropTable] = {}
    for rn in region.nodes:
        for src, _ in rn.rule.inputs:
            t = rows.rest[(rn.name, src)]
            rest[(rn.name, src)] = crop_table(t, tuple((0, L) for L in sizes[src][1:]),
                                              sizes[src][1:], rn.rule.pad) if t else ()
    strips: list[Strip] = []
    for j, new in enumerate(rows.new):
        strip = Strip(index=j, stages=tuple(k for k, st in enumerate(spec.stages) if st[-1] in new),
                      rows=dict(new))
        for rn in region.nodes:
            if rn.name not in new:
                continue
            a, b = new[rn.name]
            window = ((a, b),) + tuple((0, L) for L in sizes[rn.name][1:])
            targets = []
            for src, _ in rn.rule.inputs:
                lo, hi = rows.reads[j][(rn.name, src)]
                targets.append(((lo, hi),) + rows.rest[(rn.name, src)])
                if stage_of.get(src) == stage_of[rn.name]:
                    continue  # read position by position inside the stage: no buffer
                strip.reads[(rn.name, src)] = _row_read(lo, hi, h0[src], cap[src], rn.rule.pad,
                                                        rest[(rn.name, src)])
            data = rn.rule.entry.tile_data(rn.rule, rn.name, window, targets, sizes)
            if data is not None:
                strip.extra[rn.name] = data
            if rn.name in rows.capacity:
                pieces, off = [], 0
                for p0, p1 in _ring(a, b, cap[rn.name]):
                    pieces.append((off, p0, p1 - p0))
                    off += p1 - p0
                strip.writes[rn.name] = RowWrite(tuple(pieces), rows.capacity[rn.name], nsp)
        strips.append(strip)
    return StreamSchedule(rows=rows, strips=strips)


def _ancestors(names: set[str], by_name: dict[str, RegionNode]) -> set[str]:
    """``names`` and the region nodes they are computed from."""
    out, walk = set(), list(names)
    while walk:
        n = walk.pop()
        if n in out or n not in by_name:
            continue
        out.add(n)
        walk.extend(by_name[n].sources)
    return out


def _row_read(lo: int, hi: int, n: int, cap: int | None, pad, rest: CropTable) -> RowRead:
    """The record of a read of global rows ``[lo, hi)`` of a producer of extent ``n`` stored in
    a ring of ``cap`` rows (None: whole), off-map rows by the consumer's ``pad``."""
    def pos(g: int) -> int:
        return g if cap is None else g % cap

    if (lo < 0 or hi > n) and pad is not None and pad.mode in ("reflect", "replicate"):
        idx = []
        for g in range(lo, hi):
            if pad.mode == "reflect":
                g = -g if g < 0 else (2 * (n - 1) - g if g >= n else g)
            else:
                g = min(max(g, 0), n - 1)
            idx.append(pos(g))
        return RowRead((), tuple(idx), 0, 0, rest)
    clo, chi = max(lo, 0), min(hi, n)
    if chi <= clo:  # the whole read is padding
        return RowRead((), None, hi - lo, 0, rest)
    return RowRead(_ring(clo, chi, cap), None, clo - lo, hi - chi, rest)
