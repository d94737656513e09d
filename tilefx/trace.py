"""Tracing: ``torch.fx.symbolic_trace``, with untraceable submodules kept as opaque leaves.

When tracing fails inside a submodule (shape-dependent Python, data-dependent control flow),
:func:`trace` retraces with the innermost failing module as a leaf, and repeats, so the smallest
set of submodules becomes opaque and the traceable rest of the network stays visible. Given an
example input, it also runs the traced graph node by node: a node that fails there (Python that
traced but cannot run as a graph) makes its innermost enclosing submodule a leaf the same way.
The traced graph is then checked against eager on the example input: a graph that computes
something else is never used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils._pytree import tree_flatten

from .errors import TilingError

__all__ = ["LeafTracer", "trace", "check_traced", "check_eval_mode", "mutable_args", "module_path"]


class LeafTracer(torch.fx.Tracer):
    """A tracer that treats the modules named in ``leaves`` as opaque calls."""

    def __init__(self, leaves: set[str] = frozenset()):
        super().__init__()
        self.leaves = set(leaves)
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def mutable_args(v: Any) -> Any:
    """``v`` with fx's immutable lists and dicts (how a Node stores its arguments) replaced by
    fresh mutable copies, as the GraphModule's generated code builds them on every call.

    Without this an Interpreter (ShapeProp) hands a function the Node's own immutable list,
    and Python that mutates a list argument (torchvision's video Swin) fails there although
    the GraphModule itself runs.
    """
    if isinstance(v, immutable_list):
        return [mutable_args(a) for a in v]
    if isinstance(v, immutable_dict):
        return {k: mutable_args(a) for k, a in v.items()}
    if type(v) is tuple:
        return tuple(mutable_args(a) for a in v)
    if type(v) is dict:
        return {k: mutable_args(a) for k, a in v.items()}
    return v


def module_path(n: torch.fx.Node) -> list[str]:
    """The qualified names of the modules whose forward created ``n``, outermost first."""
    stack = n.meta.get("nn_module_stack") or {}
    paths = []
    for v in stack.values():
        p = v[0] if isinstance(v, tuple) else v
        if isinstance(p, str) and p and p not in paths:
            paths.append(p)
    return paths


class _Runner(torch.fx.Interpreter):
    """Runs a graph node by node, as its generated code would, and remembers the node that
    raised."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.failed: torch.fx.Node | None = None

    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return mutable_args(args), mutable_args(kwargs)

    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception:
            if self.failed is None:
                self.failed = n
            raise


def _innermost_new(paths: list[str], leaves: set[str], exclude: str | None = None) -> str | None:
    where = [q for q in paths if q and q not in leaves and q != exclude]
    return where[-1] if where else None


def _trace_once(model: torch.nn.Module, leaves: set[str], max_leaves: int) -> torch.fx.GraphModule:
    """Symbolic trace, growing ``leaves`` (in place) until tracing succeeds."""
    while True:
        tracer = LeafTracer(leaves)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:  # fx raises many types for untraceable code
            leaf = _innermost_new(tracer.failed_in or [], leaves)
            if leaf is None or len(leaves) >= max_leaves:
                raise TilingError(
                    f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}. "
                    "tilefx needs an fx-traceable model; pass a torch.fx.GraphModule you "
                    "traced yourself, or make the failing code traceable"
                ) from e
            leaves.add(leaf)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["tilefx_leaves"] = sorted(leaves)
    return gm


def trace(model: torch.nn.Module, example_input: Any = None, max_leaves: int = 64) -> torch.fx.GraphModule:
    """Trace ``model``; submodules that cannot be traced become leaves.

    With ``example_input``, the traced graph is also run on it: a submodule whose traced code
    fails to run becomes a leaf too, and the result is checked against eager (TilingError when
    it differs). Modules in training mode are refused before anything runs.

    >>> import torch, torchvision
    >>> gm = trace(torchvision.models.resnet18().eval())
    >>> sum(n.op == "call_module" for n in gm.graph.nodes)
    60
    """
    if isinstance(model, torch.fx.GraphModule):
        gm = model
        if example_input is not None:
            check_eval_mode(gm)
            check_traced(model, gm, example_input)
        return gm
    leaves: set[str] = set()
    want = None  # the model's own output, computed once the first run fails
    while True:
        gm = _trace_once(model, leaves, max_leaves)
        if example_input is None:
            return gm
        check_eval_mode(gm)
        runner = _Runner(gm)
        try:
            with torch.no_grad():
                got = runner.run(example_input)
            break
        except TilingError:
            raise
        except Exception as e:
            if want is None:  # a model that fails on its own is the input's fault, not fx's
                want = (_check_eager_runs(model, example_input),)
            n = runner.failed
            paths = module_path(n) if n is not None else []
            target = n.target if n is not None and n.op == "call_module" else None
            leaf = _innermost_new(paths, leaves, exclude=target)
            if leaf is None or len(leaves) >= max_leaves:
                node = n.format_node() if n is not None else "(none)"
                where = f" (in module {paths[-1]!r})" if paths else ""
                raise TilingError(
                    f"node {node}{where} fails when the traced graph of "
                    f"{type(model).__name__} runs on the example input: {type(e).__name__}: {e}. "
                    "No enclosing submodule is left to keep as an opaque leaf; pass a "
                    "torch.fx.GraphModule you traced yourself (with that code wrapped by "
                    "torch.fx.wrap or in a leaf module), or make the failing code traceable"
                ) from e
            leaves.add(leaf)
    check_traced(model, gm, example_input, got=got, want=want)
    return gm


_TRAIN_SENSITIVE = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def check_eval_mode(gm: torch.fx.GraphModule) -> None:
    """Refuse modules that behave differently in training mode, before anything runs them
    (running a BatchNorm in training mode would update the caller's running statistics).
    Leaf modules are searched inside too."""
    for n in gm.graph.nodes:
        if n.op == "call_module":
            for m in gm.get_submodule(n.target).modules():
                if isinstance(m, _TRAIN_SENSITIVE) and m.training:
                    raise TilingError(
                        f"node {n.format_node()}: {type(m).__name__} is in training mode; tilefx "
                        "tiles inference only: call model.eval() before tilefx.transform"
                    )


def _check_eager_runs(model: torch.nn.Module, x: Any) -> Any:
    """``model(x)``; a TilingError when the model itself does not run on ``x``."""
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise TilingError(
            f"{type(model).__name__} itself fails on the example input {shape}: "
            f"{type(e).__name__}: {e}. Pass an example input the model accepts (at least its "
            "minimum size)"
        ) from e


def check_traced(model: torch.nn.Module, gm: torch.fx.GraphModule, x: Any, got: Any = None,
                 want: tuple | None = None) -> None:
    """Raise TilingError when the traced graph does not compute what the model does on ``x``
    (``got``: the graph's output on ``x``, ``want``: ``(model(x),)``, when already computed)."""
    want, _ = tree_flatten(want[0] if want is not None else _check_eager_runs(model, x))
    if got is None:
        try:
            with torch.no_grad():
                got = gm(x)
        except Exception as e:
            raise TilingError(
                f"the fx trace of {type(model).__name__} fails on the example input where the "
                f"model runs: {type(e).__name__}: {e}. Trace with tilefx.trace(model, x), which "
                "keeps failing submodules as leaves, or pass a GraphModule that runs"
            ) from e
    got, _ = tree_flatten(got)
    ok = len(want) == len(got)
    for a, b in zip(want, got):
        if not ok:
            break
        if isinstance(a, torch.Tensor):
            ok = isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(
                a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    if not ok and any(m.training for m in model.modules()):
        raise TilingError(
            f"the fx trace of {type(model).__name__} computes something else than the model on "
            "the example input, and the model is in training mode (dropout is random, batch "
            "norm uses batch statistics); tilefx tiles inference only: call model.eval() first"
        )
    if not ok:
        raise TilingError(
            f"the fx trace of {type(model).__name__} computes something else than the model on "
            "the example input (Python control flow was frozen at trace time); tilefx will not "
            "tile it. Trace the model yourself with the right concrete_args and pass the "
            "GraphModule"
        )
