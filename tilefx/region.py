"""TiledRegion: the runtime tile loop, halo crops and region-output buffers.

A :class:`TiledRegion` is an ``nn.Module`` whose ``body`` is an fx ``GraphModule`` computing one
tile. The body's graph shows every halo crop as an explicit :func:`halo_crop` node, and every
region output as a :func:`write_tile` node that copies the tile's piece into a preallocated
full-size buffer. Windows depend on the input shape, so :meth:`TiledRegion.schedule_for`
computes them per shape and caches them; the same module runs on any input at least as large as
its grid allows.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import TilingError
from .spatial import window_fn
from .tiling import RegionSpec, Schedule, TileWindows, extents, min_input_extent, schedule

__all__ = ["TiledRegion", "halo_crop", "write_tile", "window_interpolate", "window_avg_pool",
           "window_view", "add_channel_bias", "LEAF_FUNCTIONS"]


def _index(x: torch.Tensor, idx: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=x.device)


def halo_crop(x: torch.Tensor, tile: TileWindows, key: str, mode: str = "constant",
              value: float = 0.0) -> torch.Tensor:
    """Crop ``x`` (a producer's window) to what one consumer reads, padding off the map.

    The crop table of ``key`` in ``tile`` gives, per spatial axis, a slice and the pads
    where the read leaves the feature map (``mode``/``value`` are the consumer's pad
    semantics), or the indices of a reflect/replicate read.
    """
    table = tile.crops[key]
    nsp = len(table)
    base = x.dim() - nsp
    pads = []
    for ax, spec in enumerate(table):
        dim = base + ax
        if spec[0] == "index":
            x = x.index_select(dim, _index(x, spec[1]))
            pads.append((0, 0))
            continue
        _, start, stop, plo, phi = spec
        if start != 0 or stop != x.shape[dim]:
            x = x.narrow(dim, start, stop - start)
        pads.append((plo, phi))
    if any(p for pair in pads for p in pair):
        flat = [v for pair in reversed(pads) for v in pair]
        x = F.pad(x, flat, mode="constant", value=value)
    else:
        # oneDNN convolves a strided view through a slow path (a 1x1 convolution of a narrowed
        # window ran ~100x slower than of its contiguous copy); the copy costs a crop's bytes.
        # The copy keeps the producer's layout, so a channels_last network stays channels_last.
        fmt = _memory_format(x)
        if not x.is_contiguous(memory_format=fmt):
            x = x.contiguous(memory_format=fmt)
    return x


def write_tile(buffers: dict, tile: TileWindows, name: str, value: torch.Tensor) -> None:
    """Copy this tile's piece of region output ``name`` into its full-size buffer."""
    piece, table, full = tile.pieces[name]
    part = _slice(value, table)
    buf = buffers.get(name)
    if buf is None:
        shape = tuple(value.shape[: value.dim() - len(full)]) + tuple(full)
        buf = buffers[name] = torch.empty(shape, dtype=value.dtype, device=value.device,
                                          memory_format=_memory_format(value))
    dst = buf
    base = buf.dim() - len(full)
    for ax, (lo, hi) in enumerate(piece):
        dst = dst.narrow(base + ax, lo, hi - lo)
    dst.copy_(part)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
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


def _slice(x: torch.Tensor, table: tuple) -> torch.Tensor:
    base = x.dim() - len(table)
    for ax, (_, start, stop, _, _) in enumerate(table):
        x = x.narrow(base + ax, start, stop - start)
    return x


def window_interpolate(x: torch.Tensor, tile: TileWindows, name: str) -> torch.Tensor:
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


def window_avg_pool(x: torch.Tensor, tile: TileWindows, name: str, kernel_size: tuple,
                    stride: tuple, divisor_override: int | None) -> torch.Tensor:
    """Average pooling of a zero-padded window, with PyTorch's divisor at the map's edges."""
    # The pooling function is looked up here, not passed in: fx cannot print a builtin
    # (F.avg_pool2d) as a node argument, so a body graph holding one would not compile.
    fn = window_fn("avgpool", len(kernel_size))
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


# The runtime helpers a tile body calls. They read ``tile`` tables with plain Python (len,
# loops), so fx must keep each call as one opaque node: the rewrite marks those nodes
# ``meta["is_wrapped"]``, what ``torch.fx.wrap`` marks on the nodes it traces. The body's code
# then starts with ``wrap("<helper>")`` lines, so when ``torch.load`` (GraphModule.__reduce__)
# re-traces that code, the helpers stay leaves instead of being traced into.
LEAF_FUNCTIONS = (halo_crop, write_tile, window_interpolate, window_avg_pool, window_view,
                  add_channel_bias)


class TiledRegion(nn.Module):
    """Runs a region of a network tile by tile and returns its full-size outputs.

    ``body`` computes one tile; ``spec`` holds the region's facts (rules, inputs, outputs,
    tile grid). With ``halo=False`` (the approximate "splitting image" mode) each tile runs
    the region's original ops on its piece of the input with no halo, as if the piece were a
    whole image; ``approx_body`` is that region graph.
    """

    def __init__(self, body: torch.fx.GraphModule, spec: RegionSpec, spatial_args: tuple[int, ...],
                 approx_body: torch.fx.GraphModule | None = None, halo: bool = True):
        super().__init__()
        self.body = body
        self.approx_body = approx_body
        self.spec = spec
        self.spatial_args = spatial_args
        self.halo = halo
        self._schedules: dict[Any, Schedule] = {}

    def __getstate__(self) -> dict[str, Any]:
        # The per-shape schedules are a cache (rebuilt on first use), not state: pickling
        # them would grow a saved module by every shape it has run on.
        state = super().__getstate__()
        return {**state, "_schedules": {}}

    @property
    def grid(self) -> tuple[int, ...]:
        return self.spec.grid

    def extra_repr(self) -> str:
        return (f"grid={self.spec.grid}, nodes={len(self.spec.nodes)}, "
                f"outputs={list(self.spec.outputs)}, halo={self.halo}")

    def _input_sizes(self, args: tuple) -> dict[str, tuple[int, ...]]:
        nsp = self.spec.nsp
        sizes = {}
        for name, i in zip(self.spec.inputs, self.spatial_args):
            x = args[i]
            if x.dim() < nsp + 2:
                raise TilingError(
                    f"tiled region input {name} has shape {tuple(x.shape)}; it needs (N, C, *spatial) "
                    f"with {nsp} spatial axes as at transform time"
                )
            sizes[name] = tuple(x.shape[-nsp:])
        return sizes

    def schedule_for(self, input_sizes: dict[str, tuple[int, ...]]) -> Schedule:
        """The (cached) windows of every tile for these input extents."""
        key = tuple(sorted(input_sizes.items()))
        sched = self._schedules.get(key)
        if sched is None:
            extents(self.spec, input_sizes)  # shape errors of the rules themselves first
            try:
                sched = schedule(self.spec, input_sizes)
            except TilingError as e:
                minimum = min_input_extent(self.spec, input_sizes)
                raise TilingError(
                    f"{e}. The smallest input this tile grid {self.spec.grid} fits is spatial "
                    f"extent {minimum}; got {tuple(input_sizes.values())[0]}"
                ) from None
            self._schedules[key] = sched
        return sched

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        sizes = self._input_sizes(args)
        if not self.halo:
            return self._forward_approx(args, sizes)
        sched = self.schedule_for(sizes)
        buffers: dict[str, torch.Tensor] = {}
        for tile in sched.tiles:
            self.body(*args, buffers, tile)
        return tuple(buffers[o] for o in self.spec.outputs)

    # ------------------------------------------------------------------ approximate mode

    def _forward_approx(self, args: tuple, sizes: dict[str, tuple[int, ...]]) -> tuple:
        """Tiles with no halo, each padded as if it were the whole image (not exact)."""
        spec = self.spec
        full = extents(spec, sizes)
        first = spec.inputs[0]
        n_in = sizes[first]
        # Input pieces aligned to the coarsest output's stride, so pieces' outputs abut.
        coarsest = min(spec.outputs, key=lambda o: math.prod(full[o]))
        bounds = []
        for ax, (L, t) in enumerate(zip(n_in, spec.grid)):
            stride = max(L // max(full[coarsest][ax], 1), 1)
            cuts = sorted({0, L, *(round(j * L / t / stride) * stride for j in range(1, t))})
            bounds.append([(a, b) for a, b in zip(cuts, cuts[1:]) if b > a])
        outs: dict[str, torch.Tensor] = {}
        for index in itertools.product(*(range(len(b)) for b in bounds)):
            piece = [bounds[ax][j] for ax, j in enumerate(index)]
            sub = list(args)
            for i in self.spatial_args:
                x = args[i]
                for ax, (a, b) in enumerate(piece):
                    x = x.narrow(x.dim() - spec.nsp + ax, a, b - a)
                sub[i] = x
            ys = self.approx_body(*sub)
            for o, y in zip(spec.outputs, ys):
                start = []
                for ax, (a, _) in enumerate(piece):
                    before = dict(sizes)
                    before[first] = tuple(a if k == ax else n_in[k] for k in range(spec.nsp))
                    start.append(extents(spec, before)[o][ax] if a > 0 else 0)
                buf = outs.get(o)
                if buf is None:
                    buf = outs[o] = y.new_zeros(tuple(y.shape[: y.dim() - spec.nsp]) + full[o])
                dst = buf
                for ax, s0 in enumerate(start):
                    dim = buf.dim() - spec.nsp + ax
                    n = min(y.shape[dim], buf.shape[dim] - s0)
                    dst = dst.narrow(dim, s0, n)
                    y = y.narrow(dim, 0, n)
                dst.copy_(y)
        return tuple(outs[o] for o in spec.outputs)
