"""Tracing: ``torch.fx.symbolic_trace``, with untraceable submodules kept as opaque leaves.

When tracing fails inside a submodule (shape-dependent Python, data-dependent control flow),
:func:`trace` retraces with the innermost failing module as a leaf, and repeats, so the smallest
set of submodules becomes opaque and the traceable rest of the network stays visible. The traced
graph is checked against eager on the example input: a graph that computes something else is
never used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from .errors import TilingError

__all__ = ["LeafTracer", "trace", "check_traced"]


class LeafTracer(torch.fx.Tracer):
    """A tracer that treats the modules named in ``leaves`` as opaque calls."""

    def __init__(self, leaves: set[str] = frozenset()):
        super().__init__()
        self.leaves = set(leaves)
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def trace(model: torch.nn.Module, example_input: Any = None, max_leaves: int = 64) -> torch.fx.GraphModule:
    """Trace ``model``; submodules that cannot be traced become leaves.

    >>> import torch, torchvision
    >>> gm = trace(torchvision.models.resnet18().eval())
    >>> sum(n.op == "call_module" for n in gm.graph.nodes)
    60
    """
    if isinstance(model, torch.fx.GraphModule):
        gm = model
    else:
        leaves: set[str] = set()
        while True:
            tracer = LeafTracer(leaves)
            try:
                graph = tracer.trace(model)
                break
            except Exception as e:  # fx raises many types for untraceable code
                where = [q for q in (tracer.failed_in or []) if q and q not in leaves]
                if not where or len(leaves) >= max_leaves:
                    raise TilingError(
                        f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}. "
                        "tilefx needs an fx-traceable model; pass a torch.fx.GraphModule you "
                        "traced yourself, or make the failing code traceable"
                    ) from e
                leaves.add(where[-1])
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.meta["tilefx_leaves"] = sorted(leaves)
    if example_input is not None:
        check_traced(model, gm, example_input)
    return gm


def check_traced(model: torch.nn.Module, gm: torch.fx.GraphModule, x: Any) -> None:
    """Raise TilingError when the traced graph does not compute what the model does on ``x``."""
    with torch.no_grad():
        want, _ = tree_flatten(model(x))
        got, _ = tree_flatten(gm(x))
    ok = len(want) == len(got)
    for a, b in zip(want, got):
        if not ok:
            break
        if isinstance(a, torch.Tensor):
            ok = isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(
                a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    if not ok and any(m.training for m in model.modules()):
        raise TilingError(
            f"the fx trace of {type(model).__name__} computes something else than the model on "
            "the example input, and the model is in training mode (dropout is random, batch "
            "norm uses batch statistics); tilefx tiles inference only: call model.eval() first"
        )
    if not ok:
        raise TilingError(
            f"the fx trace of {type(model).__name__} computes something else than the model on "
            "the example input (Python control flow was frozen at trace time); tilefx will not "
            "tile it. Trace the model yourself with the right concrete_args and pass the "
            "GraphModule"
        )
