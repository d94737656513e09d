"""Receptive-field analysis: annotate every node with its spatial rule or barrier.

An analysis pass in the manner of ``torch.fx.passes.shape_prop.ShapeProp`` (which it extends):
it runs the graph once on an example input, writes ``node.meta["tensor_meta"]`` and
``node.meta["tilefx"]`` (a frozen :class:`NodeFacts`), and never rewrites anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TilingError
from ..capture import as_inputs, module_path
from ..rules import Barrier, RuleContext, SpatialRule, rule_for

__all__ = ["Provenance", "NodeFacts", "ReceptiveField", "annotate", "refresh", "facts"]


@dataclass(frozen=True)
class Provenance:
    """Where a node the rewrite created came from: the original node and the new node's role."""

    origin: str
    role: str  # "op", "halo_crop", "write_tile", "input", "region_call", "region_output"


@dataclass(frozen=True)
class NodeFacts:
    """What tilefx knows about one node: its rule (or barrier), its traced spatial sizes and,
    for nodes a rewrite created, where they came from."""

    rule: SpatialRule | Barrier
    sizes: tuple[int, ...] | None
    origin: Provenance | None = None

    @property
    def spatial(self) -> bool:
        return isinstance(self.rule, SpatialRule)

    @property
    def reason(self) -> str | None:
        return self.rule.reason if isinstance(self.rule, Barrier) else None


class ReceptiveField(ShapeProp):
    """ShapeProp that also writes ``node.meta["tilefx"]``.

    >>> import torch
    >>> from tilefx.capture import capture
    >>> x = torch.randn(1, 3, 8, 8)
    >>> gm = capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
    ...                                  torch.nn.AdaptiveAvgPool2d(1)).eval(), x)
    >>> _ = ReceptiveField(gm).propagate(x)
    >>> [n.meta["tilefx"].spatial for n in gm.graph.nodes if n.op == "call_function"]
    [True, False]
    """

    def __init__(self, gm: GraphModule, nsp: int | None = None):
        super().__init__(gm)
        self.nsp = nsp

    def propagate(self, *args: Any) -> Any:
        """Run on the graph's flat inputs (one per placeholder)."""
        if self.nsp is None:
            self.nsp = as_inputs(args).spatial.dim() - 2
        return super().propagate(*args)

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except TilingError:
            raise
        except Exception as e:
            cause = e.__cause__ if e.__cause__ is not None else e  # ShapeProp wraps the error
            paths = module_path(n)
            where = f" (in module {paths[-1]!r})" if paths else ""
            raise TilingError(
                f"node {n.format_node()}{where} fails when the captured graph runs on the example "
                f"input: {type(cause).__name__}: {cause}. Capture the model with "
                "tilefx.capture.capture(model, x) and check that the model itself runs on x"
            ) from cause
        n.meta["tilefx"] = _facts_of(n, self.module, self.nsp)
        return result


def _facts_of(n: Node, gm: GraphModule, nsp: int) -> NodeFacts:
    module = gm.get_submodule(n.target) if n.op == "call_module" else None
    ctx = RuleContext(n, module, nsp)
    sizes = ctx.out_spatial
    if n.op in ("placeholder", "get_attr", "output"):
        return NodeFacts(Barrier(f"{n.op} node"), sizes)
    rule = rule_for(n, module, nsp)
    if isinstance(rule, SpatialRule):
        # A spatial input must be a tensor a tile can be cut from, or (a chunk/split's tuple)
        # a spatial node whose tiles the region computes itself. A tuple or list made by a
        # barrier would enter the region whole, as an argument no crop can apply to.
        by_name = {m.name: m for m in n.all_input_nodes}
        for name, _ in rule.inputs:
            src = by_name.get(name)
            if src is None or hasattr(src.meta.get("tensor_meta"), "shape"):
                continue
            f = src.meta.get("tilefx")
            if f is None or not f.spatial:
                rule = Barrier(f"reads {name}, a {type(src.meta.get('tensor_meta')).__name__} "
                               "made by a barrier node, not a tensor a tile can be cut from")
                break
    if isinstance(rule, SpatialRule):
        # The table is checked against the traced shapes: a rule whose output extent disagrees
        # with what the op really produced is a bug in the rule, and becomes a barrier.
        ins = ctx.spatial(next(m for m in n.all_input_nodes if m.name == rule.inputs[0][0]))
        if sizes is None or ins is None:
            rule = Barrier("output is not a spatial tensor")
        elif rule.out_sizes(ins) != sizes:
            rule = Barrier(
                f"rule {rule.op} predicts spatial size {rule.out_sizes(ins)} from {ins}, "
                f"the op produced {sizes}"
            )
    return NodeFacts(rule, sizes)


def annotate(gm: GraphModule, example_inputs: Any, example_kwargs: dict | None = None
             ) -> GraphModule:
    """Run the receptive-field analysis on ``gm`` in place of its ``meta`` and return it.

    ``example_inputs``: one tensor or a tuple of positional inputs, as for ``capture``.
    """
    with torch.no_grad():
        ReceptiveField(gm).propagate(*as_inputs(example_inputs, example_kwargs).flat)
    return gm


def refresh(gm: GraphModule, nsp: int) -> GraphModule:
    """Recompute every node's facts from the ``tensor_meta`` it carries, without running the
    graph: for a rewrite that adds nodes whose shapes it knows (``passes.recompute``). Facts of
    nodes a tile rewrite created (they record their origin) are kept."""
    for n in gm.graph.nodes:
        old = n.meta.get("tilefx")
        if old is not None and old.origin is not None:
            continue
        n.meta["tilefx"] = _facts_of(n, gm, nsp)
    return gm


def facts(node: Node) -> NodeFacts:
    """The facts the analysis wrote on ``node`` (raises if the pass has not run)."""
    f = node.meta.get("tilefx")
    if f is None:
        raise TilingError(
            f"node {node.format_node()} has no receptive-field facts; run "
            "tilefx.passes.receptive_field.annotate(gm, x) first"
        )
    return f
