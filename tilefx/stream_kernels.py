"""The runtime kernels a streaming region's stage bodies call: row-buffer reads and writes.

A streaming region (``tilefx.stream_region``) keeps, for every node whose rows a later stage
reads, a **row buffer**: a preallocated ring of rows along the stream axis (the first spatial
axis), at full extent along the others. Row ``r`` of a node lives at ring position
``r mod capacity``; a region input or output is stored whole (position = row). The records
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

__all__ = ["RowRead", "RowWrite", "stream_read", "stream_write", "STREAM_LEAF_FUNCTIONS"]


@dataclass(frozen=True)
class RowRead:
    """What one consumer reads of one producer in one strip.

    Along the stream axis: ring positions ``pieces`` (``[start, stop)`` ranges, in row order; a
    window that wraps round the ring is two ranges), or ``indices`` (positions of a reflect or
    replicate read past the map's edge), then ``pad_lo`` / ``pad_hi`` rows of the consumer's pad
    value (the read leaves the map there). Along the other spatial axes, ``rest``: the same
    crop records as a tile's (``kernels.Slice`` / ``kernels.Gather``), fixed for a shape.
    """

    pieces: tuple[tuple[int, int], ...]
    indices: tuple[int, ...] | None = None
    pad_lo: int = 0
    pad_hi: int = 0
    rest: CropTable = ()


@dataclass(frozen=True)
class RowWrite:
    """Where one node's new rows go: ``(offset in the strip's value, ring position, rows)``
    pieces, in a storage of ``capacity`` rows along the stream axis (a ring for a row buffer,
    the full extent for a region output)."""

    pieces: tuple[tuple[int, int, int], ...]
    capacity: int
    nsp: int


def _rest_interior(x: torch.Tensor, rest: CropTable, d0: int) -> torch.Tensor:
    """``x`` cut to what the read takes from the map along the non-stream axes."""
    for a, t in enumerate(rest):
        dim = d0 + 1 + a
        if isinstance(t, Gather):
            x = x.index_select(dim, torch.tensor(t.indices, dtype=torch.long, device=x.device))
        elif t.start != 0 or t.stop != x.shape[dim]:
            x = x.narrow(dim, t.start, t.stop - t.start)
    return x


def stream_read(state: dict, strip: Any, consumer: str, producer: str,
                value: float = 0.0) -> torch.Tensor:
    """The window ``consumer`` reads of ``producer`` in this strip, as a contiguous tensor.

    ``state[producer]`` is the producer's storage (a ring of rows, or a full-size map); rows and
    columns off the map are filled with ``value``, the consumer's pad (zeros for a convolution,
    -inf for max pooling). One allocation: the pieces and the padding are written into it.
    """
    src = state[producer]
    r: RowRead = strip.reads[(consumer, producer)]
    d0 = src.dim() - 1 - len(r.rest)
    if r.indices is not None:
        parts = [src.index_select(d0, torch.tensor(r.indices, dtype=torch.long, device=src.device))]
    else:
        parts = [src.narrow(d0, a, b - a) for a, b in r.pieces]
    side = [(t.pad_lo, t.pad_hi) if isinstance(t, Slice) else (0, 0) for t in r.rest]
    fmt = memory_format(src)
    if len(parts) == 1 and not (r.pad_lo or r.pad_hi or any(p for s in side for p in s)):
        x = _rest_interior(parts[0], r.rest, d0)
        # oneDNN convolves strided views through a slow path: a narrowed window is copied.
        return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)
    parts = [_rest_interior(p, r.rest, d0) for p in parts]
    rows = sum(p.shape[d0] for p in parts)
    inner = tuple(parts[0].shape[d0 + 1:]) if parts else tuple(
        (t.stop - t.start) if isinstance(t, Slice) else len(t.indices) for t in r.rest)
    shape = (tuple(src.shape[:d0]) + (r.pad_lo + rows + r.pad_hi,)
             + tuple(n + lo + hi for n, (lo, hi) in zip(inner, side)))
    out = torch.empty(shape, dtype=src.dtype, device=src.device,
                      memory_format=fmt if len(shape) in (4, 5) else torch.contiguous_format)
    # Fill only the padding: slabs along each axis (corners are filled twice, harmlessly).
    for dim, (lo, hi) in zip(range(d0, out.dim()), [(r.pad_lo, r.pad_hi)] + side):
        if lo:
            out.narrow(dim, 0, lo).fill_(value)
        if hi:
            out.narrow(dim, out.shape[dim] - hi, hi).fill_(value)
    dst = out
    for a, (lo, _) in enumerate(side):
        dst = dst.narrow(d0 + 1 + a, lo, inner[a])
    at = r.pad_lo
    for p in parts:
        dst.narrow(d0, at, p.shape[d0]).copy_(p)
        at += p.shape[d0]
    return out


def stream_write(state: dict, strip: Any, name: str, value: torch.Tensor) -> None:
    """Copy node ``name``'s new rows (``value``, this strip's rows at full extent along the
    other axes) into its storage, allocated once per call at its first write."""
    w: RowWrite = strip.writes[name]
    d0 = value.dim() - w.nsp
    buf = state.get(name)
    if buf is None:
        shape = tuple(value.shape[:d0]) + (w.capacity,) + tuple(value.shape[d0 + 1:])
        buf = state[name] = torch.empty(shape, dtype=value.dtype, device=value.device,
                                        memory_format=memory_format(value))
    for off, at, n in w.pieces:
        buf.narrow(d0, at, n).copy_(value.narrow(d0, off, n))


#: The kernels a stage body calls that fx must keep as single opaque nodes (they read the
#: strip's records with plain Python); the rewrite marks their nodes ``meta["is_wrapped"]``, so
#: ``torch.load``'s re-trace keeps them leaves (as ``kernels.LEAF_FUNCTIONS``).
STREAM_LEAF_FUNCTIONS = (stream_read, stream_write)
