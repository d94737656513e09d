"""Per-axis window maps: which input interval an output interval reads.

These are the facts a receptive-field rule is made of. Each map is an affine-like object in
the spirit of TVM's cascader propagators: given an output window ``[a, b)`` on one spatial axis,
the global input length and the global output length, it returns the input window the op
reads, and it knows the op's output length for an input length. Windows are half-open integer
intervals in the tensor's own coordinates; an input window may reach outside ``[0, n_in)``,
where the op's pad semantics fill it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import TilingError

__all__ = ["Affine", "Interp", "Transposed", "AxisMap", "IDENTITY"]


@dataclass(frozen=True)
class Affine:
    """A sliding window: kernel ``k``, stride ``s``, left pad ``p``, right pad ``pr``, dilation ``d``.

    Output ``[a, b)`` reads input ``[a*s - p, (b-1)*s - p + d*(k-1) + 1)``. Pointwise ops are
    ``Affine()`` (the identity); a pad op is ``Affine(p=left, pr=right)``.
    """

    k: int = 1
    s: int = 1
    p: int = 0
    pr: int = 0
    d: int = 1
    ceil_mode: bool = False

    def out_len(self, n: int) -> int:
        span = n + self.p + self.pr - self.d * (self.k - 1) - 1
        if span < 0:
            return 0
        if not self.ceil_mode:
            return span // self.s + 1
        out = -(-span // self.s) + 1
        # PyTorch's pooling rule: the last window must start inside the input or the left pad.
        if (out - 1) * self.s >= n + self.p:
            out -= 1
        return out

    def in_window(self, a: int, b: int, n_in: int, n_out: int) -> tuple[int, int]:
        return a * self.s - self.p, (b - 1) * self.s - self.p + self.d * (self.k - 1) + 1

    @property
    def is_identity(self) -> bool:
        return self == IDENTITY


IDENTITY = Affine()


@dataclass(frozen=True)
class Transposed:
    """A transposed convolution: output ``o`` gathers inputs ``i`` with ``o = i*s - p + j*d``."""

    k: int
    s: int = 1
    p: int = 0
    d: int = 1
    output_padding: int = 0

    def out_len(self, n: int) -> int:
        return (n - 1) * self.s - 2 * self.p + self.d * (self.k - 1) + self.output_padding + 1

    def in_window(self, a: int, b: int, n_in: int, n_out: int) -> tuple[int, int]:
        lo = -((self.d * (self.k - 1) - a - self.p) // self.s)  # ceil((a + p - d(k-1)) / s)
        hi = (b - 1 + self.p) // self.s + 1
        lo, hi = max(lo, 0), min(hi, n_in)  # inputs outside the map contribute nothing
        if hi <= lo:  # only output padding or bias reaches this window: read one row anyway
            lo = min(lo, n_in - 1)
            hi = lo + 1
        return lo, hi

    def produced(self, lo: int, hi: int) -> tuple[int, int]:
        """The output window a padding-free transposed conv of input ``[lo, hi)`` produces."""
        return lo * self.s - self.p, (hi - 1) * self.s - self.p + self.d * (self.k - 1) + 1


@dataclass(frozen=True)
class Interp:
    """Interpolation (``F.interpolate`` / ``nn.Upsample``) along one axis.

    ``mode`` is ``"nearest"``, ``"nearest-exact"`` or ``"linear"`` (the per-axis part of
    bilinear and trilinear), or ``"block"`` (pixel shuffle: output ``d`` reads input
    ``d // scale``, exactly). ``scale`` is the user's scale factor when the op was given one
    (PyTorch then maps coordinates with ``1/scale``), else None (it uses ``n_in/n_out``).
    ``size`` is a fixed output length, when the op was given one.

    ATen computes nearest source indices in the tensor's own floating type (``float32`` for
    float tensors, with shortcuts for equal and doubled sizes in some kernels), so its index can
    differ by one from the exact quotient. :meth:`source` is the exact quotient;
    :meth:`in_window` covers both, and the tile body takes ATen's own indices at run time
    (``region.window_interpolate``).
    """

    mode: str
    align_corners: bool = False
    scale: float | None = None
    size: int | None = None
    traced_in: int | None = None  # with ``size``: the input length the size was fixed for

    def out_len(self, n: int) -> int:
        if self.size is not None:
            if self.traced_in is not None and n != self.traced_in:
                raise TilingError(
                    f"an interpolation in the region has its output size {self.size} fixed at "
                    f"trace time for input length {self.traced_in}, and this input gives "
                    f"{n}; call tilefx.transform again with an example of this shape"
                )
            return self.size
        return int(math.floor(n * self.scale))

    def _ratio(self, n_in: int, n_out: int) -> float:
        if self.mode == "linear" and self.align_corners:
            return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        if self.scale is not None:
            return 1.0 / self.scale
        return n_in / n_out

    def source(self, dst: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        """The two input indices output ``dst`` blends and the weight of the second.

        Mirrors ATen's ``area_pixel_compute_source_index`` and ``nearest_idx`` (computed in
        float64 here; ATen uses the tensor's accumulate type, so results agree to rounding).
        """
        if self.mode == "block":
            return dst // round(self.scale), dst // round(self.scale), 0.0
        if self.mode == "linear" and n_out == n_in:
            return dst, dst, 0.0  # ATen copies an axis whose size does not change
        r = self._ratio(n_in, n_out)
        if self.mode == "nearest":
            i = min(int(math.floor(dst * r)), n_in - 1)
            return i, i, 0.0
        if self.mode == "nearest-exact":
            i = min(int(math.floor((dst + 0.5) * r)), n_in - 1)
            return i, i, 0.0
        src = dst * r if self.align_corners else max((dst + 0.5) * r - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    def in_window(self, a: int, b: int, n_in: int, n_out: int) -> tuple[int, int]:
        lo = self.source(a, n_in, n_out)[0]
        hi = self.source(b - 1, n_in, n_out)[1] + 1
        if self.mode in ("nearest", "nearest-exact"):
            # One more row each side for ATen's rounding, and the rows of its shortcuts.
            lo, hi = lo - 1, hi + 1
            if n_out == n_in:
                lo, hi = min(lo, a), max(hi, b)
            elif n_out == 2 * n_in:
                lo, hi = min(lo, a // 2), max(hi, (b - 1) // 2 + 1)
            lo, hi = max(lo, 0), min(hi, n_in)
        return lo, hi


AxisMap = Affine | Transposed | Interp
