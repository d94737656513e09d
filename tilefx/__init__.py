"""tilefx: exact receptive-field tiling of CNNs as a torch.fx pass."""

from .errors import TilingError
from .region import TiledRegion
from .api import TilePass, apply, compare, explain, plan, prepare, transform

__all__ = ["TilingError", "TiledRegion", "TilePass", "transform", "prepare", "plan", "apply",
           "explain", "compare"]
__version__ = "0.1.0"
