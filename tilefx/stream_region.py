"""StreamRegion: the runtime strip loop of a streaming region, with per-shape schedules.

A :class:`StreamRegion` is an ``nn.Module`` holding one fx ``GraphModule`` per stage
(``tilefx.streaming``: a node and the pointwise chain after it that computes the same rows).
A stage body shows every row-buffer read as an explicit ``stream_kernels.stream_read`` node (the
window its op reads, padded only where the window leaves the map, with the op's own pad), the
op on that window, and one ``stream_kernels.stream_write`` that copies the stage's new rows
into its row buffer or full-size output. Schedules depend on the input shape, so
:meth:`StreamRegion.schedule_for` computes them per shape and caches them (the cache is not
pickled).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import TilingError
from .streaming import StreamSchedule, StreamSpec, strip_schedule

__all__ = ["StreamRegion"]


class StreamRegion(nn.Module):
    """Runs a region strip by strip, every row of every node once; returns its full-size outputs.

    ``stages``: one body per ``spec.stages`` entry, each called as
    ``body(*region_inputs, state, strip)``; ``state`` maps names to storages (the region's
    spatial inputs, row buffers, output buffers), ``strip`` is the strip's record
    (:class:`tilefx.streaming.Strip`). ``spatial_args`` are the positions of the spatial inputs
    (``spec.region.inputs``) among the call's arguments.

    >>> import torch, tilefx
    >>> from tilefx.passes.stream_rewrite import stream_rewrite
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                         torch.nn.Conv2d(4, 2, 3, padding=1)).eval()
    >>> x = torch.randn(1, 3, 32, 32)
    >>> region = stream_rewrite(tilefx.prepare(m, x), "output", strip=8).stream_region_0
    >>> region.extra_repr()
    "strip=8 rows, nodes=3, stages=2, outputs=['conv2d_1']"
    >>> sched = region.schedule_for({"input_1": (32, 32)})
    >>> sched.carried["relu"], sched.capacity["relu"]   # the 2 rows a 3x3 reads back, twice
    (2, 4)
    """

    def __init__(self, stages: list[torch.fx.GraphModule], spec: StreamSpec,
                 spatial_args: tuple[int, ...], position_bytes: dict[str, float] | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.spec = spec
        self.spatial_args = spatial_args
        #: bytes per spatial position of each stored node at the traced batch and dtype (what
        #: ``explain`` reports buffer sizes in)
        self.position_bytes = dict(position_bytes or {})
        self._schedules: dict[Any, StreamSchedule] = {}

    def __getstate__(self) -> dict[str, Any]:
        # The per-shape schedules are a cache (rebuilt on first use), not state.
        state = super().__getstate__()
        return {**state, "_schedules": {}}

    @property
    def strip(self) -> int:
        return self.spec.strip

    def extra_repr(self) -> str:
        return (f"strip={self.spec.strip} rows, nodes={len(self.spec.nodes)}, "
                f"stages={len(self.spec.stages)}, outputs={list(self.spec.outputs)}")

    def input_sizes(self, args: tuple) -> dict[str, tuple[int, ...]]:
        nsp = self.spec.nsp
        sizes = {}
        for name, i in zip(self.spec.region.inputs, self.spatial_args):
            x = args[i]
            if x.dim() < nsp + 2:
                raise TilingError(
                    f"streaming region input {name} has shape {tuple(x.shape)}; it needs "
                    f"(N, C, *spatial) with {nsp} spatial axes as at transform time")
            sizes[name] = tuple(x.shape[-nsp:])
        return sizes

    def schedule_for(self, input_sizes: dict[str, tuple[int, ...]]) -> StreamSchedule:
        """The (cached) strip schedule for these input extents."""
        key = tuple(sorted(input_sizes.items()))
        sched = self._schedules.get(key)
        if sched is None:
            sched = self._schedules[key] = strip_schedule(self.spec, input_sizes)
        return sched

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        sched = self.schedule_for(self.input_sizes(args))
        state: dict[str, torch.Tensor] = {
            name: args[i] for name, i in zip(self.spec.region.inputs, self.spatial_args)}
        for strip in sched.strips:
            for k in strip.stages:
                self.stages[k](*args, state, strip)
        return tuple(state[o] for o in self.spec.outputs)
