"""tilefx's fx passes: receptive_field (analysis), tile_rewrite (rewrite), memory (simulation),
and TilePass, the whole transform as a PassBase for torch.fx's PassManager."""

from .tile_pass import TilePass

__all__ = ["TilePass"]
