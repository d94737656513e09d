"""tilefx: exact receptive-field tiling of CNNs as a torch.fx pass."""

from .errors import TilingError
from .region import TiledRegion
from .api import compare, explain, plan, transform

__all__ = ["TilingError", "TiledRegion", "transform", "plan", "explain", "compare"]
__version__ = "0.1.0"
