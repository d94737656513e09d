"""Region analysis: which nodes a region before given merge node(s) holds.

Analysis only (nothing is rewritten): the planner asks it about every candidate merge node,
the tile rewrite about the one it applies, ``explain`` about names. A **region** is the set of
spatial ancestors of its merge node(s) that can run inside a tile loop; its **outputs** are the
region tensors read outside it (merge inputs, U-Net skips), assembled full-size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

from torch.fx import GraphModule, Node

from ..capture import module_path
from ..errors import TilingError
from ..rules import Barrier, SpatialRule
from ..statistics import Statistic
from .receptive_field import facts

__all__ = ["resolve_merge", "find_region", "Region", "Phase", "phases_of", "member_rule",
           "ancestors_within", "mutated_source",
           "statistic_of",
           "tensor_valued", "in_module"]


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
    """Every node reachable from ``nodes`` through at least one edge (one walk over users)."""
    out: set[Node] = set()
    stack = [u for n in nodes for u in n.users]
    while stack:
        v = stack.pop()
        if v not in out:
            out.add(v)
            stack.extend(v.users)
    return out


@dataclass(frozen=True)
class Phase:
    """One pass of a region's tile loop: the region nodes it runs (topological order), the
    region outputs it writes full-size (the last pass only), and the statistics it accumulates
    over its tiles' owned pieces, as ``(statistic node, source node)`` pairs. A norm's
    statistic node is the norm itself (its moments), a reduction's is the reduction."""

    nodes: tuple[Node, ...]
    outputs: tuple[Node, ...]
    statistics: tuple[tuple[Node, Node], ...] = ()


class Region(NamedTuple):
    """A region: its nodes in order, its outputs (assembled full-size), the shape queries only
    it reads (``absorbed``), its passes (one unless it is multi-pass), and the statistics of
    tensors it reads from before it (a norm of the region's stored input), as ``(statistic
    node, source node)`` pairs: those are found over the stored tensor before the first pass."""

    nodes: list[Node]
    outputs: list[Node]
    absorbed: set[Node]
    phases: tuple[Phase, ...]
    outer_statistics: tuple[tuple[Node, Node], ...] = ()


def member_rule(n: Node, multipass: bool = False) -> SpatialRule | None:
    """The rule ``n`` runs by inside a region: its spatial rule, or (multi-pass regions) a
    norm's application once its statistics are known; None for a node no region holds."""
    f = facts(n)
    if f.spatial:
        return f.rule
    if multipass and isinstance(f.rule, Barrier) and f.rule.apply is not None:
        return f.rule.apply
    return None


def statistic_of(n: Node) -> Statistic | None:
    """The statistic of a reduction a pass can compute whole (a mean over space for squeeze-
    and-excitation or global pooling), whose result is the node's own output."""
    f = n.meta.get("tilefx")
    r = f.rule if f is not None else None
    if isinstance(r, Barrier) and r.statistic is not None and r.apply is None:
        return r.statistic
    return None


def _map(n: Node) -> bool:
    """Whether ``n`` is a feature map of more than one position (not a per-channel value)."""
    f = n.meta.get("tilefx")
    return f is not None and f.sizes is not None and math.prod(f.sizes) > 1


def _statistics_behind(u: Node, stop: set[Node], multipass: bool) -> list[Node]:
    """The reductions a non-spatial value ``u`` is computed from (the squeeze-and-excitation
    gate's mean), walking back through small per-channel nodes."""
    out, seen, walk = [], set(), [u]
    while walk:
        v = walk.pop()
        if v in seen or v in stop or v.op in ("placeholder", "get_attr"):
            continue
        seen.add(v)
        if statistic_of(v) is not None:
            out.append(v)
        elif not _map(v):
            walk.extend(v.all_input_nodes)
    return out


def mutated_source(n: Node, rule: SpatialRule) -> Node | None:
    """The tensor an in-place member (``add_``, ``relu_``) writes into, or None for one that
    writes a new tensor. A tile can run it only on a tile of a region tensor read by it alone:
    on a tensor stored before the region, overlapping tile windows would write its halos twice.
    """
    if not rule.attrs.get("inplace"):
        return None
    srcs = {name for name, _ in rule.inputs}
    return next(u for u in n.all_input_nodes if u.name in srcs)


def find_region(gm: GraphModule, merge_nodes: list[Node], start: Iterable[Node] = (),
                multipass: bool = False) -> Region:
    """The region before ``merge_nodes``.

    The region is the set of spatial ancestors of the merge nodes whose every input is itself
    in the region or computed before it; absorbed nodes are shape queries read only by the
    region. ``start``: tensors the region begins after: they and their ancestors stay outside
    it and run untiled (by default the region reaches back to the graph's inputs, or to an
    earlier region's outputs).

    ``multipass``: the region reaches through statistics over the whole map (group and
    instance norms, a mean over space feeding a squeeze-and-excitation gate): a pass runs the
    tiles up to a statistic's source and accumulates it; later passes read it as a constant,
    as does the small per-channel network between a reduction and its readers, which runs
    outside the tile loop. The region's ``phases`` say which pass runs what.
    """
    stop: set[Node] = set()
    walk = list(start)
    while walk:  # the start tensors and all their ancestors
        n = walk.pop()
        if n not in stop:
            stop.add(n)
            walk.extend(n.all_input_nodes)

    def rule(n: Node) -> SpatialRule | None:
        return member_rule(n, multipass)

    seeds = [u for m in merge_nodes for u in m.all_input_nodes if rule(u) is not None]
    if multipass:
        seeds += [u.args[0] for m in merge_nodes for u in m.all_input_nodes
                  if statistic_of(u) is not None and u not in stop]
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
        if n in region or n in stop or n.op in ("placeholder", "get_attr") or rule(n) is None:
            continue
        region.add(n)
        # The region grows through its ops' spatial sources: a per-channel operand (a 1x1 map)
        # is computed outside the tile loop. Multi-pass: one computed from statistics (a
        # squeeze-and-excitation gate) is computed between passes, and the statistics'
        # sources join the region.
        srcs = {name for name, _ in rule(n).inputs}
        for u in n.all_input_nodes:
            if u.name in srcs:
                stack.append(u)
            elif multipass and u.op not in ("placeholder", "get_attr"):
                stack.extend(s.args[0] for s in _statistics_behind(u, stop, multipass))
    # Close the region: a node whose inputs come from outside it cannot run inside the tile
    # loop, unless the input is a tensor computed before the region (a graph input, an earlier
    # region's output), a parameter, a shape argument the op's emission ignores, or (multi-
    # pass) a value computed from statistics of the region between its passes.
    #
    # Nodes are checked in graph order against the region as it stands: ``after`` and
    # ``between`` follow every discard. Checked against a stale ``after``, a reader of a node
    # just discarded (an in-place activation after a barrier) looked like a reader of a region
    # descendant and went too, or not, depending on the order a ``set`` of nodes iterates in,
    # which follows their addresses: the same graph gave different regions, and a planned
    # region could come out empty at rewrite time.
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    outside: list = []  # [after, between] of the region as it stands; emptied by a discard

    def around() -> tuple[set[Node], set[Node]]:
        if not outside:
            after = _descendants(region)
            outside[:] = [after, _between(gm, region, after) if multipass else set()]
        return outside[0], outside[1]

    changed = True
    while changed:
        changed = False
        for n in sorted(region, key=position.__getitem__):
            r: SpatialRule = rule(n)
            srcs = {name for name, _ in r.inputs}
            ignores_args = r.kind in ("reshape", "interp")
            ok = True
            for u in n.all_input_nodes:
                if u in region or (u.op == "get_attr" and u.name not in srcs):
                    continue
                if u.name in srcs and not hasattr(u.meta.get("tensor_meta"), "shape"):
                    ok = False  # a split's pieces computed outside: no crop applies to a list
                    break
                after, between = around()
                if tensor_valued(u) and u not in after and u.op != "get_attr":
                    continue
                if u in between and u.name not in srcs:
                    continue
                if ignores_args and u.name not in srcs and not tensor_valued(u):
                    continue
                ok = False
            if ok and not hasattr(n.meta.get("tensor_meta"), "shape") and any(
                    u not in region for u in n.users):
                ok = False  # a split read outside: the region ends before it, at its input
            if ok and r.attrs.get("inplace"):
                src = mutated_source(n, r)
                ok = src in region and len(src.users) == 1
            if not ok:
                region.discard(n)
                outside.clear()
                changed = True
    order = [n for n in gm.graph.nodes if n in region]
    # Reductions of region tensors that the passes compute (a merge node itself is never one:
    # the region ends before it).
    handled = {u for n in order for u in n.users
               if multipass and statistic_of(u) is not None and u.args[0] is n
               and u not in merge_nodes}
    absorbed: set[Node] = set()
    for n in reversed(gm.graph.nodes):
        if n not in region and not tensor_valued(n) and n.op not in ("placeholder", "output") \
                and n.users and all(u in region or u in absorbed for u in n.users):
            absorbed.add(n)
    outputs = [n for n in order
               if any(u not in region and u not in absorbed and u not in handled for u in n.users)]
    lists = [o for o in outputs if not hasattr(o.meta.get("tensor_meta"), "shape")]
    if lists:
        raise TilingError(  # pragma: no cover - the closure above keeps lists inside
            f"the region before {merge_nodes[0].format_node()} would output {lists[0].name}, a "
            "list of split pieces, not a tensor; please report this as a tilefx bug")
    if not multipass:
        return Region(order, outputs, absorbed, (Phase(tuple(order), tuple(outputs)),))
    phases = phases_of(order, outputs, handled, stop)
    inside = set(order)
    outer = tuple((n, n.args[0]) for n in order if not facts(n).spatial and n.args[0] not in inside)
    return Region(order, outputs, absorbed, phases, outer)


def _between(gm: GraphModule, region: set[Node], after: set[Node]) -> set[Node]:
    """Values computable between a multi-pass region's passes: reductions of region tensors,
    and what is computed from them, parameters and tensors from before the region alone."""
    ok: set[Node] = set()
    for n in gm.graph.nodes:
        if n not in after or n in region or n.op in ("placeholder", "get_attr", "output"):
            continue
        if statistic_of(n) is not None:
            if n.args[0] in region:
                ok.add(n)
            continue
        if all(u in ok or u.op == "get_attr" or (u not in after and u not in region)
               for u in n.all_input_nodes):
            ok.add(n)
    return ok


def phases_of(order: list[Node], outputs: list[Node], handled: set[Node],
              stop: set[Node] = frozenset()) -> tuple[Phase, ...]:
    """Group a multi-pass region's statistics into passes: a statistic is found in the pass
    after every statistic its source depends on; what no region node reads waits for the last
    pass (a global pooling at the region's end), which also writes the outputs. A norm whose
    source comes from before the region has its moments before the first pass (not in any
    pass's statistics: ``find_region``'s ``outer_statistics``).

    ``order``: the region's nodes in order; ``handled``: the reductions of region tensors the
    passes compute (the norms among ``order`` read their own moments)."""
    inside = set(order)
    index = {n: i for i, n in enumerate(order)}
    ranked = sorted(handled, key=lambda s: (index[s.args[0]], s.name))  # not a set's order
    index.update({s: len(order) + k for k, s in enumerate(ranked)})
    reads: dict[Node, list[Node]] = {}  # region node -> statistic nodes it reads
    for n in order:
        f = n.meta["tilefx"]
        own = [n] if not f.spatial else []  # a norm reads its own moments
        glue = [s for u in n.all_input_nodes if u not in inside
                for s in _statistics_behind(u, stop, True) if s.args[0] in inside]
        reads[n] = own + glue
    level: dict[Node, int] = {}   # statistic node -> pass that finds it (1-based)
    depth: dict[Node, int] = {}   # region node -> passes that must run before it
    for n in order:
        d = max((depth[u] for u in n.all_input_nodes if u in inside), default=0)
        for s in reads[n]:
            level.setdefault(s, depth[s.args[0]] + 1 if s.args[0] in inside else 0)
            d = max(d, level[s])
        depth[n] = d
    needed = {s for s, k in level.items() if k > 0}
    passes = max(level.values(), default=0)
    phases = []
    for k in range(1, passes + 2):
        last = k == passes + 1
        stats = [(s, s.args[0]) for s in needed if level[s] == k]
        if last:
            stats += [(s, s.args[0]) for s in handled - set(level)]
        stats.sort(key=lambda p: index.get(p[0], index[p[1]]))
        targets = {src for _, src in stats} | (set(outputs) if last else set())
        members = ancestors_within(targets, inside)
        phases.append(Phase(tuple(n for n in order if n in members),
                            tuple(outputs) if last else (), tuple(stats)))
    return tuple(phases)


def ancestors_within(targets: set[Node], inside: set[Node]) -> set[Node]:
    """``targets`` and their ancestors among ``inside``."""
    out, walk = set(), list(targets)
    while walk:
        n = walk.pop()
        if n in out or n not in inside:
            continue
        out.add(n)
        walk.extend(n.all_input_nodes)
    return out
