"""tilefx's fx passes, packaged as ``tilefx.passes`` from the top-level ``passes/`` directory.

* ``receptive_field``: the analysis pass (every node's rule or barrier, in ``node.meta``);
* ``regions``: region analysis (which nodes a merge node's region holds);
* ``tile_rewrite``: the rewrite (a region becomes one TiledRegion call);
* ``stream_rewrite``: the streaming rewrite (a region becomes one StreamRegion call: strips,
  every row once, row buffers);
* ``recompute``: a graph variant that computes long skips again for their late readers
  instead of storing them;
* ``primitives``: emits a chosen convolution or linear primitive as an explicit node;
* ``channels_last``: folds channels-last per-position blocks into pointwise calls;
* ``memory``: the static memory simulation.

``TilePass`` (the whole transform as a ``PassBase``) is defined with the API it wraps, in
``tilefx.api``, which sits above the passes; it is re-exported here by name, as users spell it.
"""

from __future__ import annotations

__all__ = ["TilePass"]


def __getattr__(name: str):
    # An alias, not a layering workaround: ``tilefx`` (and so ``tilefx.api``) is always fully
    # imported before anyone can look up an attribute of ``tilefx.passes``.
    if name == "TilePass":
        import tilefx

        return tilefx.TilePass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
