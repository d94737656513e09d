"""The one exception type tilefx raises for input it cannot tile exactly."""

__all__ = ["TilingError"]


class TilingError(ValueError):
    """Raised when tilefx cannot tile a model exactly.

    The message names the node (``node.format_node()``) that stopped the tiling, what stopped
    it, and what the user can do instead. tilefx never returns a silently wrong output: it
    refuses, or leaves the part it cannot tile untiled and says so.
    """
