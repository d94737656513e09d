"""The tile rewrite: move a region of a GraphModule into a :class:`~tilefx.region.TiledRegion`.

``tile_rewrite(gm, merge, tiles)`` returns a new GraphModule (``gm`` is never mutated) in which
the region before the merge node(s) is one ``call_module`` node; the merge node and everything
after it read the region's outputs, which are full-size tensors assembled tile by tile. The
region's body graph computes one tile, with an explicit halo-crop node for every read.
``gm`` must carry the receptive-field facts (``passes.receptive_field.annotate``).
"""

from __future__ import annotations

import numbers

import operator
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from ..errors import TilingError
from ..region import (LEAF_FUNCTIONS, TiledRegion, add_channel_bias, halo_crop, window_avg_pool,
                      window_interpolate, window_view, write_tile)
from ..spatial import Barrier, SpatialRule, window_fn
from ..tiling import RegionNode, RegionSpec, crop_key, min_input_extent
from .receptive_field import NodeFacts, Provenance, facts

import networkx as nx

__all__ = ["resolve_merge", "find_region", "tile_rewrite"]


def _made(origin: str, role: str, sizes=None) -> NodeFacts:
    return NodeFacts(Barrier(f"created by the tile rewrite ({role})"), sizes, Provenance(origin, role))


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
        members = [n for n in gm.graph.nodes if _in_module(n, m)]
        if not members:
            modules = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"})[:8]
            raise TilingError(
                f"merge={m!r} is neither a node nor a module of the traced graph; pass a node name "
                f"(see gm.graph) or a module's qualified name such as {modules}"
            )
        inside = set(members)
        out.extend(n for n in members
                   if any(u not in inside and u.op != "get_attr" for u in n.all_input_nodes))
    return list(dict.fromkeys(out))


def _in_module(n: Node, qualname: str) -> bool:
    if n.op == "call_module" and (n.target == qualname or n.target.startswith(qualname + ".")):
        return True
    stack = n.meta.get("nn_module_stack") or {}
    for v in stack.values():
        path = v[0] if isinstance(v, tuple) else v
        if path == qualname or str(path).startswith(qualname + "."):
            return True
    return False


def _tensor_valued(n: Node) -> bool:
    tm = n.meta.get("tensor_meta")
    return hasattr(tm, "shape") or (isinstance(tm, (tuple, list)) and any(hasattr(t, "shape") for t in tm))


def find_region(gm: GraphModule, merge_nodes: list[Node]) -> tuple[list[Node], list[Node], set[Node]]:
    """The region before ``merge_nodes``: (region nodes in order, region outputs, absorbed nodes).

    The region is the set of spatial ancestors of the merge nodes whose every input is itself
    in the region or a graph input; absorbed nodes are shape queries read only by the region.
    """
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
        if n in region or n.op in ("placeholder", "get_attr") or not facts(n).spatial:
            continue
        region.add(n)
        stack.extend(n.all_input_nodes)
    # Close the region: a node whose inputs come from outside it cannot run inside the tile
    # loop, unless the input is a tensor computed before the region (a graph input, an earlier
    # region's output), a parameter, or a shape argument the lowering ignores.
    changed = True
    while changed:
        changed = False
        after = _descendants(region)
        for n in list(region):
            rule: SpatialRule = facts(n).rule
            srcs = {name for name, _ in rule.inputs}
            ignores_args = rule.lowering in ("reshape", "interp")
            ok = True
            for u in n.all_input_nodes:
                if u in region or (u.op == "get_attr" and u.name not in srcs):
                    continue
                if _tensor_valued(u) and u not in after and u.op != "get_attr":
                    continue
                if ignores_args and u.name not in srcs and not _tensor_valued(u):
                    continue
                ok = False
            if ok and rule.attrs.get("inplace"):
                src = next(u for u in n.all_input_nodes if u.name in srcs)
                ok = src in region and len(src.users) == 1
            if not ok:
                region.discard(n)
                changed = True
    order = [n for n in gm.graph.nodes if n in region]
    absorbed: set[Node] = set()
    for n in reversed(gm.graph.nodes):
        if n not in region and not _tensor_valued(n) and n.op not in ("placeholder", "output") \
                and n.users and all(u in region or u in absorbed for u in n.users):
            absorbed.add(n)
    outputs = [n for n in order if any(u not in region and u not in absorbed for u in n.users)]
    return order, outputs, absorbed


def _descendants(nodes: set[Node]) -> set[Node]:
    seen: set[Node] = set()
    stack = [u for n in nodes for u in n.users]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


class _BodyBuilder:
    """Emits the tile body: crops, the op on its window, and writes of region outputs."""

    def __init__(self, region: list[Node], outputs: list[Node], nsp: int):
        self.g = Graph()
        self.region = set(region)
        self.outputs = {n.name for n in outputs}
        self.nsp = nsp
        self.env: dict[str, Node] = {}

    def node(self, op, target, args, kwargs=None, name=None, origin="", role="op"):
        n = self.g.create_node(op, target, tuple(args), dict(kwargs or {}), name=name)
        n.meta["tilefx"] = _made(origin, role)
        if op == "call_function" and target in LEAF_FUNCTIONS:
            n.meta["is_wrapped"] = True  # a leaf when torch.load re-traces the body's code
        return n

    def value(self, u: Node) -> Node:
        if u.name not in self.env:
            if u.op == "get_attr":
                self.env[u.name] = self.node("get_attr", u.target, (), origin=u.name)
            else:
                raise TilingError(f"region reads {u.format_node()} which is not available in the tile")
        return self.env[u.name]

    def crop(self, n: Node, src: str, pad=None) -> Node:
        args = [self.env[src], self.tile, crop_key(n.name, src)]
        if pad is not None:
            args += [pad.mode, pad.value]
        return self.node("call_function", halo_crop, args, name=f"{n.name}_halo_{src}",
                         origin=n.name, role="halo_crop")

    def attr(self, target: str | None) -> Node | None:
        return None if target is None else self.node("get_attr", target, (), origin=target)

    def emit(self, n: Node) -> None:
        rule: SpatialRule = facts(n).rule
        a = rule.attrs
        srcs = [s for s, _ in rule.inputs]
        low = rule.lowering
        if low in ("conv", "maxpool", "avgpool", "pad"):
            x = self.crop(n, srcs[0], rule.pad)
        if low == "pointwise":
            crops = {s: self.crop(n, s) for s in srcs}
            args = torch.fx.map_arg(n.args, lambda u: crops.get(u.name) or self._other(u))
            kwargs = torch.fx.map_arg(n.kwargs, lambda u: crops.get(u.name) or self._other(u))
            out = self.node(n.op, n.target, args, kwargs, name=n.name, origin=n.name)
        elif low == "conv":
            w = self.attr(a["weight"]) if "weight" in a else self.env_or_attr(a["weight_node"])
            b = self.attr(a["bias"]) if "weight" in a else (
                self.env_or_attr(a["bias_node"]) if a["bias_node"] else None)
            out = self.node("call_function", window_fn(low, self.nsp), (x, w, b),
                            dict(stride=a["stride"], padding=0, dilation=a["dilation"],
                                 groups=a["groups"]), name=n.name, origin=n.name)
        elif low == "maxpool":
            out = self.node("call_function", window_fn(low, self.nsp), (x,),
                            dict(kernel_size=a["kernel_size"], stride=a["stride"], padding=0,
                                 dilation=a["dilation"]), name=n.name, origin=n.name)
        elif low == "avgpool":
            out = self.node("call_function", window_avg_pool,
                            (x, self.tile, n.name, a["kernel_size"], a["stride"],
                             a["divisor_override"]), name=n.name, origin=n.name)
        elif low == "pad":
            out = x
        elif low == "interp":
            x = self.crop(n, srcs[0])
            out = self.node("call_function", window_interpolate, (x, self.tile, n.name),
                            name=n.name, origin=n.name)
        elif low == "transposed":
            x = self.crop(n, srcs[0])
            w = self.attr(a["weight"])
            y = self.node("call_function", window_fn(low, self.nsp), (x, w, None),
                          dict(stride=a["stride"], padding=0, output_padding=0, groups=a["groups"],
                               dilation=a["dilation"]), name=f"{n.name}_full", origin=n.name)
            y = self.node("call_function", halo_crop, (y, self.tile, n.name + "@out"),
                          name=f"{n.name}_place", origin=n.name, role="halo_crop")
            out = self.node("call_function", add_channel_bias, (y, self.attr(a["bias"])),
                            name=n.name, origin=n.name)
        elif low == "shuffle":
            x = self.crop(n, srcs[0])
            if a["down"]:
                out = self.node("call_function", F.pixel_unshuffle, (x, a["factor"]),
                                name=n.name, origin=n.name)
            else:
                y = self.node("call_function", F.pixel_shuffle, (x, a["factor"]),
                              name=f"{n.name}_full", origin=n.name)
                out = self.node("call_function", halo_crop, (y, self.tile, n.name + "@out"),
                                name=n.name, origin=n.name, role="halo_crop")
        elif low == "select":
            y = self.node("call_function", operator.getitem, (self.env[srcs[0]], n.args[1]),
                          name=f"{n.name}_item", origin=n.name)
            out = self.node("call_function", halo_crop, (y, self.tile, crop_key(n.name, srcs[0])),
                            name=n.name, origin=n.name, role="halo_crop")
        elif low == "reshape":
            x = self.crop(n, srcs[0])
            shape = tuple(n.meta["tensor_meta"].shape)
            out = self.node("call_function", window_view,
                            (x, shape[1:len(shape) - self.nsp], self.nsp), name=n.name, origin=n.name)
        else:  # pragma: no cover - the table and this switch are kept in step by tests
            raise TilingError(f"no lowering {low!r} for node {n.format_node()}")
        self.env[n.name] = out
        if n.name in self.outputs:
            self.node("call_function", write_tile, (self.buffers, self.tile, n.name, out),
                      name=f"write_{n.name}", origin=n.name, role="write_tile")

    def env_or_attr(self, name: str) -> Node:
        return self.env[name]

    def _other(self, u: Node) -> Node:
        return self.value(u)


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
                 name: str | None = None) -> GraphModule:
    """Return a copy of ``gm`` whose region before ``merge`` runs tile by tile.

    ``gm`` must have been annotated by ``receptive_field.annotate``. ``tiles`` is the tile
    grid (an int for every spatial axis, or one count per axis).

    >>> import torch, torchvision
    >>> from tilefx.trace import trace
    >>> from tilefx.passes.receptive_field import annotate
    >>> m = torchvision.models.resnet18().eval(); x = torch.randn(1, 3, 128, 128)
    >>> gm = annotate(trace(m, x), x)
    >>> tiled = tile_rewrite(gm, "layer2", tiles=2)
    >>> torch.testing.assert_close(tiled(x), m(x))
    """
    merge_nodes = resolve_merge(gm, merge)
    region, outputs, absorbed = find_region(gm, merge_nodes)
    if not region:
        raise TilingError(f"nothing to tile before merge node {merge_nodes[0].format_node()}")
    nsp = len(facts(region[0]).sizes)
    grid = tile_grid(tiles, nsp)
    in_region = set(region)
    # Region inputs: tensors computed outside the region (graph inputs, earlier regions'
    # outputs). Parameters are read in the body through get_attr, sharing the model's weights.
    placeholders = [p for p in gm.graph.nodes if p not in in_region and p.op != "get_attr"
                    and _tensor_valued(p) and any(u in in_region for u in p.users)]
    spatial_inputs = [p for p in placeholders
                      if any(p.name in {s for s, _ in facts(u).rule.inputs}
                             for u in p.users if u in in_region)]

    b = _BodyBuilder(region, outputs, nsp)
    for p in placeholders:
        b.env[p.name] = b.node("placeholder", p.name, (), name=p.name, origin=p.name, role="input")
    b.buffers = b.node("placeholder", "buffers", (), name="buffers", role="input")
    b.tile = b.node("placeholder", "tile", (), name="tile", role="input")
    for n in region:
        b.emit(n)
    b.g.output(None)
    body = GraphModule(gm, b.g, class_name="TileBody")
    approx_nodes = [n for n in gm.graph.nodes if n in in_region or n in absorbed]
    approx = GraphModule(gm, _approx_graph(approx_nodes, outputs, placeholders),
                         class_name="RegionGraph")

    spec = RegionSpec(
        nsp=nsp,
        inputs=tuple(p.name for p in spatial_inputs),
        nodes=tuple(RegionNode(n.name, facts(n).rule, n.format_node()) for n in region),
        outputs=tuple(o.name for o in outputs),
        grid=tuple(int(t) for t in grid),
    )
    _check_grid(spec, outputs, spatial_inputs)
    module = TiledRegion(body, spec, tuple(placeholders.index(p) for p in spatial_inputs),
                         approx_body=approx, halo=halo)

    existing = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    k = 0
    while name is None or name in existing:
        name, k = f"tiled_region_{k}", k + 1

    # The outer graph: the nodes outside the region, and one call in its place, ordered by a
    # stable topological sort (the call after its inputs, before every reader of its outputs).
    keep = [n for n in gm.graph.nodes if n not in in_region and n not in absorbed]
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    CALL = "__region__"
    dag = nx.DiGraph()
    dag.add_nodes_from(keep)
    dag.add_node(CALL)
    index[CALL] = index[region[0]]
    for p in placeholders:
        dag.add_edge(p, CALL)
    for n in keep:
        for u in n.all_input_nodes:
            dag.add_edge(CALL if u in in_region else u, n)
    g = Graph()
    env: dict[Node, Node] = {}
    for n in nx.lexicographical_topological_sort(dag, key=lambda v: index[v]):
        if n is not CALL:
            env[n] = g.node_copy(n, lambda u: env[u])
            continue
        call = g.create_node("call_module", name, tuple(env[p] for p in placeholders), {},
                             name=name)
        call.meta["tilefx"] = _made(name, "region_call")
        for i, o in enumerate(outputs):
            r = g.create_node("call_function", operator.getitem, (call, i), {}, name=o.name)
            r.meta = {k2: v for k2, v in o.meta.items() if k2 in ("tensor_meta", "nn_module_stack")}
            r.meta["tilefx"] = _made(o.name, "region_output", facts(o).sizes)
            env[o] = r
    root: dict[str, Any] = {name: module}
    for n in g.nodes:
        if n.op in ("call_module", "get_attr") and n.target != name:
            root[n.target] = _fetch(gm, n.target)
    out = GraphModule(root, g, class_name=type(gm).__name__)
    out.graph.lint()
    out.recompile()
    return out


def tile_grid(tiles: Any, nsp: int) -> tuple[int, ...]:
    """``tiles`` (one count, or one per spatial axis) as a grid of ``nsp`` positive ints."""
    grid = (tiles,) * nsp if isinstance(tiles, int) else tuple(tiles)

    def count(t: Any) -> bool:
        return not isinstance(t, bool) and isinstance(t, numbers.Integral) and t >= 1

    if len(grid) != nsp or not all(count(t) for t in grid):
        raise TilingError(f"tiles={tiles!r}: give one positive count or one per spatial axis ({nsp})")
    return tuple(int(t) for t in grid)


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


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
