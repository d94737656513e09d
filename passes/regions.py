"""Region analysis: which nodes a region before given merge node(s) holds.

Analysis only (nothing is rewritten): the planner asks it about every candidate merge node,
the tile rewrite about the one it applies, ``explain`` about names. A **region** is the set of
spatial ancestors of its merge node(s) that can run inside a tile loop; its **outputs** are the
region tensors read outside it (merge inputs, U-Net skips), assembled full-size.
"""

from __future__ import annotations

from typing import Any, Iterable

import networkx as nx
from torch.fx import GraphModule, Node

from ..capture import module_path
from ..errors import TilingError
from ..rules import SpatialRule
from .receptive_field import facts

__all__ = ["resolve_merge", "find_region", "tensor_valued", "in_module"]


def in_module(n: Node, qualname: str) -> bool:
    """Whether ``n`` was created inside module ``qualname`` (or is a call of it)."""
    if n.op == "call_module" and (n.target == qualname or n.target.startswith(qualname + ".")):
        return True
    return any(p == qualname or p.startswith(qualname + ".") for p in module_path(n))


def resolve_merge(gm: GraphModule, merge: Any) -> list[Node]:
    """The merge node(s) named by ``merge``: node names, module qualified names, or Nodes.

    A module name stands for the nodes of that module that read from outside it (its entry
    nodes), so ``merge="layer2"`` cuts before ResNet's second stage.
    """
    items = [merge] if isinstance(merge, (str, Node)) else list(merge)
    by_name = {n.name: n for n in gm.graph.nodes}
    out: list[Node] = []
    for m in items:
        if isinstance(m, Node):
            out.append(m)
            continue
        if m in by_name:
            out.append(by_name[m])
            continue
        members = [n for n in gm.graph.nodes if in_module(n, m)]
        if not members:
            paths = sorted({p.split(".")[0] for n in gm.graph.nodes for p in module_path(n)})[:8]
            raise TilingError(
                f"merge={m!r} is neither a node nor a module of the captured graph; pass a node "
                f"name (see gm.graph) or a module's qualified name such as {paths}"
            )
        inside = set(members)
        out.extend(n for n in members
                   if any(u not in inside and u.op != "get_attr" for u in n.all_input_nodes))
    return list(dict.fromkeys(out))


def tensor_valued(n: Node) -> bool:
    tm = n.meta.get("tensor_meta")
    return hasattr(tm, "shape") or (isinstance(tm, (tuple, list))
                                    and any(hasattr(t, "shape") for t in tm))


def _descendants(nodes: set[Node]) -> set[Node]:
    dag = nx.DiGraph()
    stack, seen = list(nodes), set(nodes)
    while stack:
        n = stack.pop()
        for u in n.users:
            dag.add_edge(n, u)
            if u not in seen:
                seen.add(u)
                stack.append(u)
    out: set[Node] = set()
    for n in nodes:
        if n in dag:
            out |= nx.descendants(dag, n)
    return out


def find_region(gm: GraphModule, merge_nodes: list[Node], start: Iterable[Node] = ()
                ) -> tuple[list[Node], list[Node], set[Node]]:
    """The region before ``merge_nodes``: (region nodes in order, region outputs, absorbed nodes).

    The region is the set of spatial ancestors of the merge nodes whose every input is itself
    in the region or computed before it; absorbed nodes are shape queries read only by the
    region. ``start``: tensors the region begins after: they and their ancestors stay outside
    it and run untiled (by default the region reaches back to the graph's inputs, or to an
    earlier region's outputs).
    """
    stop: set[Node] = set()
    walk = list(start)
    while walk:  # the start tensors and all their ancestors
        n = walk.pop()
        if n not in stop:
            stop.add(n)
            walk.extend(n.all_input_nodes)
    seeds = [u for m in merge_nodes for u in m.all_input_nodes if facts(u).spatial]
    if not seeds:
        m = merge_nodes[0]
        raise TilingError(
            f"merge node {m.format_node()} reads no spatial tensor the region could produce "
            "(its inputs are barriers or graph inputs); choose a node earlier in the network, "
            "e.g. one printed by tilefx.explain"
        )
    region: set[Node] = set()
    stack = list(seeds)
    while stack:
        n = stack.pop()
        if n in region or n in stop or n.op in ("placeholder", "get_attr") or not facts(n).spatial:
            continue
        region.add(n)
        stack.extend(n.all_input_nodes)
    # Close the region: a node whose inputs come from outside it cannot run inside the tile
    # loop, unless the input is a tensor computed before the region (a graph input, an earlier
    # region's output), a parameter, or a shape argument the op's emission ignores.
    changed = True
    while changed:
        changed = False
        after = _descendants(region)
        for n in list(region):
            rule: SpatialRule = facts(n).rule
            srcs = {name for name, _ in rule.inputs}
            ignores_args = rule.kind in ("reshape", "interp")
            ok = True
            for u in n.all_input_nodes:
                if u in region or (u.op == "get_attr" and u.name not in srcs):
                    continue
                if u.name in srcs and not hasattr(u.meta.get("tensor_meta"), "shape"):
                    ok = False  # a split's pieces computed outside: no crop applies to a list
                    break
                if tensor_valued(u) and u not in after and u.op != "get_attr":
                    continue
                if ignores_args and u.name not in srcs and not tensor_valued(u):
                    continue
                ok = False
            if ok and not hasattr(n.meta.get("tensor_meta"), "shape") and any(
                    u not in region for u in n.users):
                ok = False  # a split read outside: the region ends before it, at its input
            if ok and rule.attrs.get("inplace"):
                src = next(u for u in n.all_input_nodes if u.name in srcs)
                ok = src in region and len(src.users) == 1
            if not ok:
                region.discard(n)
                changed = True
    order = [n for n in gm.graph.nodes if n in region]
    absorbed: set[Node] = set()
    for n in reversed(gm.graph.nodes):
        if n not in region and not tensor_valued(n) and n.op not in ("placeholder", "output") \
                and n.users and all(u in region or u in absorbed for u in n.users):
            absorbed.add(n)
    outputs = [n for n in order if any(u not in region and u not in absorbed for u in n.users)]
    lists = [o for o in outputs if not hasattr(o.meta.get("tensor_meta"), "shape")]
    if lists:
        raise TilingError(  # pragma: no cover - the closure above keeps lists inside
            f"the region before {merge_nodes[0].format_node()} would output {lists[0].name}, a "
            "list of split pieces, not a tensor; please report this as a tilefx bug")
    return order, outputs, absorbed
