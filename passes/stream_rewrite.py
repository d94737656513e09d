"""The stream rewrite: move a region of a GraphModule into a :class:`~tilefx.stream_region.StreamRegion`.

``stream_rewrite(gm, merge, strip)`` returns a new GraphModule (``gm`` is never mutated) in
which the region before the merge node(s) (``passes.regions.find_region``, as for tiles) is one
``call_module`` node running strip by strip, every row of every node once; the merge node and
everything after it read the region's full-size outputs. Each stage of the region
(``tilefx.streaming.stages_of``) is one body graph: explicit row-buffer reads, the ops as the
rule table emits them into a tile body, one write. ``gm`` must carry the receptive-field facts
(``passes.receptive_field.annotate``).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable

import networkx as nx
from torch.fx import Graph, GraphModule, Node

from ..errors import TilingError
from ..kernels import LEAF_FUNCTIONS
from ..rules import Barrier, SpatialRule
from ..stream_kernels import STREAM_LEAF_FUNCTIONS, stream_read, stream_write
from ..stream_region import StreamRegion
from ..streaming import MIN_ROWS, StreamSpec, check_streamable, stages_of
from ..tiling import RegionNode, RegionSpec
from .receptive_field import NodeFacts, Provenance, facts
from .regions import find_region, resolve_merge
from .tile_rewrite import _BodyBuilder, finish_module

__all__ = ["stream_rewrite"]

_LEAVES = LEAF_FUNCTIONS + STREAM_LEAF_FUNCTIONS


def _made(origin: str, role: str, sizes=None) -> NodeFacts:
    return NodeFacts(Barrier(f"created by the stream rewrite ({role})"), sizes,
                     Provenance(origin, role))


class _StageBuilder(_BodyBuilder):
    """Builds one stage body; the rule table's ``emit`` methods call it as they call a tile
    body's builder: ``crop(n, src, pad)`` is what ``n`` reads of ``src`` this strip (the value
    itself inside the stage, a row-buffer read otherwise), ``copy(n, crops)`` is ``n`` on its
    crops, ``call(...)`` any other node, ``value(u)`` a non-spatial operand."""

    def __init__(self, stage: tuple[str, ...], nsp: int):
        self.g = Graph()
        self.stage = set(stage)
        self.nsp = nsp
        self.env: dict[str, Node] = {}

    leaves = _LEAVES
    unavailable = "streaming region reads {} which is not available in a strip"
    made = staticmethod(_made)

    def crop(self, n: Node, src: str, pad=None) -> Node:
        if src in self.stage:
            return self.env[src]  # read position by position: the strip's own rows
        args = [self.state, self.tile, n.name, src]
        if pad is not None and pad.mode == "constant" and pad.value != 0.0:
            args.append(pad.value)
        return self.call(stream_read, args, name=f"{n.name}_read_{src}", origin=n.name,
                         role="row_read")

    def emit(self, n: Node) -> None:
        rule: SpatialRule = facts(n).rule
        self.env[n.name] = rule.entry.emit(self, n, rule)


def stream_rewrite(gm: GraphModule, merge: Any, strip: int, name: str | None = None,
                   start: Iterable[str] = (), min_rows: int = MIN_ROWS) -> GraphModule:
    """Return a copy of ``gm`` whose region before ``merge`` runs in strips of ``strip`` rows.

    ``strip`` is the strip height in rows of the region's tallest feature map; strips advance
    along the first spatial axis, at full extent along the others, and a node of a smaller map
    computes at least ``min_rows`` rows per call. ``start`` names tensors the region begins
    after (as for ``tile_rewrite``). A node the strips cannot run (a channel split) is refused
    with a :class:`~tilefx.TilingError` naming it.

    >>> import torch, torchvision, tilefx
    >>> m = torchvision.models.resnet18().eval(); x = torch.randn(1, 3, 128, 128)
    >>> gm = tilefx.prepare(m, x)
    >>> streamed = stream_rewrite(gm, "layer3", strip=4)
    >>> torch.testing.assert_close(streamed(x), m(x))
    >>> streamed.stream_region_0.strip
    4
    """
    if isinstance(strip, bool) or not isinstance(strip, int) or strip < 1:
        raise TilingError(f"strip={strip!r}: the strip height is a positive number of rows")
    merge_nodes = resolve_merge(gm, merge)
    reg = find_region(gm, merge_nodes, _start_nodes(gm, start))
    region, outputs, absorbed = reg.nodes, reg.outputs, reg.absorbed
    if not region:
        raise TilingError(f"nothing to stream before merge node {merge_nodes[0].format_node()}")
    nsp = len(facts(region[0]).sizes)
    in_region = set(region)
    inner = in_region | absorbed
    rnodes = tuple(RegionNode(n.name, facts(n).rule, n.format_node()) for n in region)
    check_streamable(rnodes)

    # Region inputs: tensors computed outside it (graph inputs, earlier regions' outputs) and
    # shape scalars read outside it too; parameters are read in the bodies through get_attr.
    placeholders = [p for p in gm.graph.nodes if p not in inner and p.op != "get_attr"
                    and any(u in in_region or u in absorbed for u in p.users)]
    spatial_inputs = [p for p in placeholders
                      if any(p.name in {s for s, _ in facts(u).rule.inputs}
                             for u in p.users if u in in_region)]
    out_names = tuple(o.name for o in outputs)
    spec = StreamSpec(
        region=RegionSpec(nsp=nsp, inputs=tuple(p.name for p in spatial_inputs), nodes=rnodes,
                          outputs=out_names, grid=(1,) * nsp),
        stages=stages_of(rnodes, out_names),
        strip=strip,
        min_rows=min_rows,
    )
    by_name = {n.name: n for n in region}
    bodies = []
    for stage in spec.stages:
        b = _StageBuilder(stage, nsp)
        for p in placeholders:
            b.env[p.name] = b.call(p.name, (), name=p.name, origin=p.name, role="input",
                                   op="placeholder")
        b.state = b.call("state", (), name="state", role="input", op="placeholder")
        b.tile = b.call("strip", (), name="strip", role="input", op="placeholder")
        for nm in stage:
            b.emit(by_name[nm])
        last = stage[-1]
        b.call(stream_write, (b.state, b.tile, last, b.env[last]), name=f"write_{last}",
               origin=last, role="row_write")
        b.g.output(None)
        bodies.append(GraphModule(gm, b.g, class_name="StageBody"))
    module = StreamRegion(bodies, spec, tuple(placeholders.index(p) for p in spatial_inputs),
                          {n: _position_bytes(by_name[n]) for n in spec.stored})
    # The schedule at the traced shape: a region the strips cannot run fails here, not later.
    module.schedule_for({p.name: facts(p).sizes for p in spatial_inputs})

    existing = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    k = 0
    while name is None or name in existing:
        name, k = f"stream_region_{k}", k + 1
    return _outer(gm, region, absorbed, outputs, placeholders, module, name)


def _outer(gm: GraphModule, region: list[Node], absorbed: set[Node], outputs: list[Node],
           placeholders: list[Node], module: StreamRegion, name: str) -> GraphModule:
    """The outer graph: every node outside the region, and one call in its place (a stable
    topological order: after its inputs, before every reader of its outputs)."""
    in_region = set(region)
    keep = [n for n in gm.graph.nodes if n not in in_region and n not in absorbed]
    index = {n: (i, 0) for i, n in enumerate(gm.graph.nodes)}
    call_key = ("__region__", 0)
    index[call_key] = (index[region[0]][0], 1)
    dag = nx.DiGraph()
    dag.add_nodes_from(keep)
    dag.add_node(call_key)
    for p in placeholders:
        dag.add_edge(p, call_key)
    for n in keep:
        for u in n.all_input_nodes:
            dag.add_edge(call_key if u in in_region else u, n)
    g = Graph()
    env: dict[Node, Node] = {}
    for n in nx.lexicographical_topological_sort(dag, key=lambda v: index[v]):
        if n != call_key:
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
    return finish_module(gm, g, {name: module})


def _position_bytes(n: Node) -> float:
    tm = n.meta.get("tensor_meta")
    sizes = facts(n).sizes
    if not hasattr(tm, "shape") or not sizes:
        return 0.0
    return tm.shape.numel() * tm.dtype.itemsize / max(1, math.prod(sizes))


def _start_nodes(gm: GraphModule, start: Iterable[str]) -> list[Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    names = [start] if isinstance(start, str) else list(start)
    missing = [s for s in names if s not in by_name]
    if missing:
        raise TilingError(f"start={missing[0]!r} is not a node of the graph; a region starts after "
                          "node names as printed by gm.graph (or tilefx.explain)")
    return [by_name[s] for s in names]
