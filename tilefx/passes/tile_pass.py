"""``TilePass``: tilefx as a ``torch.fx.passes.infra`` pass.

``TilePass`` wraps :func:`tilefx.transform` in the ``PassBase`` interface, so tiling can run in a
``PassManager`` after other fx passes (conv-bn fusion, dead-code elimination, a quantizer's
rewrites) and before ``torch.compile``. Like every tilefx pass it never mutates the module it is
given: ``call`` returns a new GraphModule in its ``PassResult``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["TilePass"]


class TilePass(PassBase):
    """Tile the early region of a GraphModule; a ``PassBase`` that fits a ``PassManager``.

    The constructor takes the example input and the options of :func:`tilefx.transform`;
    ``call(gm)`` returns ``PassResult(tiled_gm, modified)``, where ``modified`` is ``True`` when
    at least one tiled region was created (``False`` when no plan lowered the peak and the
    result is an untiled copy).

    Args:
        example_input: the input to plan for (``(N, C, *spatial)``).
        merge, tiles, halo, plan, memory_budget, max_overhead: as for :func:`tilefx.transform`.

    >>> import torch, torchvision
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> from tilefx.passes.tile_pass import TilePass
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 128, 128)
    >>> gm = torch.fx.symbolic_trace(model)
    >>> result = PassManager([TilePass(x, merge="layer2", tiles=2)])(gm)
    >>> result.modified, "tiled_region_0" in result.graph_module.code
    (True, True)
    >>> torch.testing.assert_close(result.graph_module(x), model(x))
    """

    def __init__(self, example_input: torch.Tensor, *, merge: Any = None,
                 tiles: int | tuple[int, ...] | None = None, halo: bool = True, plan: Any = None,
                 memory_budget: int | None = None, max_overhead: float | None = None):
        super().__init__()
        self.example_input = example_input
        self.options = dict(merge=merge, tiles=tiles, halo=halo, plan=plan,
                            memory_budget=memory_budget, max_overhead=max_overhead)

    def call(self, graph_module: torch.nn.Module) -> PassResult:
        """Return ``PassResult(tilefx.transform(graph_module, example_input, ...), modified)``."""
        from ..api import transform  # the api imports the passes package; import it late
        from ..region import TiledRegion

        before = sum(isinstance(m, TiledRegion) for m in graph_module.modules())
        out = transform(graph_module, self.example_input, **self.options)
        after = sum(isinstance(m, TiledRegion) for m in out.modules())
        return PassResult(out, after > before)

    def requires(self, graph_module: torch.nn.Module) -> None:
        """Check the pass's precondition: an ``nn.Module`` (ideally a ``GraphModule``)."""
        if not isinstance(graph_module, torch.nn.Module):
            from ..errors import TilingError

            raise TilingError(
                f"TilePass runs on an nn.Module or torch.fx.GraphModule, got "
                f"{type(graph_module).__name__}"
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items()
                         if v is not None and not (k == "halo" and v is True))
        shape = tuple(getattr(self.example_input, "shape", ()))
        return f"TilePass(example_input={shape}{', ' if opts else ''}{opts})"
