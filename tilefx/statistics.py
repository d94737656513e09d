"""Statistics over the whole map, accumulated tile by tile: what they are and how they combine.

A multi-pass region (``passes.tile_rewrite`` with ``multipass=True``) splits every reduction over
space into a **statistic**, accumulated over each tile's *owned* piece of its source (the owned
pieces partition the map, so halos are never counted twice), and an **application** that is
pointwise once the statistic is known (the tile body calls ``kernels.reduce_tile`` on each
owned piece):

* ``group_norm``, ``instance_norm`` (input statistics) and ``layer_norm`` over space without an
  affine (one group per channel, or one per sample over channels and space): per (sample,
  group) count, mean and M2, combined with Chan's parallel formula, never by averaging
  per-tile variances; applied by ``kernels.norm_apply``, a per-channel affine map;
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

__all__ = ["Statistic", "Accumulator", "combine_moments", "describe", "KINDS"]

#: Statistic kinds: ``moments`` (mean and 1/sqrt(var + eps) per sample and group), and the
#: reductions whose result is the op's own output.
KINDS = ("moments", "mean", "sum", "amax", "amin")


#: Elements per call of the moments kernel (a band of a piece's rows): its copy and output stay
#: at 512 KiB in float32 whatever the tile (2**16 ran 1.6x slower on 128x128x32 pieces, 2**18
#: no faster).
MOMENTS_BAND_ELEMENTS = 1 << 17


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


def combine_moments(na: int, mean_a: torch.Tensor, m2_a: torch.Tensor, nb: int,
                    mean_b: torch.Tensor, m2_b: torch.Tensor) -> tuple:
    """Chan et al.'s parallel combination of two pieces' (count, mean, M2): exact, and the
    between-piece term ``delta^2 * na * nb / n`` is what averaging per-tile variances drops.

    >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 12.0, 14.0])
    >>> n, mean, m2 = combine_moments(2, a.mean(), a.var(correction=0) * 2,
    ...                               3, b.mean(), b.var(correction=0) * 3)
    >>> x = torch.cat([a, b]); round(float(m2 / n), 4) == round(float(x.var(correction=0)), 4)
    True
    """
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + delta * delta * (na * nb / n)


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
            # Bands of rows, each through ATen's group norm kernel (a vectorised Welford per
            # sample and group, the kernel the eager norm runs; its normalised output is
            # dropped), combined with Chan's formula. torch.var_mean's reduction ran 15x slower
            # on CPU (1.2 ms for a 256x256x8 piece: a third of SegResNet's multi-pass time);
            # bands keep the kernel's contiguous copy and output small.
            axis = piece.dim() - nsp
            rows = piece.shape[axis]
            per_row = max(1, piece.numel() // max(rows, 1))
            band = max(1, min(rows, MOMENTS_BAND_ELEMENTS // per_row))
            for lo in range(0, rows, band):
                self._add_moments(piece.narrow(axis, lo, min(band, rows - lo)))
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

    def _add_moments(self, piece: torch.Tensor) -> None:
        n, c = piece.shape[:2]
        positions = math.prod(piece.shape[2:])
        if positions == 0:
            return
        x = piece.to(_acc_dtype(piece)).contiguous()  # float16 and bfloat16 are upcast
        groups = self.stat.groups
        _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, positions, groups, 0.0)
        count = (c // groups) * positions
        # eps 0: rstd = 1/sqrt(var), infinite for a constant group (var 0)
        mean, m2 = mean.double(), rstd.double().pow(-2) * count
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        self.count, self.mean, self.m2 = combine_moments(self.count, self.mean, self.m2,
                                                         count, mean, m2)

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
