"""Recompute a skip instead of storing it: a graph variant the planner weighs against storing.

A U-Net's full-resolution skip (its encoder's first level, read again by the decoder's last) is
stored full-size across the whole network, and no tiling of the layers in between lowers that.
:func:`recompute_skips` returns a variant of the graph that computes the skip a second time, from
the graph's inputs, right before its late readers, so a region there can compute it tile by tile
and nothing stores it. Norms on the way keep the statistics of the first computation: each is
split into its moments (``kernels.group_moments``, a reduction a multi-pass region finds in a
pass) and their application (``kernels.norm_apply``), and the second computation applies the same
moments. The variant computes what the graph does, to rounding.

A rewrite pass: it returns a new GraphModule (weights shared with ``gm``, never copied) and never
mutates its input. Nodes it creates record what they came from in ``node.meta["tilefx_origin"]``
(``(original node, role)``), which the planner reads to price them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..capture import keep_calling_convention
from ..errors import TilingError
from ..kernels import group_moments, norm_apply
from ..rules import Barrier
from .receptive_field import facts, refresh

__all__ = ["recompute_skips", "recompute_origin", "skip_chain", "why_not_again", "is_splittable",
           "ORIGIN"]

#: The meta key of a node this pass created: ``(original node name, role)``, the role one of
#: ``"again"`` (the second computation of a node), ``"moments"`` and ``"apply"`` (a split norm).
ORIGIN = "tilefx_origin"


def is_splittable(n: Node) -> bool:
    """A norm with its statistics over space and a pointwise application (group or instance
    norm with input statistics): the rule table gives its Statistic and application rule."""
    f = n.meta.get("tilefx")
    r = f.rule if f is not None else None
    return isinstance(r, Barrier) and r.statistic is not None and r.apply is not None


def skip_chain(t: Node) -> list[Node]:
    """What computing ``t`` again takes: its ancestors that are computed (not graph inputs or
    parameters), in graph order."""
    seen: set[Node] = set()
    walk = [t]
    while walk:
        n = walk.pop()
        if n in seen or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        walk.extend(n.all_input_nodes)
    return [n for n in t.graph.nodes if n in seen]


def why_not_again(t: Node, chain: list[Node] | None = None) -> str | None:
    """Why ``t`` cannot be computed a second time (None: it can): every node on the way must
    be a function call, and one that writes in place may write only what the way computes
    itself (an in-place activation on its own input, as MONAI's LeakyReLU(inplace=True))."""
    chain = skip_chain(t) if chain is None else chain
    own = set(chain)
    for n in chain:
        if n.op != "call_function":
            return f"{n.format_node()} is not a function call"
        schema = getattr(n.target, "_schema", None)
        if schema is None:
            continue
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            if isinstance(v, Node) and v not in own:
                return f"{n.format_node()} writes {v.name} in place, which it does not compute"
    return None


def _late_readers(t: Node, index: dict[Node, int]) -> list[Node]:
    """The readers of ``t`` after its first one (the decoder's, for an encoder's skip)."""
    users = sorted(t.users, key=index.get)
    return users[1:]


def recompute_skips(gm: GraphModule, skips: Iterable[str]) -> GraphModule:
    """A copy of ``gm`` (annotated) whose tensors ``skips`` (node names) are computed again,
    from the graph's inputs, for their readers after the first.

    >>> import torch, tilefx
    >>> from torch import nn
    >>> class UNet(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8))
    ...         self.down, self.up = nn.Conv2d(8, 8, 3, 2, 1), nn.Upsample(scale_factor=2)
    ...     def forward(self, x):
    ...         s = self.enc(x)
    ...         return torch.cat([s, self.up(self.down(s))], 1)
    >>> m, x = UNet().eval(), torch.randn(1, 3, 32, 32)
    >>> gm = tilefx.prepare(m, x)
    >>> skip = next(n for n in gm.graph.nodes if n.op == "output").args[0][0].args[0][0].name
    >>> again = recompute_skips(gm, [skip])
    >>> sorted(n.meta["tilefx_origin"][1] for n in again.graph.nodes if "tilefx_origin" in n.meta)
    ['again', 'again', 'apply', 'moments']
    >>> torch.testing.assert_close(again(x), m(x))
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    targets = []
    for s in skips:
        if s not in by_name:
            raise TilingError(f"recompute_skips: {s!r} is not a node of the graph; name a tensor "
                              "as printed by gm.graph")
        targets.append(by_name[s])
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    late: dict[Node, list[Node]] = {t: _late_readers(t, index) for t in targets}
    if any(not readers for readers in late.values()):
        t = next(t for t, r in late.items() if not r)
        raise TilingError(f"recompute_skips: {t.format_node()} has one reader; there is nothing "
                          "to compute again")
    chains = {t: skip_chain(t) for t in targets}
    for t, chain in chains.items():
        why = why_not_again(t, chain)
        if why is not None:
            raise TilingError(f"recompute_skips: {t.name} cannot be computed again: {why}")
    split = {n for chain in chains.values() for n in chain if is_splittable(n)}
    reading: dict[Node, dict[Node, Node]] = {}  # late reader -> {skip: its second computation}
    for t, readers in late.items():
        for r in readers:
            reading.setdefault(r, {})[t] = t

    g = Graph()
    env: dict[Node, Node] = {}
    again: dict[Node, Node] = {}
    moments: dict[Node, Node] = {}

    def made(node: Node, origin: Node, role: str, meta_from: Node) -> Node:
        node.meta = {k: v for k, v in meta_from.meta.items() if k in ("tensor_meta", "nn_module_stack")}
        node.meta[ORIGIN] = (origin.name, role)
        return node

    def split_norm(n: Node, x: Node, name: str, role: str) -> Node:
        rule = facts(n).rule
        w, b = rule.apply.attrs["weight"], rule.apply.attrs["bias"]
        stat = rule.statistic
        nsp = len(facts(n).sizes)
        if n not in moments:
            m = g.call_function(group_moments, (x, stat.groups, stat.eps, nsp), name=f"{n.name}_moments")
            made(m, n, "moments", n)
            src = n.args[0].meta["tensor_meta"]
            dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
            m.meta["tensor_meta"] = _extract_tensor_metadata(
                torch.empty((src.shape[0], stat.groups, 2), dtype=dtype, device="meta"))
            m.meta["is_wrapped"] = True
            moments[n] = m
        args = (x, moments[n], env[w] if isinstance(w, Node) else w, env[b] if isinstance(b, Node) else b)
        y = g.call_function(norm_apply, args, name=name)
        y.meta["is_wrapped"] = True
        return made(y, n, role, n)

    def compute_again(t: Node) -> Node:
        for n in chains[t]:
            if n in again:
                continue
            src = lambda u: again.get(u, env.get(u))  # noqa: E731 - the second computation's inputs
            if n in split:
                again[n] = split_norm(n, src(n.args[0]), f"{n.name}_again", "again")
            else:
                # Named before it is made: a copy would take the next free name, the one a
                # later node of the graph is called by (names are what plans refer to).
                c = g.create_node(n.op, n.target, torch.fx.map_arg(n.args, src),
                                  torch.fx.map_arg(n.kwargs, src), name=f"{n.name}_again",
                                  type_expr=n.type)
                again[n] = made(c, n, "again", n)
        return again[t]

    for n in gm.graph.nodes:
        if n in split:
            env[n] = split_norm(n, env[n.args[0]], n.name, "apply")
            continue
        swap = {t: compute_again(t) for t in reading.get(n, {})}
        env[n] = g.node_copy(n, lambda u: swap.get(u, env[u]))
        if env[n].name != n.name:  # pragma: no cover - every name above is fresh
            raise TilingError(f"recompute_skips renamed {n.name}; please report this as a tilefx bug")
    out = GraphModule(gm, g, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    keep_calling_convention(out, gm)
    nsp = next(len(facts(n).sizes) for n in gm.graph.nodes
               if "tilefx" in n.meta and facts(n).sizes is not None)
    refresh(out, nsp)
    out.graph.lint()
    return out


def recompute_origin(n: Node) -> tuple[str, str] | None:
    """``(original node name, role)`` of a node :func:`recompute_skips` created, else None."""
    return n.meta.get(ORIGIN)

