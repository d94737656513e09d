"""Tile geometry for one input shape: extents, the tile grid, windows and halo crops.

Pure integer arithmetic over a :class:`RegionSpec` (the facts of a region, frozen at rewrite
time). :func:`schedule` is what a :class:`~tilefx.region.TiledRegion` computes, once per input
shape, before it runs its tiles: every region output is partitioned by the tile grid (no gaps,
no overlaps); for every tile, windows are propagated backwards (a node's window is the hull of
what its consumers read) and every consumer's read becomes a crop of its producer's window,
with pads where the read leaves the feature map.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from .errors import TilingError
from .spatial import SpatialRule
from .windows import Interp, Transposed

__all__ = ["RegionSpec", "RegionNode", "TileWindows", "Schedule", "schedule", "crop_key"]

Window = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class RegionNode:
    name: str
    rule: SpatialRule
    format: str = ""  # node.format_node() of the original node, for error messages

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.rule.inputs)


@dataclass(frozen=True)
class RegionSpec:
    """The static facts of a region: its spatial inputs, nodes (topological order), outputs."""

    nsp: int
    inputs: tuple[str, ...]
    nodes: tuple[RegionNode, ...]
    outputs: tuple[str, ...]
    grid: tuple[int, ...]


@dataclass
class TileWindows:
    """Everything one tile's body reads: windows, crop tables and output pieces."""

    index: tuple[int, ...]
    need: dict[str, Window]
    crops: dict[str, tuple] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    pieces: dict[str, tuple[Window, tuple]] = field(default_factory=dict)


@dataclass
class Schedule:
    sizes: dict[str, tuple[int, ...]]
    tiles: list[TileWindows]


def crop_key(consumer: str, producer: str) -> str:
    return f"{consumer}<-{producer}"


def _hull(a: Window | None, b: Window) -> Window:
    if a is None:
        return b
    return tuple((min(x0, y0), max(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    return [(j * n // parts, (j + 1) * n // parts) for j in range(parts)]


def extents(spec: RegionSpec, input_sizes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The spatial extent of every region tensor for the given input extents."""
    sizes = dict(input_sizes)
    for rn in spec.nodes:
        sizes[rn.name] = rn.rule.out_sizes(sizes[rn.sources[0]])
    return sizes


def _reads(rn: RegionNode, src: str, maps, win: Window, sizes) -> Window:
    n_out = sizes[rn.name]
    n_in = sizes[src]
    return tuple(
        m.in_window(a, b, li, lo) for m, (a, b), li, lo in zip(maps, win, n_in, n_out)
    )


def _source_window(target: Window, n: tuple[int, ...], pad) -> Window:
    """The part of the producer a crop to ``target`` reads (reflect reads inside the map)."""
    out = []
    for (lo, hi), L in zip(target, n):
        clo, chi = max(lo, 0), min(hi, L)
        if pad is not None and pad.mode == "reflect":
            if lo < 0:
                chi = max(chi, min(-lo + 1, L))
            if hi > L:
                clo = min(clo, max(2 * (L - 1) - (hi - 1), 0))
        elif pad is not None and pad.mode == "replicate":
            if lo < 0:
                chi = max(chi, 1)
            if hi > L:
                clo = min(clo, L - 1)
        if chi <= clo:  # a read entirely outside the map still needs one row for its dtype
            clo, chi = (0, 1) if hi <= 0 else (L - 1, L)
        out.append((clo, chi))
    return tuple(out)


def _crop_table(target: Window, have: Window, n: tuple[int, ...], pad) -> tuple:
    """Per axis: ("slice", start, stop, pad_lo, pad_hi) or ("index", local indices)."""
    axes = []
    for (lo, hi), (h0, _), L in zip(target, have, n):
        clo, chi = max(lo, 0), min(hi, L)
        plo, phi = clo - lo, hi - chi
        if (plo or phi) and pad is not None and pad.mode in ("reflect", "replicate"):
            idx = []
            for g in range(lo, hi):
                if pad.mode == "reflect":
                    g = -g if g < 0 else (2 * (L - 1) - g if g >= L else g)
                else:
                    g = min(max(g, 0), L - 1)
                idx.append(g - h0)
            axes.append(("index", tuple(idx)))
        else:
            if chi < clo:  # the whole read is padding
                clo = chi = max(min(lo, L), 0)
                plo, phi = 0, hi - lo
            axes.append(("slice", clo - h0, chi - h0, plo, phi))
    return tuple(axes)


def _interp_table(rn: RegionNode, maps, win: Window, target: Window, sizes) -> tuple:
    """Per axis: local source indices and weights for each output position of ``win``, or, for
    nearest modes, what the body needs to take ATen's own indices (see ``Interp``)."""
    axes = []
    for m, (a, b), (t0, t1), li, lo in zip(maps, win, target, sizes[rn.sources[0]], sizes[rn.name]):
        assert isinstance(m, Interp)
        if m.mode in ("nearest", "nearest-exact"):
            axes.append(("aten", m.mode, m.scale, li, lo, a, b, t0, t1))
            continue
        src = [m.source(d, li, lo) for d in range(a, b)]
        axes.append((m.mode == "linear", tuple(s[0] - t0 for s in src),
                     tuple(s[1] - t0 for s in src), tuple(s[2] for s in src)))
    return tuple(axes)


def _avgpool_mask(rn: RegionNode, maps, target: Window, n: tuple[int, ...]) -> tuple | None:
    """Per axis, which positions of the read count in the divisor (None: all of them)."""
    a = rn.rule.attrs
    if a["count_include_pad"] and not any(m.ceil_mode for m in maps):
        return None  # every window covers k positions of the padded map: the divisor is fixed
    axes = []
    for m, (lo, hi), L in zip(maps, target, n):
        first, last = (-m.p, L + m.pr) if a["count_include_pad"] else (0, L)
        axes.append(tuple(1.0 if first <= g < last else 0.0 for g in range(lo, hi)))
    return tuple(axes)


def schedule(spec: RegionSpec, input_sizes: dict[str, tuple[int, ...]]) -> Schedule:
    """Windows and crops of every tile of ``spec.grid`` for the given input extents.

    Raises :class:`TilingError` when the grid is finer than some region output.
    """
    sizes = extents(spec, input_sizes)
    for o in spec.outputs:
        for axis, (L, t) in enumerate(zip(sizes[o], spec.grid)):
            if L < t:
                raise TilingError(
                    f"the tile grid {spec.grid} is too fine for this input: region output {o} is "
                    f"only {L} long on spatial axis {axis}; use a coarser grid or a larger input"
                )
    splits = {o: [_split(L, t) for L, t in zip(sizes[o], spec.grid)] for o in spec.outputs}
    consumers: dict[str, list[RegionNode]] = {}
    for rn in spec.nodes:
        for s in rn.sources:
            consumers.setdefault(s, []).append(rn)


    tiles = []
    for index in itertools.product(*(range(t) for t in spec.grid)):
        tw = TileWindows(index=index, need={})
        pieces = {o: tuple(splits[o][ax][j] for ax, j in enumerate(index)) for o in spec.outputs}
        # Backward: a node's window is the hull of its own piece and its consumers' reads.
        for rn in reversed(spec.nodes):
            w = pieces.get(rn.name)
            for c in consumers.get(rn.name, ()):
                w = _hull(w, tw.extra[("src", c.name, rn.name)])
            tw.need[rn.name] = w
            for src, maps in rn.rule.inputs:
                target = _reads(rn, src, maps, w, sizes)
                tw.extra[("target", rn.name, src)] = target
                pad = rn.rule.pad if rn.rule.lowering in ("conv", "maxpool", "avgpool", "pad") else None
                tw.extra[("src", rn.name, src)] = _source_window(target, sizes[src], pad)
        for name in spec.inputs:
            tw.need[name] = tuple((0, L) for L in sizes[name])
        # Forward facts for the body: crops, interpolation tables, placements, pieces.
        for rn in spec.nodes:
            w = tw.need[rn.name]
            for src, maps in rn.rule.inputs:
                target = tw.extra.pop(("target", rn.name, src))
                tw.extra.pop(("src", rn.name, src))
                pad = rn.rule.pad
                tw.crops[crop_key(rn.name, src)] = _crop_table(target, tw.need[src], sizes[src], pad)
                if rn.rule.lowering == "interp":
                    tw.extra[rn.name] = _interp_table(rn, maps, w, target, sizes)
                elif rn.rule.lowering == "transposed":
                    made = tuple(m.produced(lo, hi) for m, (lo, hi) in zip(maps, target))
                    tw.crops[rn.name + "@out"] = tuple(
                        ("slice", a - m0, b - m0, 0, 0) if m0 <= a and b <= m1 else
                        ("slice", max(a, m0) - m0, min(b, m1) - m0, max(m0 - a, 0), max(b - m1, 0))
                        for (a, b), (m0, m1) in zip(w, made)
                    )
                elif rn.rule.lowering == "shuffle" and not rn.rule.attrs["down"]:
                    r = rn.rule.attrs["factor"]
                    tw.crops[rn.name + "@out"] = tuple(
                        ("slice", a - t0 * r, b - t0 * r, 0, 0) for (a, b), (t0, _) in zip(w, target)
                    )
                elif rn.rule.lowering == "avgpool":
                    tw.extra[rn.name] = _avgpool_mask(rn, maps, target, sizes[src])
            if rn.rule.lowering == "select":
                (src, _), = rn.rule.inputs
                tw.crops[crop_key(rn.name, src)] = _crop_table(w, tw.need[src], sizes[src], None)
        for o in spec.outputs:
            piece = pieces[o]
            tw.pieces[o] = (piece, _crop_table(piece, tw.need[o], sizes[o], None), sizes[o])
        tiles.append(tw)
    return Schedule(sizes=sizes, tiles=tiles)


def min_input_extent(spec: RegionSpec, input_sizes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The smallest input extent (per axis, same aspect handling) at which ``spec.grid`` fits."""
    first = spec.inputs[0]
    base = input_sizes[first]
    out = []
    for axis in range(spec.nsp):
        lo = 1
        while True:
            trial = dict(input_sizes)
            trial[first] = tuple(lo if a == axis else base[a] for a in range(spec.nsp))
            try:
                sizes = extents(spec, trial)
                if all(sizes[o][axis] >= spec.grid[axis] for o in spec.outputs):
                    break
            except (ValueError, ZeroDivisionError):
                pass
            lo += 1
            if lo > 1 << 16:
                break
        out.append(lo)
    return tuple(out)
