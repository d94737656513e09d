"""The runtime kernels a streaming region's stage bodies call: row-buffer reads and writes.

A streaming region (``tilefx.stream_region``) keeps, for every node whose rows a later strip
reads, a **row buffer**: a preallocated ring of rows along the stream axis (the first spatial
axis), at full extent along the others, holding only the rows later strips read; the stored rows
take consecutive ring positions. A region input or output is stored whole (position = row).
Readers in the same strip read a node's new rows from its value of this strip. The records
below say, per strip, which positions a read or a write touches; they are computed per input
shape by ``tilefx.streaming.strip_schedule`` and read here with plain Python, so the rewrite
keeps every call as one opaque fx node (see :data:`STREAM_LEAF_FUNCTIONS`).

Nothing here knows about graphs, rules or plans: this is the bottom layer, beside ``kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .kernels import CropTable, Gather, Slice, memory_format

__all__ = ["RowRead", "RowWrite", "STORED", "NEW", "NEW_SUFFIX", "stream_read", "stream_write",
           "STREAM_LEAF_FUNCTIONS"]


#: Where a read piece comes from: the node's storage (ring or full-size map), or the rows it
#: computed in this strip (held for the readers of this strip, not stored unless a later strip
#: reads them too).
STORED, NEW = 0, 1


@dataclass(frozen=True)
class RowRead:
    """What one consumer reads of one producer in one strip.

    Along the stream axis: ``pieces``, ``(source, start, stop)`` ranges in row order, from the
    producer's storage (``STORED``: ring positions, a window that wraps round the ring is two
    ranges) or from its rows of this strip (``NEW``: offsets into them); then, for a reflect or
    replicate read past the map's edge, ``indices`` into those rows; then ``pad_lo`` /
    ``pad_hi`` rows of the consumer's pad value (the read leaves the map there). Along the other
    spatial axes, ``rest``: the same crop records as a tile's (``kernels.Slice`` /
    ``kernels.Gather``), fixed for a shape. ``release``: this is the strip's last read of the
    producer's new rows, which are dropped after it. ``contiguous``: the consumer needs a
    contiguous window (a convolution or pooling), not a view.
    """

    pieces: tuple[tuple[int, int, int], ...]
    indices: tuple[int, ...] | None = None
    pad_lo: int = 0
    pad_hi: int = 0
    rest: CropTable = ()
    release: bool = False
    contiguous: bool = True


@dataclass(frozen=True)
class RowWrite:
    """Where one node's new rows go: ``(offset in the strip's value, storage position, rows)``
    pieces into a storage of ``capacity`` rows along the stream axis (a ring holding the rows
    later strips read, or the full extent of a region output); ``hold``: this strip's readers
    read the new rows, so the value is kept (as ``name + NEW_SUFFIX``) until the last of them."""

    pieces: tuple[tuple[int, int, int], ...]
    capacity: int
    nsp: int
    hold: bool = False


#: The key of a node's rows of the current strip in a streaming region's state.
NEW_SUFFIX = "@new"


def _rest_interior(x: torch.Tensor, rest: CropTable, d0: int) -> torch.Tensor:
    """``x`` cut to what the read takes from the map along the non-stream axes."""
    for a, t in enumerate(rest):
        dim = d0 + 1 + a
        if isinstance(t, Gather):
            x = x.index_select(dim, torch.tensor(t.indices, dtype=torch.long, device=x.device))
        elif t.start != 0 or t.stop != x.shape[dim]:
            x = x.narrow(dim, t.start, t.stop - t.start)
    return x


def _empty_like_window(src: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    fmt = memory_format(src)
    return torch.empty(shape, dtype=src.dtype, device=src.device,
                       memory_format=fmt if len(shape) in (4, 5) else torch.contiguous_format)


def stream_read(state: dict, strip: Any, consumer: str, producer: str,
                value: float = 0.0) -> torch.Tensor:
    """The window ``consumer`` reads of ``producer`` in this strip.

    Rows come from the producer's storage (``state[producer]``: a ring of rows, or a full-size
    map) and from its rows of this strip (``state[producer + NEW_SUFFIX]``); rows and columns
    off the map are filled with ``value``, the consumer's pad (zeros for a convolution, -inf for
    max pooling). Assembled in one allocation; a single piece with no padding is returned as a
    view where the consumer allows (a pointwise op), else as a contiguous copy.
    """
    r: RowRead = strip.reads[(consumer, producer)]
    srcs = (state.get(producer), state.get(producer + NEW_SUFFIX))
    if r.release:
        del state[producer + NEW_SUFFIX]
    ref = srcs[0] if srcs[0] is not None else srcs[1]
    d0 = ref.dim() - 1 - len(r.rest)
    parts = [srcs[w].narrow(d0, a, b - a) for w, a, b in r.pieces]
    side = [(t.pad_lo, t.pad_hi) if isinstance(t, Slice) else (0, 0) for t in r.rest]
    if r.indices is not None:  # reflect / replicate: gather from the rows it touches
        rows = parts[0] if len(parts) == 1 else _assemble(ref, parts, (0, 0), [(0, 0)] * len(side),
                                                          (), d0, 0.0)
        parts = [rows.index_select(d0, torch.tensor(r.indices, dtype=torch.long, device=ref.device))]
    if len(parts) == 1 and not (r.pad_lo or r.pad_hi or any(p for s in side for p in s)):
        x = _rest_interior(parts[0], r.rest, d0)
        fmt = memory_format(ref)
        if not r.contiguous or x.is_contiguous(memory_format=fmt):
            return x
        # oneDNN convolves strided views through a slow path: a narrowed window is copied.
        return x.contiguous(memory_format=fmt)
    return _assemble(ref, parts, (r.pad_lo, r.pad_hi), side, r.rest, d0, value)


def _assemble(ref: torch.Tensor, parts: list[torch.Tensor], pads: tuple[int, int],
              side: list[tuple[int, int]], rest: CropTable, d0: int, value: float) -> torch.Tensor:
    """``parts`` stacked along the stream axis into one new tensor, cut by ``rest`` along the
    other axes and padded with ``value`` (``pads`` on the stream axis, ``side`` on the others)."""
    parts = [_rest_interior(p, rest, d0) for p in parts]
    rows = sum(p.shape[d0] for p in parts)
    inner = tuple(parts[0].shape[d0 + 1:]) if parts else tuple(
        (t.stop - t.start) if isinstance(t, Slice) else len(t.indices) for t in rest)
    shape = (tuple(ref.shape[:d0]) + (pads[0] + rows + pads[1],)
             + tuple(n + lo + hi for n, (lo, hi) in zip(inner, side)))
    out = _empty_like_window(ref, shape)
    # Fill only the padding: slabs along each axis (corners are filled twice, harmlessly).
    for dim, (lo, hi) in zip(range(d0, out.dim()), [pads] + list(side)):
        if lo:
            out.narrow(dim, 0, lo).fill_(value)
        if hi:
            out.narrow(dim, out.shape[dim] - hi, hi).fill_(value)
    dst = out
    for a, (lo, _) in enumerate(side):
        dst = dst.narrow(d0 + 1 + a, lo, inner[a])
    at = pads[0]
    for p in parts:
        dst.narrow(d0, at, p.shape[d0]).copy_(p)
        at += p.shape[d0]
    return out


def stream_write(state: dict, strip: Any, name: str, value: torch.Tensor) -> None:
    """Store node ``name``'s new rows (``value``: this strip's rows at full extent along the
    other axes) that later strips read, in its storage, allocated once per call at its first
    write; keep ``value`` for this strip's readers where they read it."""
    w: RowWrite = strip.writes[name]
    d0 = value.dim() - w.nsp
    if w.pieces:
        buf = state.get(name)
        if buf is None:
            shape = tuple(value.shape[:d0]) + (w.capacity,) + tuple(value.shape[d0 + 1:])
            buf = state[name] = torch.empty(shape, dtype=value.dtype, device=value.device,
                                            memory_format=memory_format(value))
        for off, at, n in w.pieces:
            buf.narrow(d0, at, n).copy_(value.narrow(d0, off, n))
    if w.hold:
        state[name + NEW_SUFFIX] = value


#: The kernels a stage body calls that fx must keep as single opaque nodes (they read the
#: strip's records with plain Python); the rewrite marks their nodes ``meta["is_wrapped"]``, so
#: ``torch.load``'s re-trace keeps them leaves (as ``kernels.LEAF_FUNCTIONS``).
STREAM_LEAF_FUNCTIONS = (stream_read, stream_write)
