"""The runtime kernels a tile body calls: halo crops, tile writes, windowed resampling.

Each kernel takes a tensor (a producer's window) and the tile's :class:`TileWindows`-like
record, whose tables (frozen :class:`Slice` / :class:`Gather` records, computed per input shape
by ``tilefx.tiling.schedule``) say exactly which rows to read and where to pad. Kernels read
those tables with plain Python, so the rewrite keeps every call to one of them as a single
opaque fx node (see :data:`LEAF_FUNCTIONS`).

Nothing here knows about graphs, rules or plans: this is the bottom layer with ``windows``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .errors import TilingError
from .statistics import Accumulator, Statistic

__all__ = ["Slice", "Gather", "halo_crop", "place", "write_tile", "window_interpolate",
           "window_avg_pool", "window_view", "add_channel_bias", "reduce_tile", "norm_apply",
           "group_moments", "conv1x1_matmul", "linear_matmul", "conv1d_native",
           "onednn_convolution", "LEAF_FUNCTIONS"]


@dataclass(frozen=True)
class Slice:
    """Read ``[start, stop)`` of the producer's window on one axis, then pad ``pad_lo`` /
    ``pad_hi`` rows (the read leaves the feature map there) with the consumer's pad value."""

    start: int
    stop: int
    pad_lo: int = 0
    pad_hi: int = 0


@dataclass(frozen=True)
class Gather:
    """Read these rows of the producer's window on one axis (a reflect or replicate read)."""

    indices: tuple[int, ...]


CropTable = tuple[Slice | Gather, ...]


def _index(x: torch.Tensor, idx: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=x.device)


def _crop(x: torch.Tensor, table: CropTable, value: float = 0.0) -> torch.Tensor:
    base = x.dim() - len(table)
    pads = []
    for ax, spec in enumerate(table):
        dim = base + ax
        if isinstance(spec, Gather):
            x = x.index_select(dim, _index(x, spec.indices))
            pads.append((0, 0))
            continue
        if spec.start != 0 or spec.stop != x.shape[dim]:
            x = x.narrow(dim, spec.start, spec.stop - spec.start)
        pads.append((spec.pad_lo, spec.pad_hi))
    if any(p for pair in pads for p in pair):
        flat = [v for pair in reversed(pads) for v in pair]
        return F.pad(x, flat, mode="constant", value=value)
    # oneDNN convolves a strided view through a slow path (a 1x1 convolution of a narrowed
    # window ran ~100x slower than of its contiguous copy); the copy costs a crop's bytes.
    # The copy keeps the producer's layout, so a channels_last network stays channels_last.
    fmt = memory_format(x)
    if not x.is_contiguous(memory_format=fmt):
        x = x.contiguous(memory_format=fmt)
    return x


def halo_crop(x: torch.Tensor, tile: Any, consumer: str, producer: str,
              value: float = 0.0) -> torch.Tensor:
    """Crop ``x`` (``producer``'s window) to what ``consumer`` reads, padding off the map with
    ``value`` (the consumer's pad: zeros for a convolution, -inf for max pooling)."""
    return _crop(x, tile.crops[(consumer, producer)], value)


def place(y: torch.Tensor, tile: Any, name: str) -> torch.Tensor:
    """Cut node ``name``'s own window out of what its op produced (a transposed convolution
    or pixel shuffle produces more rows than the window, or fewer at the map's edge)."""
    return _crop(y, tile.extra[name])


def write_tile(buffers: dict, tile: Any, name: str, value: torch.Tensor) -> None:
    """Copy this tile's piece of region output ``name`` into its full-size buffer."""
    piece = tile.pieces[name]
    part = _crop_view(value, piece.table)
    buf = buffers.get(name)
    if buf is None:
        shape = tuple(value.shape[: value.dim() - len(piece.full)]) + tuple(piece.full)
        buf = buffers[name] = torch.empty(shape, dtype=value.dtype, device=value.device,
                                          memory_format=memory_format(value))
    dst = buf
    base = buf.dim() - len(piece.full)
    for ax, (lo, hi) in enumerate(piece.window):
        dst = dst.narrow(base + ax, lo, hi - lo)
    dst.copy_(part)


def reduce_tile(accumulators: dict, tile: Any, name: str, value: torch.Tensor,
                statistics: tuple[str, ...]) -> None:
    """Fold this tile's owned piece of ``name`` (no halo: owned pieces partition the map) into
    the accumulators of ``statistics`` (``tilefx.statistics.Accumulator``)."""
    part = _crop_view(value, tile.pieces[name].table)
    for s in statistics:
        accumulators[s].add(part)


def group_moments(x: torch.Tensor, groups: int, eps: float, nsp: int) -> torch.Tensor:
    """Group moments of a whole stored map, ``(N, groups, 2)``: mean and 1/sqrt(var + eps),
    accumulated exactly as a multi-pass region's tiles are (float32 or wider, Chan's formula;
    the accumulator takes the map in bands of rows, so a float16 map is never upcast whole).

    >>> x = torch.randn(1, 4, 10, 6)
    >>> var, mean = torch.var_mean(x.view(1, 2, -1), dim=-1, correction=0)
    >>> torch.testing.assert_close(group_moments(x, 2, 1e-5, 2)[..., 0], mean)
    """
    acc = Accumulator(Statistic("moments", groups=groups, eps=eps), nsp)
    acc.add(x)
    return acc.result()


def norm_apply(x: torch.Tensor, moments: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """Normalise ``x`` (a tile window, ``(N, C, *spatial)``) with finished group ``moments``
    (``(N, G, 2)``: mean, 1/sqrt(var + eps)) and the norm's affine ``weight`` and ``bias``.

    Computed as one ``x * scale + shift`` with per-(sample, channel) scale and shift, as
    PyTorch's CPU group norm does; float16 and bfloat16 windows are computed in float32.
    """
    n, c = x.shape[:2]
    g = moments.shape[1]
    mean = moments[..., 0].repeat_interleave(c // g, dim=1)
    scale = moments[..., 1].repeat_interleave(c // g, dim=1)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    shape = (n, c) + (1,) * (x.dim() - 2)
    if x.dtype in (torch.float32, torch.float64):
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))
    return torch.addcmul(shift.view(shape), x.float(), scale.view(shape)).to(x.dtype)


def _crop_view(x: torch.Tensor, table: CropTable) -> torch.Tensor:
    base = x.dim() - len(table)
    for ax, s in enumerate(table):
        x = x.narrow(base + ax, s.start, s.stop - s.start)
    return x


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``t``'s channels are its innermost axis, else contiguous.

    Read from the strides, not from ``is_contiguous(channels_last)``: a halo window narrowed
    out of a channels_last map is contiguous in neither format, yet its channels are still
    innermost. A tensor contiguous in both (a 1x1 window) is NCHW: calling it channels_last
    made a region's output buffers channels_last and sent the rest of an NCHW network down
    oneDNN's channels_last path (ResNet-50@224 on a 7x7 grid: 9.7 -> 18.9 MiB peak).
    """
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() in (4, 5) and t.shape[1] > 1 and t.stride(1) == 1:
        return torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def window_interpolate(x: torch.Tensor, tile: Any, name: str) -> torch.Tensor:
    """Interpolate a window: gather source rows by their global coordinates, then blend.

    Source indices and weights were computed from the global input and output extents (see
    ``windows.Interp.source``), so a tile's output equals the same window of the full output.
    """
    table = tile.extra[name]
    base = x.dim() - len(table)
    for ax, entry in enumerate(table):
        dim = base + ax
        if entry[0] == "aten":
            x = x.index_select(dim, _aten_nearest(x, len(table), ax, *entry[1:]))
            continue
        linear, i0, i1, lam = entry
        a = x.index_select(dim, _index(x, i0))
        if linear:
            b = x.index_select(dim, _index(x, i1))
            shape = [1] * x.dim()
            shape[dim] = -1
            w1 = torch.tensor(lam, dtype=x.dtype, device=x.device).view(shape)
            a = a * (1 - w1) + b * w1
        x = a
    return x


_NEAREST_CACHE: dict[tuple, tuple[int, ...]] = {}


def _aten_nearest(x: torch.Tensor, nsp: int, axis: int, mode: str, scale: float | None,
                  n_in: int, n_out: int, a: int, b: int, t0: int, t1: int) -> torch.Tensor:
    """Local indices of the rows output ``[a, b)`` reads, as ATen itself picks them.

    ATen's nearest index depends on the kernel (rank, dtype, device: it rounds in float32 and
    has shortcuts), so the indices come from interpolating an index ramp with the same rank,
    scale or size, dtype and device, once per key. Reduced-precision ramps are not exact, and
    those kernels compute indices in float32, so they take a float32 ramp.
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    key = (mode, scale, n_in, n_out, nsp, axis, dtype, x.device)
    full = _NEAREST_CACHE.get(key)
    if full is None:
        shape = [1] * nsp
        shape[axis] = n_in
        # Real tensors even inside a FakeTensorMode (the memory simulator fake-runs bodies):
        # the indices are data, read back with tolist().
        with unset_fake_temporarily():
            ramp = torch.arange(n_in, dtype=dtype, device=x.device).view(1, 1, *shape)
            if scale is not None:
                sf = [1.0] * nsp
                sf[axis] = scale
                y = F.interpolate(ramp, scale_factor=sf, mode=mode)
            else:
                size = [1] * nsp
                size[axis] = n_out
                y = F.interpolate(ramp, size=size, mode=mode)
            full = _NEAREST_CACHE[key] = tuple(int(v) for v in y.reshape(-1).tolist())
    idx = full[a:b]
    if any(not t0 <= i < t1 for i in idx):  # in_window is too narrow: never read a wrong row
        raise TilingError(
            f"nearest interpolation reads rows {min(idx)}..{max(idx)} outside the tile's window "
            f"[{t0}, {t1}) (axis {axis}, {n_in} -> {n_out}); please report this as a tilefx bug"
        )
    return torch.tensor([i - t0 for i in idx], dtype=torch.long, device=x.device)


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def window_avg_pool(x: torch.Tensor, tile: Any, name: str, kernel_size: tuple,
                    stride: tuple, divisor_override: int | None) -> torch.Tensor:
    """Average pooling of a zero-padded window, with PyTorch's divisor at the map's edges."""
    fn = _AVG_POOL[len(kernel_size)]
    mask = tile.extra.get(name)
    y = fn(x, kernel_size, stride, 0)
    if divisor_override:
        return y * (math.prod(kernel_size) / divisor_override)
    if mask is None:
        return y
    m = torch.ones((), dtype=x.dtype, device=x.device)
    for axis in mask:
        m = m.unsqueeze(-1) * torch.tensor(axis, dtype=x.dtype, device=x.device)
    m = m.reshape((1,) * (x.dim() - len(mask)) + m.shape)
    return y / fn(m, kernel_size, stride, 0)


def window_view(x: torch.Tensor, channel_shape: tuple[int, ...], nsp: int) -> torch.Tensor:
    """Regroup the channel axes of a window, keeping its batch and spatial axes."""
    return x.reshape(x.shape[0], *channel_shape, *x.shape[x.dim() - nsp:])


def add_channel_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return y
    return y + bias.view(1, -1, *([1] * (y.dim() - 2)))


# --------------------------------------------------------------------------- primitives
# Explicit convolution and linear primitives (tilefx.primitives names them, passes.primitives
# emits them). Each computes its op exactly, to floating-point rounding.


def conv1x1_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: tuple[int, ...]) -> torch.Tensor:
    """A 1x1 convolution (groups 1, no padding) as one matrix product over positions.

    No weight reorder: the ``(C_out, C_in, 1, ...)`` weight is read as a ``(C_out, C_in)``
    matrix in place. A stride reads every ``s``-th position (exact for a 1x1 kernel), which
    copies the strided input once. The output keeps the input's layout (channels_last in,
    channels_last out), as a convolution's does.
    """
    if any(s != 1 for s in stride):
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    w = weight.reshape(weight.shape[0], c)
    # bmm and mm, not matmul: torch.matmul does not fold a batch of positions into one product
    # when the weight requires grad (an nn.Parameter does, under no_grad too) and copies the
    # whole input instead (RegNetY-400MF @1024: 6.5 MiB more than planned, a copy per image).
    if memory_format(x) is torch.contiguous_format:
        y = torch.bmm(w.expand(n, -1, -1), x.reshape(n, c, -1)).view(n, -1, *spatial)
    else:  # channels innermost: (N x positions, C_in) @ (C_in, C_out)
        rank = x.dim()
        y = torch.mm(x.permute(0, *range(2, rank), 1).reshape(-1, c), w.t())
        y = y.view(n, *spatial, -1).permute(0, rank - 1, *range(1, rank - 1))
    if bias is not None:
        y.add_(bias.view((1, -1) + (1,) * len(spatial)))  # in place: the product is a fresh tensor
    return y


def linear_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` as a plain matrix product with the transposed weight (no packed weight)."""
    y = torch.matmul(x, weight.t())
    if bias is not None:
        y.add_(bias)
    return y


def conv1d_native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride: tuple[int], padding: tuple[int], dilation: tuple[int]) -> torch.Tensor:
    """A 1-d convolution on ATen's native (non-oneDNN) kernels, as ATen itself runs one: as
    a 2-d convolution over a height-1 map."""
    aten = torch.ops.aten
    k = [1, weight.shape[-1]]
    x2, w2 = x.unsqueeze(2), weight.unsqueeze(2)
    if dilation[0] == 1:
        y = aten._slow_conv2d_forward(x2, w2, k, bias, [1, stride[0]], [0, padding[0]])
    else:
        y = aten.slow_conv_dilated2d(x2, w2, k, bias, [1, stride[0]], [0, padding[0]],
                                     [1, dilation[0]])
    return y.squeeze(2)


@torch.library.custom_op("tilefx::onednn_convolution", mutates_args=())
def onednn_convolution(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       stride: list[int], padding: list[int], dilation: list[int],
                       groups: int) -> torch.Tensor:
    """A convolution on oneDNN, whatever ATen's dispatch would pick for it.

    An op of its own (``torch.ops.tilefx.onednn_convolution``) rather than a call of
    ``mkldnn._convolution_pointwise`` in the graph: that op's fake kernel says its output is
    always channels-last (as inductor, its author, makes it), while the real kernel keeps an
    NCHW input's layout. Fake runs (the memory model, ``torch.compile``) must see the layout
    the call really returns.
    """
    return torch.ops.mkldnn._convolution_pointwise(input, weight, bias, padding, stride, dilation,
                                                   groups, "none", [], "")


@onednn_convolution.register_fake
def _(input, weight, bias, stride, padding, dilation, groups):
    sp = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(
        input.shape[2:], weight.shape[2:], stride, padding, dilation)]
    out = input.new_empty((input.shape[0], weight.shape[0], *sp))
    fmt = memory_format(input)
    if fmt is torch.contiguous_format:
        fmt = memory_format(weight)  # oneDNN goes channels-last for either operand
    return out if fmt is torch.contiguous_format else out.contiguous(memory_format=fmt)


# The kernels a graph calls. Tile kernels read ``tile`` tables with plain Python (len, loops),
# and a primitive kernel is the primitive the memory model recognises by its target, so fx
# must keep each call as one opaque node: the rewrites mark those nodes
# ``meta["is_wrapped"]``, what ``torch.fx.wrap`` marks on the nodes it traces. The body's code
# then starts with ``wrap("<kernel>")`` lines, so when ``torch.load`` (GraphModule.__reduce__)
# re-traces that code, the kernels stay leaves instead of being traced into.
LEAF_FUNCTIONS = (halo_crop, place, write_tile, window_interpolate, window_avg_pool, window_view,
                  add_channel_bias, reduce_tile, norm_apply, group_moments, conv1x1_matmul,
                  linear_matmul, conv1d_native)
