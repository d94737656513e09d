"""Statistics over the whole map, accumulated tile by tile: what they are and how they combine.

A multi-pass region (``passes.tile_rewrite`` with ``multipass=True``) splits every reduction over
space into a **statistic**, accumulated over each tile's *owned* piece of its source (the owned
pieces partition the map, so halos are never counted twice), and an **application** that is
pointwise once the statistic is known (the tile body calls ``kernels.reduce_tile`` on each
owned piece):

* ``group_norm`` and ``instance_norm`` (input statistics): per (sample, group) count, mean and
  M2, combined with Chan's parallel formula, never by averaging per-tile variances; applied by
  ``kernels.norm_apply``, a per-channel affine map;
* a mean, sum, amax or amin over every spatial axis (squeeze-and-excitation, global pooling):
  per-tile sums (or extrema), combined exactly; the result is the reduction's own output, which
  the rest of the graph reads as before.

Accumulators work in float32 per tile (float64 for float64 models; float16 and bfloat16 tiles
are upcast) and combine tiles in float64. Nothing here knows about graphs: ``rules`` attaches a
:class:`Statistic` to the barrier of each op it can split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

__all__ = ["Statistic", "Accumulator", "describe", "KINDS"]

#: Statistic kinds: ``moments`` (mean and 1/sqrt(var + eps) per sample and group), and the
#: reductions whose result is the op's own output.
KINDS = ("moments", "mean", "sum", "amax", "amin")


@dataclass(frozen=True)
class Statistic:
    """A statistic over every spatial axis of one tensor.

    ``kind``: one of :data:`KINDS`. ``groups`` (moments): channel groups, each normalised by
    its own mean and variance (``groups == channels`` for instance norm). ``eps`` (moments):
    added to the variance. ``keepdim`` (reductions): the op keeps the spatial axes as size 1
    (``mean(dim=(2, 3), keepdim=True)``, adaptive pooling to 1x1); ``dtype`` (reductions): the
    op's result dtype where it differs from its input's (``mean(..., dtype=torch.float32)``).
    Shapes come from the tiles at run time, so the statistic holds at any input shape.
    """

    kind: str
    groups: int = 1
    eps: float = 0.0
    keepdim: bool = False
    dtype: torch.dtype | None = None


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Accumulator:
    """The running value of one statistic over the tiles a region has run so far.

    >>> x = torch.randn(2, 4, 6, 6)
    >>> acc = Accumulator(Statistic("moments", groups=2, eps=1e-5), nsp=2)
    >>> for piece in (x[..., :2, :], x[..., 2:, :3], x[..., 2:, 3:]):
    ...     acc.add(piece)
    >>> var, mean = torch.var_mean(x.view(2, 2, -1), dim=-1, correction=0)
    >>> torch.testing.assert_close(acc.result()[..., 0], mean)
    >>> torch.testing.assert_close(acc.result()[..., 1], (var + 1e-5).rsqrt())
    """

    def __init__(self, stat: Statistic, nsp: int):
        self.stat = stat
        self.nsp = nsp
        self.count = 0
        self.mean: torch.Tensor | None = None  # moments; or the running sum / extremum
        self.m2: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None  # the source's

    def add(self, piece: torch.Tensor) -> None:
        """Fold in one tile's owned piece of the source (``(N, C, *spatial)``)."""
        stat, nsp = self.stat, self.nsp
        dims = tuple(range(piece.dim() - nsp, piece.dim()))
        self.dtype = piece.dtype
        if stat.kind == "moments":
            n, c = piece.shape[:2]
            x = piece.to(_acc_dtype(piece)).reshape(n, stat.groups, c // stat.groups, -1)
            var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
            count = x.shape[2] * x.shape[3]
            mean, m2 = mean.double(), var.double() * count
            if self.mean is None:
                self.count, self.mean, self.m2 = count, mean, m2
                return
            # Chan et al.: the between-piece term delta^2 * na * nb / n is what averaging
            # per-tile variances drops.
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
            self.count = total
            return
        self.count += math.prod(piece.shape[-nsp:])
        if stat.kind in ("mean", "sum"):
            part = piece.sum(dim=dims, dtype=_acc_dtype(piece)).double()
            self.mean = part if self.mean is None else self.mean + part
        else:
            part = piece.amax(dim=dims) if stat.kind == "amax" else piece.amin(dim=dims)
            if self.mean is None:
                self.mean = part
            else:
                self.mean = (torch.maximum if stat.kind == "amax" else torch.minimum)(self.mean, part)

    def result(self) -> torch.Tensor:
        """The finished statistic: ``(N, groups, 2)`` mean and reciprocal standard deviation
        (moments, float32 or float64), or the reduction's output in its shape and dtype."""
        if self.mean is None:
            raise RuntimeError("a statistic with no tiles")  # pragma: no cover - grids are >= 1
        stat = self.stat
        if stat.kind == "moments":
            var = (self.m2 / self.count).clamp_min(0.0)
            out = torch.stack([self.mean, (var + stat.eps).rsqrt()], dim=-1)
            return out.to(torch.float64 if self.dtype == torch.float64 else torch.float32)
        value = self.mean / self.count if stat.kind == "mean" else self.mean
        if stat.keepdim:
            value = value.reshape(value.shape + (1,) * self.nsp)
        return value.to(stat.dtype or self.dtype)


def describe(stat: Statistic) -> str:
    """A short human-readable name of ``stat`` (for ``explain``)."""
    if stat.kind == "moments":
        return f"mean and variance over space per sample and group ({stat.groups} groups)"
    return f"{stat.kind} over space"
