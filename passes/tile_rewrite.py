"""The tile rewrite: move a region of a GraphModule into a :class:`~tilefx.region.TiledRegion`.

``tile_rewrite(gm, merge, tiles)`` returns a new GraphModule (``gm`` is never mutated) in which
the region before the merge node(s) is one ``call_module`` node; the merge node and everything
after it read the region's outputs, which are full-size tensors assembled tile by tile. The
region's body graph computes one tile, with an explicit halo-crop node for every read.
``gm`` must carry the receptive-field facts (``passes.receptive_field.annotate``).
"""

from __future__ import annotations

import operator
from operator import attrgetter
from typing import Any, Iterable

import torch
from torch.fx import Graph, GraphModule, Node

import networkx as nx

from ..capture import keep_calling_convention
from ..errors import TilingError
from ..kernels import LEAF_FUNCTIONS, group_moments, halo_crop, reduce_tile, write_tile
from ..region import TiledRegion
from ..rules import Barrier, SpatialRule
from ..tiling import RegionNode, RegionSpec, min_input_extent, tile_grid
from .receptive_field import NodeFacts, Provenance, facts
from .regions import find_region, member_rule, resolve_merge

__all__ = ["tile_rewrite"]


def _made(origin: str, role: str, sizes=None) -> NodeFacts:
    return NodeFacts(Barrier(f"created by the tile rewrite ({role})"), sizes, Provenance(origin, role))


class _BodyBuilder:
    """Builds the tile body graph; the rule table's ``emit`` methods call it.

    ``crop(n, src, pad)`` is a halo-crop node of ``src``'s window for consumer ``n``;
    ``copy(n, crops)`` is ``n`` itself with its spatial operands replaced by their crops;
    ``call(...)`` any other node; ``value(u)`` a non-spatial operand (a parameter or a
    tensor computed before the region).
    """

    #: kernels kept as leaves when ``torch.load`` re-traces the body's code
    leaves = LEAF_FUNCTIONS
    #: the error for an operand the body cannot read
    unavailable = "region reads {} which is not available in the tile"
    #: the facts of a node the builder creates
    made = staticmethod(_made)

    def __init__(self, region: list[Node], outputs: list[Node], nsp: int):
        self.g = Graph()
        self.outputs = {n.name for n in outputs}
        self.nsp = nsp
        self.env: dict[str, Node] = {}
        self.reduce: dict[str, list[str]] = {}  # source -> statistics accumulated over it

    def call(self, target, args, kwargs=None, name=None, origin="", role="op", op="call_function"):
        n = self.g.create_node(op, target, tuple(args), dict(kwargs or {}), name=name)
        n.meta["tilefx"] = self.made(origin, role)
        if op == "call_function" and target in self.leaves:
            n.meta["is_wrapped"] = True  # a leaf when torch.load re-traces the body's code
        return n

    def value(self, u: Node) -> Node:
        if u.name not in self.env:
            if u.op == "get_attr":
                self.env[u.name] = self.call(u.target, (), origin=u.name, op="get_attr")
            else:
                raise TilingError(self.unavailable.format(u.format_node()))
        return self.env[u.name]

    def crop(self, n: Node, src: str, pad=None) -> Node:
        args = [self.env[src], self.tile, n.name, src]
        if pad is not None and pad.mode == "constant" and pad.value != 0.0:
            args.append(pad.value)
        return self.call(halo_crop, args, name=f"{n.name}_halo_{src}", origin=n.name,
                         role="halo_crop")

    def copy(self, n: Node, crops: dict[str, Node]) -> Node:
        def sub(u: Node) -> Node:
            return crops.get(u.name) or self.value(u)

        args = torch.fx.map_arg(n.args, sub)
        kwargs = torch.fx.map_arg(n.kwargs, sub)
        op = "call_module" if n.op == "call_module" else "call_function"
        return self.call(n.target, args, kwargs, name=n.name, origin=n.name, op=op)

    def emit(self, n: Node) -> None:
        rule: SpatialRule = member_rule(n, True)
        out = rule.entry.emit(self, n, rule)
        self.env[n.name] = out
        if n.name in self.outputs:
            self.call(write_tile, (self.buffers, self.tile, n.name, out), name=f"write_{n.name}",
                      origin=n.name, role="write_tile")
        if n.name in self.reduce:
            self.call(reduce_tile, (self.buffers, self.tile, n.name, out, tuple(self.reduce[n.name])),
                      name=f"reduce_{n.name}", origin=n.name, role="reduce_tile")


def _approx_graph(nodes: list[Node], outputs: list[Node], placeholders: list[Node]) -> Graph:
    """The region's original ops (and the shape queries they read) as a standalone graph, for
    the approximate halo-free mode."""
    g = Graph()
    env: dict[Node, Node] = {}
    for p in placeholders:
        env[p] = g.placeholder(p.name)
    for n in nodes:
        for u in n.all_input_nodes:
            if u not in env and u.op == "get_attr":
                env[u] = g.get_attr(u.target)
        env[n] = g.node_copy(n, lambda u: env[u])
    g.output(tuple(env[o] for o in outputs))
    return g


def tile_rewrite(gm: GraphModule, merge: Any, tiles: int | Iterable[int], halo: bool = True,
                 name: str | None = None, start: Iterable[str] = (),
                 multipass: bool = False) -> GraphModule:
    """Return a copy of ``gm`` whose region before ``merge`` runs tile by tile.

    ``gm`` must have been annotated by ``receptive_field.annotate``. ``tiles`` is the tile
    grid (an int for every spatial axis, or one count per axis). ``start`` names tensors
    (nodes) the region begins after; they and what computes them run untiled (default: the
    region reaches back to the graph's inputs). ``multipass``: the region reaches through
    statistics over the whole map (group and instance norms, squeeze-and-excitation means);
    each pass is one ``call_module`` (``<name>_pass<k>``) that runs the tiles up to the
    statistics it finds, exactly, and the last pass writes the region's outputs.

    >>> import torch, torchvision, tilefx
    >>> m = torchvision.models.resnet18().eval(); x = torch.randn(1, 3, 128, 128)
    >>> gm = tilefx.prepare(m, x)
    >>> tiled = tile_rewrite(gm, "layer2", tiles=2)
    >>> torch.testing.assert_close(tiled(x), m(x))
    """
    merge_nodes = resolve_merge(gm, merge)
    reg = find_region(gm, merge_nodes, _start_nodes(gm, start), multipass)
    region, absorbed = reg.nodes, reg.absorbed
    if not region:
        raise TilingError(f"nothing to tile before merge node {merge_nodes[0].format_node()}")
    if not halo and (len(reg.phases) > 1 or reg.phases[0].statistics):
        raise TilingError(
            f"the region before {merge_nodes[0].format_node()} needs statistics over the whole "
            "map, which the approximate mode (halo=False) does not compute; use halo=True")
    nsp = len(facts(region[0]).sizes)
    grid = tile_grid(tiles, nsp)
    in_region = set(region)
    last_pass = len(reg.phases) - 1
    # Where each statistic is found: reductions the passes replace (their readers read the
    # pass's result), and norms' moments (read by later passes' bodies).
    found_in: dict[Node, int] = {s: k for k, ph in enumerate(reg.phases) for s, _ in ph.statistics}
    replaced = {s for s in found_in if s not in in_region}
    # Norms of tensors stored before the region: their moments are computed over the stored
    # tensor in the outer graph, before the first pass reads them.
    outer_stats = {s: ("__statistic__", s.name) for s, _ in reg.outer_statistics}

    existing = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    k = 0
    while name is None or name in existing:
        name, k = f"tiled_region_{k}", k + 1
    names = [name if k == last_pass else f"{name}_pass{k}" for k in range(len(reg.phases))]

    passes = [_pass_module(gm, reg, ph, nsp, grid, halo, found_in) for ph in reg.phases]

    # The outer graph: the nodes outside the region, and one call per pass in its place,
    # ordered by a stable topological sort (each call after its inputs, before every reader
    # of its results).
    keep = [n for n in gm.graph.nodes if n not in in_region and n not in absorbed
            and n not in replaced]
    index = {n: (i, 0) for i, n in enumerate(gm.graph.nodes)}
    calls = [("__pass__", k) for k in range(len(reg.phases))]
    dag = nx.DiGraph()
    dag.add_nodes_from(keep)
    for k, c in enumerate(calls):
        dag.add_node(c)
        index[c] = (index[region[0]][0], k + 1)
        for p in passes[k][1]:
            dag.add_edge(calls[found_in[p]] if p in replaced else p, c)
        for n in passes[k][2]:
            dag.add_edge(outer_stats[n] if n in outer_stats else calls[found_in[n]], c)
    for s, src in reg.outer_statistics:
        dag.add_edge(src, outer_stats[s])
        index[outer_stats[s]] = (index[region[0]][0], 0)
    for n in keep:
        for u in n.all_input_nodes:
            if u in in_region:
                dag.add_edge(calls[last_pass], n)
            elif u in replaced:
                dag.add_edge(calls[found_in[u]], n)
            else:
                dag.add_edge(u, n)
    g = Graph()
    env: dict[Node, Node] = {}
    moments: dict[Node, Node] = {}
    by_stat = {v: s for s, v in outer_stats.items()}
    for n in nx.lexicographical_topological_sort(dag, key=lambda v: index[v]):
        if n in by_stat:
            s = by_stat[n]
            stat = facts(s).rule.statistic
            r = g.create_node("call_function", group_moments, (env[s.args[0]], stat.groups, stat.eps, nsp),
                              {}, name=f"{s.name}_moments")
            r.meta["tilefx"] = _made(s.name, "statistic")
            r.meta["is_wrapped"] = True
            moments[s] = r
            continue
        if n not in calls:
            env[n] = g.node_copy(n, lambda u: env[u])
            continue
        k = n[1]
        ph = reg.phases[k]
        module, placeholders, norms = passes[k]
        args = [env[p] for p in placeholders] + [moments[m] for m in norms]
        call = g.create_node("call_module", names[k], tuple(args), {}, name=names[k])
        call.meta["tilefx"] = _made(names[k], "region_call")
        results = list(ph.outputs) + [s for s, _ in ph.statistics]
        for i, o in enumerate(results):
            if o in in_region and o not in ph.outputs:  # a norm's moments, for later passes
                r = g.create_node("call_function", operator.getitem, (call, i), {},
                                  name=f"{o.name}_moments")
                r.meta["tilefx"] = _made(o.name, "statistic")
                moments[o] = r
                continue
            r = g.create_node("call_function", operator.getitem, (call, i), {}, name=o.name)
            r.meta = {k2: v for k2, v in o.meta.items() if k2 in ("tensor_meta", "nn_module_stack")}
            r.meta["tilefx"] = _made(o.name, "region_output" if o in in_region else "statistic",
                                     facts(o).sizes if o in in_region else None)
            env[o] = r
    return finish_module(gm, g, {nm: p[0] for nm, p in zip(names, passes)})


def finish_module(gm: GraphModule, g: Graph, regions: dict[str, Any]) -> GraphModule:
    """The rewritten graph ``g`` of ``gm`` as a GraphModule owning the region modules
    ``regions`` (by name) and whatever else its nodes still read from ``gm``."""
    # Parameters only a region read are now read by its bodies alone (a get_attr is pure, so
    # dropping it is safe; nothing else is removed, see fold_channels_last on dead code).
    for n in list(g.nodes):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    root: dict[str, Any] = dict(regions)
    for n in g.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in root:
            root[n.target] = attrgetter(n.target)(gm)
    out = GraphModule(root, g, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    keep_calling_convention(out, gm)
    out.graph.lint()
    return out


def _pass_module(gm: GraphModule, reg: Any, ph: Any, nsp: int, grid: tuple[int, ...], halo: bool,
                 found_in: dict[Node, int]) -> tuple[TiledRegion, list[Node], list[Node]]:
    """One pass of a region as a TiledRegion: (module, outer values it reads, norms whose
    moments it reads). Its body writes the pass's outputs and reduces its statistics' sources."""
    nodes = set(ph.nodes)
    absorbed = reg.absorbed
    inner = set(reg.nodes) | absorbed
    # Pass inputs: tensors computed outside the region (graph inputs, earlier regions'
    # outputs, values computed from earlier passes' statistics), and shape scalars that nodes
    # outside the region read too. Parameters are read in the body through get_attr, sharing
    # the model's weights.
    placeholders = [p for p in gm.graph.nodes if p not in inner and p.op != "get_attr"
                    and any(u in nodes or u in absorbed for u in p.users)]
    norms = [n for n in ph.nodes if not facts(n).spatial]
    spatial_inputs = [p for p in placeholders
                      if any(p.name in {s for s, _ in member_rule(u, True).inputs}
                             for u in p.users if u in nodes)]
    sources: dict[str, list[str]] = {}
    for s, src in ph.statistics:
        sources.setdefault(src.name, []).append(s.name)
    targets = list(dict.fromkeys([o.name for o in ph.outputs] + list(sources)))

    b = _BodyBuilder(list(ph.nodes), list(ph.outputs), nsp)
    b.reduce = sources
    for p in placeholders:
        b.env[p.name] = b.call(p.name, (), name=p.name, origin=p.name, role="input",
                               op="placeholder")
    for n in norms:
        key = f"{n.name}_moments"
        b.env[key] = b.call(key, (), name=key, origin=n.name, role="input", op="placeholder")
    b.buffers = b.call("buffers", (), name="buffers", role="input", op="placeholder")
    b.tile = b.call("tile", (), name="tile", role="input", op="placeholder")
    for n in ph.nodes:
        b.emit(n)
    b.g.output(None)
    body = GraphModule(gm, b.g, class_name="TileBody")
    approx = None
    if not ph.statistics:
        approx_nodes = [n for n in gm.graph.nodes if n in nodes or n in absorbed]
        approx = GraphModule(gm, _approx_graph(approx_nodes, list(ph.outputs), placeholders),
                             class_name="RegionGraph")
    by_name = {n.name: n for n in ph.nodes}
    spec = RegionSpec(
        nsp=nsp,
        inputs=tuple(p.name for p in spatial_inputs),
        nodes=tuple(RegionNode(n.name, member_rule(n, True), n.format_node()) for n in ph.nodes),
        outputs=tuple(targets),
        grid=tuple(int(t) for t in grid),
    )
    _check_grid(spec, [by_name[t] for t in targets], spatial_inputs)
    module = TiledRegion(body, spec, tuple(placeholders.index(p) for p in spatial_inputs),
                         approx_body=approx, halo=halo,
                         writes=tuple(o.name for o in ph.outputs),
                         statistics=tuple((s.name, facts(s).rule.statistic) for s, _ in ph.statistics))
    return module, placeholders, norms


def _start_nodes(gm: GraphModule, start: Iterable[str]) -> list[Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    names = [start] if isinstance(start, str) else list(start)
    missing = [s for s in names if s not in by_name]
    if missing:
        raise TilingError(f"start={missing[0]!r} is not a node of the graph; a region starts after "
                          "node names as printed by gm.graph (or tilefx.explain)")
    return [by_name[s] for s in names]


def _check_grid(spec: RegionSpec, outputs: list[Node], inputs: list[Node]) -> None:
    """Refuse, at rewrite time, a grid finer than a region output at the traced shape."""
    for o in outputs:
        sizes = facts(o).sizes
        if all(L >= t for L, t in zip(sizes, spec.grid)):
            continue
        fits = tuple(min(t, min(facts(u).sizes[a] for u in outputs)) for a, t in enumerate(spec.grid))
        traced = {p.name: facts(p).sizes for p in inputs}
        try:
            minimum = f"; or an input of spatial extent at least {min_input_extent(spec, traced)}"
        except Exception:  # pragma: no cover - the message without the minimum still helps
            minimum = ""
        raise TilingError(
            f"the tile grid {spec.grid} is too fine: region output {o.format_node()} is only "
            f"{sizes} at the example input's shape. Use at most {fits} tiles{minimum}"
        )
