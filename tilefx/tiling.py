"""Tile geometry for one input shape: extents, the tile grid, windows and halo crops.

Pure integer arithmetic over a :class:`RegionSpec` (the facts of a region, frozen at rewrite
time). Every rule maps windows axis by axis, so a tile's windows are products of per-axis
intervals: :func:`propagate_axis` computes them for one axis (the planner calls it too, so window
propagation is written once), and :func:`schedule` combines the axes for every tile of the grid.
What :func:`schedule` returns is what a :class:`~tilefx.region.TiledRegion` computes, once per
input shape, before it runs its tiles: every region output is partitioned by the tile grid (no
gaps, no overlaps); a node's window is the hull of what its consumers read; every consumer's
read becomes a crop of its producer's window, with pads where the read leaves the feature map.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import TilingError
from .kernels import CropTable, Gather, Slice
from .rules import PadSpec, SpatialRule

__all__ = ["RegionSpec", "RegionNode", "Piece", "TileWindows", "Schedule", "AxisWindows",
           "extents", "padded_rows", "propagate_axis", "schedule", "min_input_extent", "read_window",
           "split", "tile_grid"]

Interval = tuple[int, int]
Window = tuple[Interval, ...]


@dataclass(frozen=True)
class RegionNode:
    name: str
    rule: SpatialRule
    format: str = ""  # node.format_node() of the original node, for error messages

    #: the names of its spatial inputs (set from ``rule``; a plain attribute, which the window
    #: propagation reads often and torch.compile traces through)
    sources: tuple[str, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(n for n, _ in self.rule.inputs))


@dataclass(frozen=True)
class RegionSpec:
    """The static facts of a region: its spatial inputs, nodes (topological order), outputs."""

    nsp: int
    inputs: tuple[str, ...]
    nodes: tuple[RegionNode, ...]
    outputs: tuple[str, ...]
    grid: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """A tile's piece of a region output: its window in the full output, the crop of the
    tile's window that holds it, and the full output's extent."""

    window: Window
    table: CropTable
    full: tuple[int, ...]


@dataclass
class TileWindows:
    """Everything one tile's body reads: windows, crop tables, per-op data, output pieces.

    ``crops`` is keyed by ``(consumer, producer)`` node names; ``extra`` by node name (the
    table entry's ``tile_data``); ``pieces`` by region output.
    """

    index: tuple[int, ...]
    need: dict[str, Window]
    crops: dict[tuple[str, str], CropTable] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    pieces: dict[str, Piece] = field(default_factory=dict)


@dataclass
class Schedule:
    sizes: dict[str, tuple[int, ...]]
    tiles: list[TileWindows]


@dataclass(frozen=True)
class AxisWindows:
    """One axis, one tile index: every node's window (``need``) and what each consumer reads
    of each producer (``reads``, keyed ``(consumer, producer)``; it may leave the map, where
    the consumer's pad applies)."""

    need: dict[str, Interval]
    reads: dict[tuple[str, str], Interval]


def split(n: int, parts: int) -> list[Interval]:
    """``parts`` near-equal pieces of ``[0, n)``."""
    return [(j * n // parts, (j + 1) * n // parts) for j in range(parts)]


def extents(spec: RegionSpec, input_sizes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The spatial extent of every region tensor for the given input extents."""
    sizes = dict(input_sizes)
    for rn in spec.nodes:
        sizes[rn.name] = rn.rule.out_sizes(sizes[rn.sources[0]])
    return sizes


def source_interval(lo: int, hi: int, n: int, pad: PadSpec | None) -> Interval:
    """The part of a producer of extent ``n`` that a read of ``[lo, hi)`` touches (reflect and
    replicate reads fetch rows inside the map for the rows outside it)."""
    clo, chi = max(lo, 0), min(hi, n)
    if pad is not None and pad.mode == "reflect":
        if lo < 0:
            chi = max(chi, min(-lo + 1, n))
        if hi > n:
            clo = min(clo, max(2 * (n - 1) - (hi - 1), 0))
    elif pad is not None and pad.mode == "replicate":
        if lo < 0:
            chi = max(chi, 1)
        if hi > n:
            clo = min(clo, n - 1)
    if chi <= clo:  # a read entirely outside the map still needs one row for its dtype
        clo, chi = (0, 1) if hi <= 0 else (n - 1, n)
    return clo, chi


def propagate_axis(nodes: Sequence[RegionNode], pieces: dict[str, Interval],
                   sizes: dict[str, int], axis: int) -> AxisWindows:
    """Backward window propagation along one axis.

    ``nodes`` in topological order, ``pieces`` the window each region output must produce,
    ``sizes`` every tensor's extent on this axis. A node's window is the hull of its own piece
    and what its consumers read of it.
    """
    need: dict[str, Interval] = {}
    reads: dict[tuple[str, str], Interval] = {}
    touched: dict[str, Interval] = {}
    for rn in reversed(nodes):
        w = pieces.get(rn.name)
        t = touched.get(rn.name)
        if t is not None:
            w = t if w is None else (min(w[0], t[0]), max(w[1], t[1]))
        need[rn.name] = w
        for src, maps in rn.rule.inputs:
            lo, hi = maps[axis].in_window(w[0], w[1], sizes[src], sizes[rn.name])
            reads[(rn.name, src)] = (lo, hi)
            s = source_interval(lo, hi, sizes[src], rn.rule.pad)
            old = touched.get(src)
            touched[src] = s if old is None else (min(old[0], s[0]), max(old[1], s[1]))
    return AxisWindows(need, reads)


def padded_rows(lo: int, hi: int, n: int, mode: str) -> list[int]:
    """The positions of an extent-``n`` axis that positions ``[lo, hi)`` read under ``reflect``
    or ``replicate`` padding (positions off the map map back onto it).

    >>> padded_rows(-2, 3, 3, "reflect"), padded_rows(1, 5, 3, "replicate")
    ([2, 1, 0, 1, 2], [1, 2, 2, 2])
    """
    if mode == "reflect":
        return [-g if g < 0 else (2 * (n - 1) - g if g >= n else g) for g in range(lo, hi)]
    return [min(max(g, 0), n - 1) for g in range(lo, hi)]


def crop_table(target: Window, have: Window, n: tuple[int, ...], pad: PadSpec | None) -> CropTable:
    """How a consumer reading ``target`` crops its producer's window ``have`` (extent ``n``)."""
    axes: list[Slice | Gather] = []
    for (lo, hi), (h0, _), L in zip(target, have, n):
        clo, chi = max(lo, 0), min(hi, L)
        plo, phi = clo - lo, hi - chi
        if (plo or phi) and pad is not None and pad.mode in ("reflect", "replicate"):
            axes.append(Gather(tuple(g - h0 for g in padded_rows(lo, hi, L, pad.mode))))
        else:
            if chi < clo:  # the whole read is padding
                clo = chi = max(min(lo, L), 0)
                plo, phi = 0, hi - lo
            axes.append(Slice(clo - h0, chi - h0, plo, phi))
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
    per_axis = []
    for axis, t in enumerate(spec.grid):
        ax_sizes = {k: v[axis] for k, v in sizes.items()}
        per_axis.append([
            propagate_axis(spec.nodes, {o: split(sizes[o][axis], t)[j] for o in spec.outputs},
                           ax_sizes, axis)
            for j in range(t)])
    tiles = []
    for index in itertools.product(*(range(t) for t in spec.grid)):
        axw = [per_axis[ax][j] for ax, j in enumerate(index)]
        tw = TileWindows(index=index, need={})
        for name in spec.inputs:
            tw.need[name] = tuple((0, L) for L in sizes[name])
        for rn in spec.nodes:
            tw.need[rn.name] = tuple(a.need[rn.name] for a in axw)
        for rn in spec.nodes:
            targets = []
            for src, _ in rn.rule.inputs:
                target = tuple(a.reads[(rn.name, src)] for a in axw)
                targets.append(target)
                tw.crops[(rn.name, src)] = crop_table(target, tw.need[src], sizes[src],
                                                      rn.rule.pad)
            data = rn.rule.entry.tile_data(rn.rule, rn.name, tw.need[rn.name], targets, sizes)
            if data is not None:
                tw.extra[rn.name] = data
        for o in spec.outputs:
            piece = tuple(split(L, t)[j] for L, t, j in zip(sizes[o], spec.grid, index))
            tw.pieces[o] = Piece(piece, crop_table(piece, tw.need[o], sizes[o], None), sizes[o])
        tiles.append(tw)
    return Schedule(sizes=sizes, tiles=tiles)


def read_window(tile: TileWindows, producer: str) -> Window:
    """The rows of ``producer`` one tile reads, in the producer's coordinates (beyond the map:
    padding): the hull of every consumer's crop of it."""
    have = tile.need[producer]
    lo = [math.inf] * len(have)
    hi = [-math.inf] * len(have)
    for (_, src), table in tile.crops.items():
        if src != producer:
            continue
        for a, t in enumerate(table):
            h0 = have[a][0]
            if isinstance(t, Slice):
                lo[a] = min(lo[a], h0 + t.start - t.pad_lo)
                hi[a] = max(hi[a], h0 + t.stop + t.pad_hi)
            else:  # reflect/replicate indices: what is read, inside the map
                lo[a] = min(lo[a], h0 + min(t.indices))
                hi[a] = max(hi[a], h0 + max(t.indices) + 1)
    return tuple((int(a), int(b)) if a != math.inf else w for a, b, w in zip(lo, hi, have))


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


def tile_grid(tiles: Any, nsp: int) -> tuple[int, ...]:
    """``tiles`` (one count, or one per spatial axis) as a grid of ``nsp`` positive ints."""
    grid = (tiles,) * nsp if isinstance(tiles, int) else tuple(tiles)

    def count(t: Any) -> bool:
        return not isinstance(t, bool) and isinstance(t, numbers.Integral) and t >= 1

    if len(grid) != nsp or not all(count(t) for t in grid):
        raise TilingError(f"tiles={tiles!r}: give one positive count or one per spatial axis ({nsp})")
    return tuple(int(t) for t in grid)
