"""Strip schedules of a streaming region: which rows every node computes in every strip, and
how many rows each row buffer holds. Pure integer geometry for one input shape.

A **streaming region** runs its nodes in strips along the stream axis (the first spatial axis),
at full extent along the others. In every strip each node computes the rows its consumers need
next and no others, so every output row of every node is computed exactly once. Readers in the
same strip read a node's new rows from its value of this strip; the rows a *later* strip reads
are kept in the node's **row buffer**. Producers run ahead of their consumers by the
receptive-field delay between them, so an edge whose consumer is far downstream (a U-Net skip:
the encoder's rows wait until the decoder reaches them) holds a FIFO of rows. Its size follows
from the two row schedules, as a buffer in cyclo-static dataflow (CSDF) is sized from its
actors' firing sequences: the stored rows from the first one a read of this or a later strip
still needs up to the last one computed, at the most over the strips.

**The clock.** Strips advance by the strip height ``h`` in rows of the region's tallest feature
map; a node of extent ``H_n`` advances ``h * H_n / H_max`` rows per strip (a node of a smaller
map computes a row every few strips). Node ``n``'s own target after strip ``j`` is its lead
``L_n`` (the rows it must have computed before the outputs' first row: its receptive-field
delay) plus ``(j - K) * h * H_n / H_max`` rows, where ``K`` is the number of warm-up strips, in
which the leads fill at that same pace, so no strip computes a node's whole lead at once.
Backward window propagation (:func:`tilefx.tiling.propagate_axis`, the same function the tile
grid uses) turns the targets into ``done_n(j)``, the rows each node has computed by the end of
strip ``j`` (at least its target, and what its readers' targets pull); node ``n`` computes rows
``[done_n(j-1), done_n(j))`` in strip ``j``, reading through its op's window map the rows
``[lo, hi)`` of each input.

**Row buffers.** A row is stored when a strip after the one computing it reads it: the stored
rows of a strip are its new rows from the first row a later strip reads (``keep``), and take
consecutive ring positions. A window op's input keeps ``k - s`` rows (times its dilation)
whatever the strip height; a skip keeps the rows between its two readers.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import TilingError
from .kernels import CropTable
from .stream_kernels import NEW, STORED, RowRead, RowWrite
from .tiling import (RegionNode, RegionSpec, crop_table, extents, padded_rows, propagate_axis,
                     source_interval)
from .windows import IDENTITY

__all__ = ["StreamSpec", "Strip", "RowSchedule", "StreamSchedule", "stages_of",
           "check_streamable", "strip_rows", "strip_schedule", "MIN_ROWS"]

Interval = tuple[int, int]

#: The fewest rows a node of a small map computes per call (where it advances less than that
#: per strip): fewer calls of its stage, for a few rows more in flight.
MIN_ROWS = 4


@dataclass(frozen=True)
class StreamSpec:
    """The static facts of a streaming region: its nodes, inputs and outputs (``region``, a
    :class:`~tilefx.tiling.RegionSpec` whose grid is unused), its stages (node names in
    topological order; the last one of each is stored), the strip height ``strip`` in rows of
    its tallest feature map, and ``min_rows``: the fewest rows a node of a smaller map computes
    per call."""

    region: RegionSpec
    stages: tuple[tuple[str, ...], ...]
    strip: int
    #: the fewest rows a node of a small map computes per call (see :data:`MIN_ROWS`)
    min_rows: int = 4

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
    """The integer part of a schedule: which rows every node computes, reads and stores, per
    strip.

    ``new[j]``: the rows each node computing in strip ``j`` computes; ``reads[j]``: what each
    such node reads of each input along the stream axis (global rows, possibly off the map);
    ``rest``: what each read covers along the other spatial axes (the same in every strip);
    ``stored[j]``: the rows of each stored node's new ones that later strips read (a suffix);
    ``done[n]``: rows of ``n`` computed by the end of each strip; ``keep[n]``: per strip, the
    first row of ``n`` a read of this or a later strip still needs; ``capacity[n]``: a stored
    node's ring size in rows (the full extent for a region output); ``carried[n]``: the most
    rows it keeps from one strip to the next (``k - s`` rows, times dilation, for a window op's
    input; a U-Net skip's FIFO holds the decoder's delay); ``warmup``: strips before the one
    computing the outputs' first row.
    """

    sizes: dict[str, tuple[int, ...]]
    new: tuple[dict[str, Interval], ...]
    reads: tuple[dict[tuple[str, str], Interval], ...]
    rest: dict[tuple[str, str], tuple[Interval, ...]]
    stored: tuple[dict[str, Interval], ...]
    done: dict[str, tuple[int, ...]]
    keep: dict[str, tuple[int, ...]]
    capacity: dict[str, int]
    carried: dict[str, int]
    warmup: int

    def computed(self) -> dict[str, int]:
        """Rows each node computes over all strips (each row once)."""
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


def strip_rows(spec: StreamSpec, input_sizes: dict[str, tuple[int, ...]]) -> RowSchedule:
    """The rows every node of ``spec`` computes, reads and stores in every strip, for these
    input extents (spatial sizes by input name), and the row buffers they need.

    >>> from tilefx.rules import SpatialRule, ZEROS
    >>> from tilefx.windows import Affine
    >>> conv = lambda name, src: RegionNode(name, SpatialRule("aten.conv2d", "conv",
    ...     ((src, (Affine(3, 1, 1, 1), Affine(3, 1, 1, 1))),), ZEROS))
    >>> nodes = (conv("c1", "x"), conv("c2", "c1"), conv("c3", "c2"))
    >>> spec = StreamSpec(RegionSpec(2, ("x",), nodes, ("c3",), (1, 1)),
    ...                   stages_of(nodes, ("c3",)), strip=4)
    >>> s = strip_rows(spec, {"x": (16, 16)})
    >>> s.carried["c1"], s.carried["c2"], s.capacity["c2"]   # 3x3 convolutions keep 2 rows
    (2, 2, 4)
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

    # The stream axis: every node's target per strip, then what propagation makes of them.
    h0 = {k: v[0] for k, v in sizes.items()}
    tallest = max(h0[n] for n in by_name)
    h = min(spec.strip, tallest)

    def pull(pieces: dict[str, Interval]) -> dict[str, Interval]:
        reached = _ancestors(set(pieces), by_name)
        need = propagate_axis(tuple(rn for rn in nodes if rn.name in reached), pieces, h0, 0).need
        return {n: need.get(n, (start[n], start[n])) for n in by_name}

    full = propagate_axis(nodes, {o: (0, h0[o]) for o in region.outputs}, h0, 0).need
    # Leads: what every node computes before the outputs' first strip of rows.
    first = propagate_axis(nodes, {o: (0, max(1, h * h0[o] // tallest)) for o in region.outputs},
                           h0, 0).need
    start = {n: first[n][0] for n in by_name}
    lead = {n: first[n][1] - start[n] for n in by_name}
    span = {n: full[n][1] - start[n] for n in by_name}
    # Rows per strip, as the exact fraction h * H_n / H_max: a target is an integer quotient.
    # A smaller map advancing less than min_rows rows per strip is called every m strips
    # instead (m a power of two, so a map half as tall is called half as often, in step with
    # its producer): its rows are small, and each call of its stage costs the same.
    period = {}
    for n in by_name:
        m = 1
        while m * h * h0[n] < spec.min_rows * tallest and m < 1 << 20:
            m *= 2
        period[n] = m
    warmup = max(-(-lead[n] * tallest // (h * h0[n])) for n in by_name)
    cumulative: list[dict[str, Interval]] = []
    j = 0
    while True:
        pieces = {}
        for n in by_name:
            t = min(span[n], lead[n] + (j - warmup) // period[n] * period[n] * h * h0[n] // tallest)
            if t > 0:
                pieces[n] = (start[n], start[n] + t)
        need = pull(pieces)
        if not cumulative or need != cumulative[-1]:
            cumulative.append(need)
        elif j < warmup:
            warmup -= 1  # a warm-up strip with nothing to compute is left out
        if all(need[n][1] >= full[n][1] for n in by_name):
            break
        j += 1
        if j > 4 * (warmup + tallest + 1):  # pragma: no cover - targets reach every extent
            raise TilingError("the strip schedule does not finish; please report this as a "
                              "tilefx bug")

    done: dict[str, list[int]] = {n: [] for n in by_name}
    prev = dict(start)
    reads: list[dict[tuple[str, str], Interval]] = []
    news: list[dict[str, Interval]] = []
    for j, need in enumerate(cumulative):
        new: dict[str, Interval] = {}
        for rn in nodes:
            lo, hi = need[rn.name]
            if (lo != start[rn.name] and hi > lo) or hi < prev[rn.name]:
                raise TilingError(  # pragma: no cover - window maps are monotone
                    f"node {rn.format or rn.name} would compute rows out of order in strip {j}; "
                    "please report this as a tilefx bug")
            if hi > prev[rn.name]:
                new[rn.name] = (prev[rn.name], hi)
            done[rn.name].append(max(hi, prev[rn.name]))
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

    # What later strips read: the first row of each node a read of strip j or later needs.
    total = len(cumulative)
    lowest: dict[str, list[float]] = {n: [math.inf] * total for n in by_name}
    for j, touched in enumerate(reads):
        for (c, src), (lo, hi) in touched.items():
            if src in lowest:
                clo, _ = source_interval(lo, hi, h0[src], by_name[c].rule.pad)
                lowest[src][j] = min(lowest[src][j], clo)
    keep: dict[str, tuple[int, ...]] = {}
    for n in by_name:
        suffix, run = [0] * total, math.inf
        for j in range(total - 1, -1, -1):
            run = min(run, lowest[n][j])
            suffix[j] = int(min(run, done[n][j]))
        keep[n] = tuple(suffix)
    stored: list[dict[str, Interval]] = [{} for _ in range(total)]
    capacity: dict[str, int] = {}
    carried: dict[str, int] = {}
    for n in spec.stored:
        if n in outputs:  # the full-size output buffer holds every row
            for j, new in enumerate(news):
                if n in new:
                    stored[j][n] = new[n]
            capacity[n], carried[n] = h0[n], 0
            continue
        kept = []  # stored rows, in order
        for j, new in enumerate(news):
            if n in new:
                a, b = new[n]
                later = keep[n][j + 1] if j + 1 < total else b
                s0 = min(max(a, later), b)
                if s0 < b:
                    stored[j][n] = (s0, b)
                    kept.append((s0, b))
        # Stored rows live from their strip until no read of the current strip or a later one
        # needs them: at most this many at once (a strip's old rows and its new stored ones).
        starts = [a for a, _ in kept]
        below = [0]  # stored rows before each run
        for a, b in kept:
            below.append(below[-1] + b - a)

        def rank(x: int) -> int:  # stored rows below row x
            i = bisect.bisect_right(starts, x) - 1
            return below[i] + min(x, kept[i][1]) - kept[i][0] if i >= 0 else 0

        live = carry = 0
        for j in range(total):
            hi = rank(done[n][j])
            live = max(live, hi - rank(keep[n][j]))
            carry = max(carry, hi - rank(keep[n][j + 1] if j + 1 < total else done[n][j]))
        capacity[n], carried[n] = max(1, live), carry
    return RowSchedule(sizes=sizes, new=tuple(news), reads=tuple(reads), rest=rest,
                       stored=tuple(stored), done={n: tuple(v) for n, v in done.items()},
                       keep=keep, capacity=capacity, carried=carried, warmup=warmup)


def strip_schedule(spec: StreamSpec, input_sizes: dict[str, tuple[int, ...]]) -> StreamSchedule:
    """The strips of ``spec`` for these input extents: :func:`strip_rows` and, per strip, the
    records its stage bodies read (row-buffer reads and writes, per-op data)."""
    rows = strip_rows(spec, input_sizes)
    region = spec.region
    sizes = rows.sizes
    nsp = region.nsp
    stage_of = {n: k for k, st in enumerate(spec.stages) for n in st}
    order = {rn.name: i for i, rn in enumerate(region.nodes)}
    outputs = set(region.outputs)
    h0 = {k: v[0] for k, v in sizes.items()}
    # Ring positions: the stored rows of a node in order, modulo its capacity.
    rank: dict[str, list[tuple[int, int, int]]] = {}  # node -> (first row, last row, first rank)
    for n in spec.stored:
        if n in outputs:
            continue
        runs, r = [], 0
        for st in rows.stored:
            if n in st:
                a, b = st[n]
                runs.append((a, b, r))
                r += b - a
        rank[n] = runs

    def positions(n: str, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """STORED pieces of rows [lo, hi) of ``n`` (all of them must be stored)."""
        if n in outputs or n in region.inputs:
            return [(STORED, lo, hi)] if hi > lo else []
        cap = rows.capacity[n]
        out = []
        for a, b, r0 in rank[n]:
            x0, x1 = max(a, lo), min(b, hi)
            if x0 >= x1:
                continue
            k0, k1 = r0 + x0 - a, r0 + x1 - a
            while k0 < k1:
                p = k0 % cap
                m = min(k1 - k0, cap - p)
                if out and out[-1][2] == p and out[-1][0] == STORED:
                    out[-1] = (STORED, out[-1][1], p + m)
                else:
                    out.append((STORED, p, p + m))
                k0 += m
        if sum(b - a for _, a, b in out) != hi - lo:
            raise TilingError(  # pragma: no cover - keep covers every later read
                f"rows [{lo}, {hi}) of {n} are read after their strip but were not stored; "
                "please report this as a tilefx bug")
        return out

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
        last_reader: dict[str, tuple[int, int, str]] = {}  # producer -> its last new-row reader
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
                clo, chi = source_interval(lo, hi, h0[src], rn.rule.pad)
                fresh = new.get(src) if src not in outputs and src not in region.inputs else None
                split = chi if fresh is None else max(clo, min(chi, fresh[0]))
                pieces = positions(src, clo, split)
                if split < chi:
                    pieces.append((NEW, split - fresh[0], chi - fresh[0]))
                    last_reader[src] = max(last_reader.get(src, (-1, -1, "")),
                                           (stage_of[rn.name], order[rn.name], rn.name))
                strip.reads[(rn.name, src)] = _row_read(lo, hi, clo, chi, h0[src], rn.rule.pad,
                                                        tuple(pieces), rest[(rn.name, src)],
                                                        rn.rule.kind != "pointwise")
            data = rn.rule.entry.tile_data(rn.rule, rn.name, window, targets, sizes)
            if data is not None:
                strip.extra[rn.name] = data
        for src, (_, _, c) in last_reader.items():
            r = strip.reads[(c, src)]
            strip.reads[(c, src)] = RowRead(r.pieces, r.indices, r.pad_lo, r.pad_hi, r.rest,
                                            True, r.contiguous)
        for n in spec.stored:
            if n not in new:
                continue
            a, b = new[n]
            s = rows.stored[j].get(n)
            if s is None:
                pieces = ()
            elif n in outputs:
                pieces = ((0, a, b - a),)
            else:
                pieces = tuple((s[0] - a + off, p0, p1 - p0)
                               for off, (_, p0, p1) in zip(_offsets(positions(n, *s)),
                                                           positions(n, *s)))
            strip.writes[n] = RowWrite(pieces, rows.capacity[n], nsp, hold=n in last_reader)
        strips.append(strip)
    return StreamSchedule(rows=rows, strips=strips)


def _offsets(pieces: list[tuple[int, int, int]]) -> list[int]:
    out, at = [], 0
    for _, a, b in pieces:
        out.append(at)
        at += b - a
    return out


def _row_read(lo: int, hi: int, clo: int, chi: int, n: int, pad, pieces: tuple,
              rest: CropTable, contiguous: bool) -> RowRead:
    """The record of a read of global rows ``[lo, hi)`` of a producer of extent ``n`` whose
    touched rows ``[clo, chi)`` are ``pieces``; off-map rows by the consumer's ``pad``."""
    if (lo < 0 or hi > n) and pad is not None and pad.mode in ("reflect", "replicate"):
        idx = tuple(g - clo for g in padded_rows(lo, hi, n, pad.mode))
        return RowRead(pieces, idx, 0, 0, rest, False, contiguous)
    if min(hi, n) <= max(lo, 0):  # the whole read is padding (one row is touched for its dtype)
        return RowRead(pieces[:0], None, hi - lo, 0, rest, False, contiguous)
    return RowRead(pieces, None, max(lo, 0) - lo, hi - min(hi, n), rest, False, contiguous)
