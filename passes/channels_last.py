"""Fold channels-last per-position blocks into one spatially pointwise module call.

ConvNeXt (and its LayerNorm2d) computes per-position work in NHWC: ``permute(0, 2, 3, 1)``,
then LayerNorm over the channels, Linear layers, activations, then ``permute(0, 3, 1, 2)``
back. Each op acts on one position's channel vector, so the whole chain maps a window to
itself, yet a permute that moves spatial axes is a barrier to the rule table (windows are read
off the trailing axes). This rewrite replaces every such chain by one call of a
:class:`ChannelsLastBlock` holding the chain as a small GraphModule (weights shared, not
copied), which the rule table knows as pointwise. Chains it cannot prove per-position are left
alone, so they stay barriers.

>>> import torch, torchvision
>>> from tilefx.capture import capture
>>> m = torchvision.models.convnext_tiny().eval()
>>> gm = fold_channels_last(capture(m, torch.randn(1, 3, 64, 64)))
>>> sum(isinstance(m, ChannelsLastBlock) for m in gm.modules())
23
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from ..capture import keep_calling_convention
from ..rules import Pointwise, register

__all__ = ["ChannelsLastBlock", "fold_channels_last"]

aten = torch.ops.aten

#: ATen ops that act on each position's last-axis vector alone (or elementwise).
_LAST_AXIS_OPS = {getattr(aten, k) for k in (
    "linear", "gelu", "relu", "relu_", "silu", "silu_", "hardswish", "hardswish_", "sigmoid",
    "tanh", "clone", "contiguous", "alias", "detach")}
#: Elementwise ops with a parameter operand (layer scale, bias), fine when the parameter
#: broadcasts along the last (channel) axis only.
_SCALE_OPS = {aten.mul, aten.add, aten.mul_, aten.add_}
_DROPOUT_OPS = {aten.dropout, aten.dropout_}


class ChannelsLastBlock(nn.Module):
    """``permute to channels-last -> per-position ops -> permute back``, as one call.

    ``body`` maps an NHWC (N, *spatial, C) tensor to N, *spatial, C'; the block permutes in and
    out around it, so the call is NCHW -> NCHW and pointwise over space.
    """

    def __init__(self, body: GraphModule, nsp: int):
        super().__init__()
        self.body = body
        self.nsp = nsp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.nsp
        y = self.body(x.permute(0, *range(2, n + 2), 1))
        return y.permute(0, n + 1, *range(1, n + 1))


def _perm(n: Node) -> tuple[int, ...] | None:
    if n.op != "call_function" or getattr(n.target, "overloadpacket", None) is not aten.permute:
        return None
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dims")
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _to_last(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank), 1)


def _to_first(rank: int) -> tuple[int, ...]:
    return (0, rank - 1, *range(1, rank - 1))


def _per_position(n: Node, gm: GraphModule, x: Node) -> bool:
    """Whether ``n`` (reading the chain value ``x``) acts on each position's vector alone."""
    others = [u for u in n.all_input_nodes if u is not x]
    if n.op != "call_function" or any(u.op != "get_attr" for u in others):
        return False  # another computed operand could vary over space
    if n.args[0] is not x:
        return False
    op = getattr(n.target, "overloadpacket", None)
    if op is aten.layer_norm:
        shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        return isinstance(shape, (tuple, list)) and len(shape) == 1
    if op in _DROPOUT_OPS:
        return (n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)) is False
    if op in _LAST_AXIS_OPS:
        return True
    if op in _SCALE_OPS:
        # x * w or x + b with a parameter broadcast along the last (channel) axis only
        return all(isinstance(t := attrgetter(u.target)(gm), torch.Tensor) and t.dim() <= 1
                   for u in others)
    return False


def _chains(gm: GraphModule) -> list[list[Node]]:
    chains = []
    for start in gm.graph.nodes:
        dims = _perm(start)
        rank = len(dims) if dims else 0
        if rank < 3 or dims != _to_last(rank):
            continue
        chain, x = [start], start
        while len(x.users) == 1:
            (u,) = x.users
            if _perm(u) == _to_first(rank):
                chain.append(u)
                chains.append(chain)
                break
            if not _per_position(u, gm, x):
                break
            chain.append(u)
            x = u
    return chains


def fold_channels_last(gm: GraphModule) -> GraphModule:
    """Return a copy of ``gm`` with every channels-last per-position chain folded into one
    :class:`ChannelsLastBlock` call. ``gm`` is not modified; a graph with no chain comes back
    as a copy with the same code."""
    out = GraphModule(gm, gm.graph.__deepcopy__(), type(gm).__name__)
    out.meta.update(gm.meta)
    keep_calling_convention(out, gm)
    chains = _chains(out)
    for k, chain in enumerate(chains):
        first, last = chain[0], chain[-1]
        rank = len(_perm(first))
        body = Graph()
        env: dict[Node, Any] = {first: body.placeholder("x")}
        for n in chain[1:-1]:
            env[n] = body.node_copy(n, lambda u: env[u] if u in env else body.get_attr(u.target))
            env[n].meta = {k: v for k, v in n.meta.items() if k != "tilefx"}
        body.output(env[chain[-2]] if len(chain) > 2 else env[first])
        name = f"channels_last_block_{k}"
        out.add_submodule(name, ChannelsLastBlock(GraphModule(out, body, "ChannelsLastBody"), rank - 2))
        with out.graph.inserting_before(last):
            call = out.graph.call_module(name, (first.args[0],))
        call.meta.update(last.meta)
        last.replace_all_uses_with(call)
        attrs = {u for n in chain for u in n.all_input_nodes if u.op == "get_attr"}
        for n in reversed(chain):
            out.graph.erase_node(n)
        # Only the chain's own parameters go; never a general dead-code pass: it would drop
        # in-place ops whose results are unused (MViT has them) and change the output.
        for u in attrs:
            if not u.users:
                out.graph.erase_node(u)
    out.graph.lint()
    out.recompile()
    return out


register(ChannelsLastBlock)(Pointwise)  # per-position work: a window maps to itself
