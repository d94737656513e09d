"""Parts: when ``torch.export`` cannot capture a whole model, capture its children one by one.

A model whose own ``forward`` is plain glue (``self.head(self.backbone(x))``) but one of whose
children has data-dependent Python (a detection head's ``if scores.max() > t``) cannot be
exported whole. :func:`split` traces only the root's ``forward``, with every direct child as an
opaque call (``torch.fx.symbolic_trace`` of one level: the one place tilefx still uses it), and
records the example inputs each child is called with. The API then transforms each child on
its own inputs (recursively, so a child can fall back to its own children), keeps the ones
that cannot be captured as they are, and says so.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node

from .capture import Inputs, outputs_match

__all__ = ["Split", "split"]


@dataclass
class Split:
    """The root's glue graph, and each child called once with the inputs it got."""

    glue: GraphModule
    calls: dict[str, Inputs]


class _ChildrenAsLeaves(torch.fx.Tracer):
    def __init__(self, root: torch.nn.Module):
        super().__init__()
        self.children = {id(m) for m in root.children()}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return id(m) in self.children or super().is_leaf_module(m, qualname)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.calls: dict[str, list[Inputs]] = {}

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        self.calls.setdefault(target, []).append(Inputs(tuple(args), dict(kwargs)))
        return super().call_module(target, args, kwargs)


def split(model: torch.nn.Module, inputs: Inputs) -> Split | None:
    """The glue graph of ``model`` over its direct children, or None where there is none (the
    root's own ``forward`` cannot be traced, or the glue computes something else)."""
    if isinstance(model, GraphModule) or not any(True for _ in model.children()):
        return None
    try:
        tracer = _ChildrenAsLeaves(model)
        graph = tracer.trace(model)
    except Exception:  # the root's own Python is not traceable: nothing to split
        return None
    glue = GraphModule(model, graph, type(model).__name__)
    rec = _Recorder(glue)
    try:
        sig = inspect.signature(model.forward)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            return None
        bound = sig.bind(*inputs.args, **inputs.kwargs)
        bound.apply_defaults()
        with torch.no_grad():
            got = rec.run(*bound.arguments.values())
            want = model(*inputs.args, **inputs.kwargs)
    except Exception:
        return None
    if not outputs_match(want, got):
        return None  # the root's Python was specialised to the example: do not use it
    calls = {name: c[0] for name, c in rec.calls.items()
             if len(c) == 1 and "." not in name and _has_tensor(c[0])}
    return Split(glue, calls)


def _has_tensor(inputs: Inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in inputs.flat)


def call_nodes(glue: GraphModule) -> dict[str, Node]:
    return {n.target: n for n in glue.graph.nodes if n.op == "call_module"}
