"""Emit chosen convolution and linear primitives as explicit nodes.

``apply_primitives(gm, {"conv2d_14": "native"})`` returns a copy of ``gm`` (never mutated) in
which every chosen node runs the named primitive (``tilefx.primitives``): an ATen op or a
``tilefx.kernels`` call in place of the convolution or linear, so the choice shows in
``gm.code``, survives ``torch.save``/``torch.load`` and ``torch.compile``, and the memory model
(``passes.memory``) reads each one's workspace off its target.

A node is named as in the analysed graph (``tilefx.prepare``). Its copies inside
:class:`~tilefx.region.TiledRegion` bodies (every pass of a multi-pass region, and the
approximate mode's region graph), :class:`~tilefx.stream_region.StreamRegion` stage bodies
(where it runs on each strip's window) and channels-last blocks are found by name and by
``node.meta["tilefx"].origin``, so one choice covers the node wherever it runs. Apply primitives
after tiling: an emitted primitive is not in the rule table, so it would be a barrier to
``tile_rewrite``.

>>> import torch, torchvision, tilefx
>>> m = torchvision.models.resnet18().eval(); x = torch.randn(1, 3, 64, 64)
>>> gm = apply_primitives(tilefx.prepare(m, x), {"conv2d_19": "native"})
>>> "aten._slow_conv2d_forward" in gm.code
True
>>> torch.testing.assert_close(gm(x), m(x), rtol=1e-4, atol=1e-4)
"""

from __future__ import annotations

from operator import attrgetter
from typing import Mapping

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..capture import keep_calling_convention
from ..errors import TilingError
from ..kernels import LEAF_FUNCTIONS
from ..primitives import (PRIMITIVES, call_operands, candidates_for, emitted_primitive, op_params,
                          refusal)
from ..region import TiledRegion
from ..rules import Barrier
from ..stream_region import StreamRegion
from .channels_last import ChannelsLastBlock
from .receptive_field import NodeFacts, Provenance

__all__ = ["apply_primitives", "PrimitivePass", "primitive_nodes"]


def _key(n: Node) -> str:
    """The analysed graph's name for ``n``: its origin when a rewrite made it."""
    f = n.meta.get("tilefx")
    origin = getattr(f, "origin", None)
    if origin is not None and origin.role in ("op", "primitive") and origin.origin:
        return origin.origin
    return n.name


class _Rewriter:
    """Rebuilds a module tree with the chosen nodes replaced, each module once."""

    def __init__(self, choices: Mapping[str, str]):
        self.choices = dict(choices)
        self.found: set[str] = set()
        self.eligible: dict[str, tuple[str, ...]] = {}  # every conv/linear seen -> candidates
        self.others: dict[str, str] = {}  # every other call seen -> its node, formatted
        self.done: dict[int, nn.Module] = {}

    def module(self, mod: nn.Module) -> nn.Module:
        if id(mod) in self.done:
            return self.done[id(mod)]
        if isinstance(mod, TiledRegion):
            new = TiledRegion(self.graph_module(mod.body), mod.spec, mod.spatial_args,
                              approx_body=(self.graph_module(mod.approx_body)
                                           if mod.approx_body is not None else None),
                              halo=mod.halo, writes=mod.writes, statistics=mod.statistics)
        elif isinstance(mod, StreamRegion):
            new = StreamRegion([self.graph_module(s) for s in mod.stages], mod.spec,
                               mod.spatial_args, mod.position_bytes)
        elif isinstance(mod, ChannelsLastBlock):
            new = ChannelsLastBlock(self.graph_module(mod.body), mod.nsp)
        else:
            new = mod
        self.done[id(mod)] = new
        return new

    def graph_module(self, gm: GraphModule) -> GraphModule:
        g = Graph()
        env: dict[Node, Node] = {}
        for n in gm.graph.nodes:
            key = _key(n)
            p = op_params(n, gm) if n.op == "call_function" else None
            if p is not None:
                self.eligible.setdefault(key, candidates_for(p))
            elif n.op in ("call_function", "call_module"):
                self.others.setdefault(key, n.format_node())
            if p is not None and key in self.choices:
                env[n] = self._emit(g, n, key, p, env)
                self.found.add(key)
            else:
                env[n] = g.node_copy(n, lambda u: env[u])
        out = GraphModule(gm, g, class_name=type(gm).__name__)
        for n in g.nodes:
            if n.op == "call_module":
                sub = attrgetter(n.target)(out)
                new = self.module(sub)
                if new is not sub:
                    out.set_submodule(n.target, new)
        out.meta.update(gm.meta)
        keep_calling_convention(out, gm)
        out.graph.lint()
        return out

    def _emit(self, g: Graph, n: Node, key: str, p, env: dict[Node, Node]) -> Node:
        name = self.choices[key]
        why = refusal(name, p)
        if why is not None:
            can = candidates_for(p)
            raise TilingError(
                f"primitive {name!r} cannot compute node {n.format_node()}: {why}. Primitives "
                f"that can: {list(can) if can else 'none'}")
        x, w, b = (torch.fx.map_arg(v, lambda u: env[u])
                   for v in call_operands(n.target, n.args, n.kwargs))
        target, args = PRIMITIVES[name].emit(p, x, w, b)
        new = g.create_node("call_function", target, tuple(args), {}, name=n.name)
        keep = ("tensor_meta", "val", "nn_module_stack", "stack_trace")
        new.meta = {k: v for k, v in n.meta.items() if k in keep}
        facts = n.meta.get("tilefx")
        new.meta["tilefx"] = NodeFacts(
            Barrier(f"primitive {name} (passes.primitives): primitives are applied after tiling"),
            getattr(facts, "sizes", None), Provenance(key, "primitive"))
        if target in LEAF_FUNCTIONS:
            new.meta["is_wrapped"] = True  # a leaf when torch.load re-traces the code
        return new


def apply_primitives(gm: GraphModule, choices: Mapping[str, str]) -> GraphModule:
    """Return a copy of ``gm`` in which each node named in ``choices`` runs the primitive it
    maps to (``"onednn"``, ``"native"``, ``"matmul"``, ``"cudnn"``: ``tilefx.primitives``), in
    the outer graph and in every tiled region's, streaming region's and channels-last block's
    body.

    An unknown primitive, a name that is no convolution or linear of ``gm``, or a primitive
    that cannot compute its node exactly (``tilefx.primitives.refusal``) is refused with a
    ``TilingError`` that lists what is valid. ``gm`` is not modified; weights are shared.
    """
    if not isinstance(gm, GraphModule):
        raise TilingError(f"apply_primitives takes a torch.fx GraphModule (tilefx.prepare or "
                          f"tilefx.transform), not {type(gm).__name__}")
    for key, name in choices.items():
        if name not in PRIMITIVES:
            raise TilingError(f"unknown primitive {name!r} for node {key!r}; the primitives are "
                              f"{list(PRIMITIVES)}")
    rw = _Rewriter(choices)
    out = rw.graph_module(gm)
    missing = [k for k in choices if k not in rw.found]
    for k in missing:
        if k in rw.others:
            raise TilingError(
                f"node {rw.others[k]} is not a convolution or linear that a primitive computes "
                "(transposed convolutions and convolutions with parameters computed at run time "
                "have none); leave it out of the choices")
    if missing:
        names = sorted(rw.eligible)
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise TilingError(
            f"no convolution or linear node named {missing[0]!r} in the graph or its "
            f"regions; the nodes a primitive applies to are: {shown or 'none'}")
    return out


def primitive_nodes(gm: GraphModule) -> dict[str, str]:
    """The emitted primitives in ``gm`` and its submodules' graphs, read off their call
    targets (so they survive ``torch.load``): node name -> primitive."""
    found: dict[str, str] = {}
    for mod in gm.modules():
        if isinstance(mod, GraphModule):
            for n in mod.graph.nodes:
                name = emitted_primitive(n.target) if n.op == "call_function" else None
                if name is not None:
                    found[_key(n)] = name
    return found


class PrimitivePass(PassBase):
    """:func:`apply_primitives` as a ``PassBase`` for a ``PassManager``.

    >>> import torch, tilefx
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1)).eval(); x = torch.randn(1, 8, 16, 16)
    >>> result = PrimitivePass({"conv2d": "matmul"})(tilefx.prepare(m, x))
    >>> result.modified, "conv1x1_matmul" in result.graph_module.code
    (True, True)
    """

    def __init__(self, choices: Mapping[str, str]):
        super().__init__()
        self.choices = dict(choices)

    def call(self, graph_module: GraphModule) -> PassResult:
        return PassResult(apply_primitives(graph_module, self.choices), bool(self.choices))

    def __repr__(self) -> str:
        return f"PrimitivePass({self.choices!r})"
