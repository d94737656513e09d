"""TiledRegion: the runtime tile loop over a region's body, with per-shape schedules.

A :class:`TiledRegion` is an ``nn.Module`` whose ``body`` is an fx ``GraphModule`` computing one
tile. The body's graph shows every halo crop as an explicit ``kernels.halo_crop`` node, and every
region output as a ``kernels.write_tile`` node that copies the tile's piece into a preallocated
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
from torch import nn

from .errors import TilingError
from .statistics import Accumulator, Statistic
from .tiling import RegionSpec, Schedule, extents, min_input_extent, schedule

__all__ = ["TiledRegion"]


class TiledRegion(nn.Module):
    """Runs a region of a network tile by tile and returns its full-size outputs.

    ``body`` computes one tile; ``spec`` holds the region's facts (rules, inputs, outputs,
    tile grid). With ``halo=False`` (the approximate "splitting image" mode) each tile runs
    the region's original ops on its piece of the input with no halo, as if the piece were a
    whole image; ``approx_body`` is that region graph.
    """

    def __init__(self, body: torch.fx.GraphModule, spec: RegionSpec, spatial_args: tuple[int, ...],
                 approx_body: torch.fx.GraphModule | None = None, halo: bool = True,
                 writes: tuple[str, ...] | None = None,
                 statistics: tuple[tuple[str, Statistic], ...] = ()):
        super().__init__()
        self.body = body
        self.approx_body = approx_body
        self.spec = spec
        self.spatial_args = spatial_args
        self.halo = halo
        # A pass of a multi-pass region writes some of ``spec.outputs`` (none but in the last
        # pass) and accumulates statistics over the others' owned pieces.
        self.writes = spec.outputs if writes is None else writes
        self.statistics = statistics
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
        stats = f", statistics={[n for n, _ in self.statistics]}" if self.statistics else ""
        return (f"grid={self.spec.grid}, nodes={len(self.spec.nodes)}, "
                f"outputs={list(self.writes)}{stats}, halo={self.halo}")

    def input_sizes(self, args: tuple) -> dict[str, tuple[int, ...]]:
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
        sizes = self.input_sizes(args)
        if not self.halo:
            return self._forward_approx(args, sizes)
        sched = self.schedule_for(sizes)
        buffers = self.new_buffers()
        for tile in sched.tiles:
            self.body(*args, buffers, tile)
        return self.results(buffers)

    def new_buffers(self) -> dict[str, Any]:
        """What the tiles write into: the output buffers (allocated by the first tile that
        writes each) and an accumulator per statistic this pass finds."""
        return {n: Accumulator(stat, self.spec.nsp) for n, stat in self.statistics}

    def results(self, buffers: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The call's results once every tile ran: the outputs it writes, then its statistics."""
        return (tuple(buffers[o] for o in self.writes)
                + tuple(buffers[n].result() for n, _ in self.statistics))

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
