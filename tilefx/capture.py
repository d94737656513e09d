"""Capture: a model becomes an ATen GraphModule through ``torch.export`` (non-strict).

``torch.export`` captures real models that ``symbolic_trace`` cannot (control flow on shapes,
defaulted ``None`` arguments, modules that compute on shapes), and its graph is a closed set of
ATen ops, so the module and functional forms of an op reach the rule table as one op. Every node
keeps ``nn_module_stack``, so merge points can still be named by module path.

:func:`capture` marks the spatial dims of every image-like input dynamic (``Dim.AUTO``), so the
graph runs at other input shapes; where the model does not allow that, it captures at the
example's shape; so it does where export's reasoning about dynamic shapes runs past
:data:`DYNAMIC_EXPORT_S` seconds (torchvision's MaxViT). Either way the result carries an :class:`InputGuards` call first in its graph:
an input the capture does not hold for is refused with a :class:`TilingError`, never run down a
branch that was specialised to another shape. Data-dependent control flow (``if x.mean() > 0``)
is refused by ``torch.export`` itself, and reported here with the line that did it. The captured
graph is checked against eager on the example input before anything uses it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import re
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import Dim
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from .errors import TilingError

__all__ = ["capture", "Inputs", "as_inputs", "InputGuards", "check_eval_mode", "module_path",
           "outputs_match", "keep_calling_convention", "NotCaptured"]

_TRAIN_SENSITIVE = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


@dataclass(frozen=True)
class Inputs:
    """Example inputs as ``torch.export`` takes them: positional ``args`` and ``kwargs``."""

    args: tuple
    kwargs: dict

    @property
    def flat(self) -> list[Any]:
        """The leaves in the order of the captured graph's placeholders."""
        return pytree.tree_leaves((self.args, self.kwargs))

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self.flat if isinstance(t, torch.Tensor)]

    @property
    def spatial(self) -> torch.Tensor:
        """The first image-like input (N, C, *spatial): it sets the number of spatial axes."""
        for t in self.tensors:
            if t.dim() >= 3:
                return t
        shapes = [tuple(t.shape) for t in self.tensors]
        raise TilingError(
            f"tilefx needs an input of shape (N, C, *spatial) with 1 to 3 spatial axes; got "
            f"tensors of shapes {shapes}. Add a batch axis (x.unsqueeze(0)) or pass the example "
            "input the model takes"
        )

    def describe(self) -> str:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in self.flat]
        return ", ".join(map(str, shapes))


def as_inputs(example_inputs: Any, example_kwargs: dict | None = None) -> Inputs:
    """One tensor, a tuple of positional inputs, or an :class:`Inputs`; plus keyword inputs."""
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        args: tuple = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif example_inputs is None:
        args = ()
    else:
        raise TilingError(
            f"example_inputs must be a tensor or a tuple of positional inputs, got "
            f"{type(example_inputs).__name__}"
        )
    return Inputs(args, dict(example_kwargs or {}))


def check_eval_mode(model: torch.nn.Module) -> None:
    """Refuse modules that behave differently in training mode, before anything runs them
    (running a BatchNorm in training mode would update the caller's running statistics)."""
    for name, m in model.named_modules():
        if isinstance(m, _TRAIN_SENSITIVE) and m.training:
            raise TilingError(
                f"module {name or type(model).__name__!r} ({type(m).__name__}) is in training "
                "mode; tilefx tiles inference only: call model.eval() before tilefx.transform"
            )


#: ATen ops that behave differently in training mode, and the position of their flag.
_TRAINING_FLAG = {torch.ops.aten.dropout: 2, torch.ops.aten.batch_norm: 5}


def _trains(n: Node) -> bool:
    """Whether ``n`` is dropout or batch norm called with training=True."""
    at = _TRAINING_FLAG.get(getattr(n.target, "overloadpacket", None))
    return n.op == "call_function" and at is not None and len(n.args) > at and n.args[at] is True


def _check_rank(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Refuse an image whose rank does not match the model's first convolution: an unbatched
    (C, H, W) image would otherwise be read as N=C and one spatial axis."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            want = len(m.kernel_size) + 2
            if x.dim() != want:
                raise TilingError(
                    f"the example input has shape {tuple(x.shape)} but {type(model).__name__}'s "
                    f"first convolution expects {want}-d input (N, C, *spatial); add the batch "
                    "axis (x.unsqueeze(0)) or pass the right example")
            return


def module_path(n: Node) -> list[str]:
    """The qualified names of the modules whose forward created ``n``, outermost first."""
    stack = n.meta.get("nn_module_stack") or {}
    paths = []
    for v in stack.values():
        p = v[0] if isinstance(v, tuple) else v
        if isinstance(p, str) and p and p not in paths:
            paths.append(p)
    return paths


# --------------------------------------------------------------------------- guards


class InputGuards(torch.nn.Module):
    """Checks, before the graph runs, that its inputs are ones the capture holds for.

    ``checks`` are Python expressions over ``args`` (the flat inputs), each with the message
    shown when it fails: static dims equal to the captured ones, dynamic dims in their range,
    dims that must agree, and what export's guards demand (``x.size()[3] % 32 == 0``). The
    expressions are compiled on first use, so the module pickles as plain strings.
    """

    def __init__(self, checks: list[tuple[str, str]], captured: str):
        super().__init__()
        self.checks = list(checks)
        self.captured = captured
        self._fn = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_fn": None}

    def _compile(self):
        ns = _guard_namespace()
        exprs = [compile(code, "<tilefx guard>", "eval") for code, _ in self.checks]

        def fn(args):
            for expr, (_, msg) in zip(exprs, self.checks):
                if not eval(expr, ns, {"args": args}):
                    return msg
            return None

        return fn

    @torch.compiler.disable
    def forward(self, *args: Any) -> None:
        if self._fn is None:
            self._fn = self._compile()
        failed = self._fn(args)
        if failed is not None:
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            raise TilingError(
                f"input shapes ({shapes}) do not satisfy {failed}: the model was captured for "
                f"{self.captured}. Call tilefx.transform again with an example of this shape"
            )
        return None

    def extra_repr(self) -> str:
        return f"{len(self.checks)} checks, captured for {self.captured}"


def _guard_namespace() -> dict[str, Any]:
    """What a guard's code may call (sympy's functions as export prints them, math)."""
    try:
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP as namespace
    except ImportError:  # pragma: no cover - older or newer torch
        namespace = {}
    return {**namespace, "math": math, "inf": math.inf}


def _source_names(model: torch.nn.Module, inputs: Inputs) -> list[str | None]:
    """Per flat input, the name export's guards call it by: the ``forward`` parameter it is
    passed as (``input`` for ``nn.Sequential``, whose placeholder becomes ``input_1``), or None
    for a leaf of a nested input."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    out: list[str | None] = []
    for i, a in enumerate(inputs.args):
        leaves = pytree.tree_leaves(a)
        name = params[i].name if i < len(params) and len(leaves) == 1 and leaves[0] is a else None
        out += [name] + [None] * (len(leaves) - 1)
    for k, v in inputs.kwargs.items():
        leaves = pytree.tree_leaves(v)
        out += [k if len(leaves) == 1 and leaves[0] is v else None] + [None] * (len(leaves) - 1)
    return out


def _guard_checks(gm: GraphModule, ep: Any, names: list[str], inputs: Inputs,
                  sources: list[str | None] = ()) -> tuple[list, bool]:
    """The checks of :class:`InputGuards`, and whether every guard of the capture is in them.
    ``sources``: the inputs' names in the guards' code, where they differ from ``names``."""
    checks: list[tuple[str, str]] = []
    symbols: dict[str, str] = {}
    relaxed: list[tuple[str, str, int]] = []  # batch dims allowed below export's range
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    complete = True
    for i, p in enumerate(placeholders):
        val = p.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        checks.append((f"args[{i}].dim() == {val.dim()}", f"{names[i]}.dim() == {val.dim()}"))
        for d, s in enumerate(val.shape):
            src, shown = f"args[{i}].shape[{d}]", f"{names[i]}.shape[{d}]"
            if isinstance(s, int):
                checks.append((f"{src} == {s}", f"{shown} == {s}"))
                continue
            expr = s.node.expr
            key = str(expr)
            if getattr(expr, "is_number", False):
                checks.append((f"{src} == {int(expr)}", f"{shown} == {int(expr)}"))
                continue
            if not getattr(expr, "is_Symbol", False):
                complete = False  # a derived size (2 * s0): checked through its symbol's dims
                continue
            if key in symbols:
                checks.append((f"{src} == {symbols[key][0]}", f"{shown} == {symbols[key][1]}"))
                continue
            symbols[key] = (src, shown)
            vr = ep.range_constraints.get(expr)
            if vr is not None:
                lo, hi = vr.lower, vr.upper
                if d == 0 and lo is not None and math.isfinite(float(lo)):
                    # Export specialises sizes 0 and 1, so a dynamic batch dim starts at 2; the
                    # capture was checked against eager at the example's own batch (1).
                    if inputs.flat[i].shape[0] < int(lo):
                        relaxed.append((src, shown, inputs.flat[i].shape[0]))
                    lo = min(int(lo), inputs.flat[i].shape[0])
                if lo is not None and math.isfinite(float(lo)):
                    checks.append((f"{src} >= {int(lo)}", f"{shown} >= {int(lo)}"))
                if hi is not None and math.isfinite(float(hi)):
                    checks.append((f"{src} <= {int(hi)}", f"{shown} <= {int(hi)}"))
    codes = getattr(ep, "_guards_code", None)
    if codes is None:
        return checks, False
    ns = _guard_namespace() if relaxed else None  # once: mvit_v2_s has over a thousand guards
    for code in codes:
        actual = shown = code
        for i, name in enumerate(names):
            for called in {name, sources[i] if i < len(sources) else None} - {None}:
                actual = actual.replace(f"L['{called}']", f"args[{i}]")
                shown = shown.replace(f"L['{called}']", name)
        if "L[" in actual:
            complete = False
            continue
        if relaxed and not eval(actual, ns, {"args": inputs.flat}):
            # A guard export derived from "batch >= 2" (``s0 != 1`` in some product of sizes)
            # fails at the example's own batch, where the capture was checked against eager:
            # it holds for every other batch, the example's batch is allowed as the range is.
            actual = f"({actual}) or " + " and ".join(f"{src} == {b}" for src, _, b in relaxed)
            shown = f"({shown}) or " + " and ".join(f"{sh} == {b}" for _, sh, b in relaxed)
        checks.append((actual, shown))
    return checks, complete


# --------------------------------------------------------------------------- export


def _dynamic_shapes(model: torch.nn.Module, inputs: Inputs, batch: bool) -> Any:
    """``Dim.AUTO`` on the spatial dims of every image-like input and, with ``batch``, on the
    batch dim of every tensor input of the image's batch size, as export wants them."""
    x = inputs.spatial
    nsp = x.dim() - 2

    def spec(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return pytree.tree_map(lambda _: None, v)
        dims = {}
        if batch and v.dim() >= 1 and v.shape[0] == x.shape[0]:
            dims[0] = Dim.AUTO
        if v.dim() == nsp + 2:
            dims.update({d: Dim.AUTO for d in range(2, v.dim())})
        return dims or None

    if not inputs.kwargs:
        return tuple(spec(a) for a in inputs.args)
    bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    return {k: spec(v) for k, v in bound.arguments.items()}


def _batch_of_two(inputs: Inputs) -> Inputs:
    """``inputs`` with a batch of two where the image's batch is one (every tensor input with
    that batch size doubled): export specialises a dim of size 1, so a batch-1 example alone
    would fix the batch size. A model whose inputs are not batched that way fails this
    capture, and is captured with its batch fixed."""
    if inputs.spatial.shape[0] != 1:
        return inputs

    def two(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == 1:
            return t.expand(2, *t.shape[1:]).clone()
        return t

    return Inputs(*pytree.tree_map(two, (inputs.args, inputs.kwargs)))


def _user_line(e: BaseException) -> str:
    """The last frame of the user's code in ``e``'s traceback: ``file:line: code``."""
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        path = f.filename.replace("\\", "/")
        if "/torch/" in path or "/tilefx/" in path or "/passes/" in path or path.startswith("<"):
            continue
        return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"
    return ""


_DATA_DEPENDENT = re.compile(r"data.dependent|GuardOnDataDependent|Could not guard on|"
                             r"Could not extract specialized integer|item\(\)|"
                             r"data dependent", re.I)


@contextlib.contextmanager
def _quiet_export():
    """Export logs every failed attempt (with a dump of the partial graph) as a warning; the
    attempts that fail here are expected, and a refusal says what went wrong."""
    lg = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _export(model: torch.nn.Module, inputs: Inputs) -> tuple[Any, bool]:
    """(ExportedProgram, dynamic): with dynamic batch and spatial dims where the model allows
    it, then dynamic spatial dims only, then at the example's shapes."""
    with _quiet_export():
        return _export_attempts(model, inputs)


#: Seconds the dynamic-shape export attempts may take together before the capture falls back
#: to the example's shapes (``TILEFX_DYNAMIC_EXPORT_S`` overrides; 0 skips them). Export's
#: symbolic shape reasoning is quick for CNNs (ResNet-50: ~2 s) but ran past 20 minutes of
#: sympy simplification on torchvision's MaxViT (window partitions of window partitions).
DYNAMIC_EXPORT_S = 60.0


class _OutOfTime(BaseException):
    """Raised by the alarm inside export (a BaseException: export's own handlers catch
    Exception and must not swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise :class:`_OutOfTime` in this thread after ``seconds`` (where an interval timer
    can: the main thread of a Unix process; elsewhere no limit)."""
    usable = (seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def alarm(signum, frame):
        raise _OutOfTime()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _dynamic_budget() -> float:
    env = os.environ.get("TILEFX_DYNAMIC_EXPORT_S")
    return float(env) if env else DYNAMIC_EXPORT_S


def _export_attempts(model: torch.nn.Module, inputs: Inputs) -> tuple[Any, bool]:
    attempts = [(_batch_of_two(inputs), True), (_fresh(inputs), False)]
    first: BaseException | None = None
    budget = _dynamic_budget()
    try:
        with _time_limit(budget):
            for example, batch in attempts if budget > 0 else []:
                try:
                    dyn = _dynamic_shapes(model, example, batch)
                except (TypeError, ValueError):
                    break
                try:
                    return torch.export.export(model, example.args, example.kwargs,
                                               strict=False, dynamic_shapes=dyn), True
                except Exception as e:  # export raises many types; a stricter capture may work
                    first = first or e
                    if _DATA_DEPENDENT.search(f"{type(e).__name__}: {e}"):
                        raise _refusal(model, e) from e
    except _OutOfTime:
        pass  # dynamic shapes cost too much to reason about: capture at the example's shapes
    try:
        static = _fresh(inputs)
        return torch.export.export(model, static.args, static.kwargs, strict=False), False
    except Exception as e:
        raise _refusal(model, e) from (first or e)


def _fresh(inputs: Inputs) -> Inputs:
    """New tensor objects on the same storage for every export attempt: export keeps facts
    about a failed attempt's symbolic sizes with the input tensors themselves, and a second
    attempt on the same objects (AlexNet's adaptive pooling) then fails as the first did."""
    return Inputs(*pytree.tree_map(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (inputs.args, inputs.kwargs)))


class NotCaptured(TilingError):
    """torch.export could not capture the model (a TilingError; the API may then capture its
    children one by one, see ``tilefx.parts``)."""


def _refusal(model: torch.nn.Module, e: BaseException) -> TilingError:
    line = _user_line(e)
    where = f" at {line}" if line else ""
    text = str(e).strip().splitlines()
    first = text[0][:300] if text else ""
    if _DATA_DEPENDENT.search(f"{type(e).__name__}: {e}"):
        return NotCaptured(
            f"{type(model).__name__} has control flow that depends on tensor values{where} "
            f"({type(e).__name__}: {first}). tilefx captures with torch.export and never "
            "specialises a graph to the example's branch: rewrite that line with torch.where or "
            "torch.cond, or transform the submodules before and after it separately"
        )
    return NotCaptured(
        f"torch.export cannot capture {type(model).__name__}{where}: {type(e).__name__}: "
        f"{first}. tilefx needs a model torch.export.export(model, args, strict=False) captures"
    )


def outputs_match(want: Any, got: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Whether two output structures hold the same tensors, to float rounding."""
    w, ws = pytree.tree_flatten(want)
    g, gs = pytree.tree_flatten(got)
    if len(w) != len(g):
        return False
    for a, b in zip(w, g):
        if isinstance(a, torch.Tensor):
            if not (isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(
                    a, b, rtol=rtol, atol=atol, equal_nan=True)):
                return False
    return True


def _eager(model: torch.nn.Module, inputs: Inputs) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs.args, **inputs.kwargs)
    except Exception as e:
        raise TilingError(
            f"{type(model).__name__} itself fails on the example input ({inputs.describe()}): "
            f"{type(e).__name__}: {e}. Pass an example input the model accepts (at least its "
            "minimum size)"
        ) from e


def capture(model: torch.nn.Module, example_inputs: Any, example_kwargs: dict | None = None
            ) -> GraphModule:
    """Capture ``model`` as an ATen GraphModule with ``torch.export`` (non-strict).

    ``example_inputs``: one tensor or a tuple of positional inputs; ``example_kwargs``: keyword
    inputs. A ``torch.fx.GraphModule`` (from ``symbolic_trace`` or the user's own passes) is
    captured the same way. The result is called like the model, starts with an
    :class:`InputGuards` call, and is checked against eager on the example. ``gm.meta`` records
    ``"tilefx_dynamic"`` (whether spatial dims are dynamic) and ``"tilefx_inputs"`` (names).

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18().eval()
    >>> gm = capture(m, torch.randn(1, 3, 64, 64))
    >>> gm.meta["tilefx_dynamic"], gm(torch.randn(1, 3, 96, 80)).shape
    (True, torch.Size([1, 1000]))
    """
    inputs = as_inputs(example_inputs, example_kwargs)
    if not isinstance(model, torch.nn.Module):
        raise TilingError(f"tilefx transforms an nn.Module, got {type(model).__name__}")
    check_eval_mode(model)
    _check_rank(model, inputs.spatial)
    want = _eager(model, inputs)
    ep, dynamic = _export(model, inputs)
    gm = ep.module()
    out = _plain(gm, ep, inputs, dynamic, _source_names(model, inputs))
    try:
        with torch.no_grad():
            got = out(*inputs.args, **inputs.kwargs)
    except TilingError:
        raise
    except Exception as e:
        raise TilingError(
            f"the torch.export graph of {type(model).__name__} fails on the example input: "
            f"{type(e).__name__}: {e}; please report this as a tilefx bug"
        ) from e
    if not outputs_match(want, got):
        for n in out.graph.nodes:
            if _trains(n):
                raise TilingError(
                    f"node {n.format_node()} runs in training mode (random dropout or batch "
                    "statistics), so the model's output differs from run to run; tilefx tiles "
                    "inference only: call model.eval(), and pass training=False (or "
                    "self.training) to functional dropout and batch_norm")
        raise TilingError(
            f"the torch.export graph of {type(model).__name__} computes something else than the "
            "model on the example input; tilefx will not tile it (please report this)"
        )
    return out


def _plain(gm: GraphModule, ep: Any, inputs: Inputs, dynamic: bool,
           sources: list[str | None] = ()) -> GraphModule:
    """An ordinary GraphModule from ``ep.module()``: export's guard function (which cannot be
    pickled) becomes :class:`InputGuards`; the pytree calling convention stays."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    checks, complete = _guard_checks(gm, ep, names, inputs, sources)
    nsp = inputs.spatial.dim() - 2
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    # Export may specialise an "automatic" dim (a size written into the model): dynamic means
    # some spatial dim of an image input stayed symbolic.
    dynamic = dynamic and any(_symbolic(d) for v in vals if isinstance(v, torch.Tensor)
                              and v.dim() == nsp + 2 for d in v.shape[2:])
    shapes = inputs.describe()
    if dynamic and not complete:
        # Some guard could not be written down: hold the capture to the example's shapes
        # rather than run a specialised graph on inputs it was not captured for.
        checks = [(f"args[{i}].shape == {tuple(t.shape)}", f"{names[i]}.shape == {tuple(t.shape)}")
                  for i, t in enumerate(inputs.flat) if isinstance(t, torch.Tensor)]
        dynamic = False
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module"):
            root[n.target] = _fetch(gm, n.target)
    guards = InputGuards(checks, shapes + (" (spatial dims dynamic)" if dynamic else ""))
    root["_tilefx_guards"] = guards
    gm.add_submodule("_tilefx_guards", guards)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        g = graph.call_module("_tilefx_guards", tuple(placeholders))
    g.meta["nn_module_stack"] = {}
    # Export's graph names the tracer that made it (_ModuleStackTracer), and a GraphModule
    # pickles that name: torch.load would rebuild it without the scope_root it needs, so every
    # untiled result failed to load. The code re-traces with fx's plain Tracer, as the tiled
    # modules' does.
    graph._tracer_cls, graph._tracer_extras = None, {}
    out = GraphModule(root, graph, class_name=type(gm).__name__)
    for k in ("_in_spec", "_out_spec"):
        if hasattr(gm, k):
            setattr(out, k, getattr(gm, k))
    out.meta["tilefx_dynamic"] = dynamic
    out.meta["tilefx_inputs"] = names
    out.graph.lint()
    out.recompile()
    return out


def _symbolic(d: Any) -> bool:
    return isinstance(d, torch.SymInt) and not getattr(d.node.expr, "is_number", False)


def keep_calling_convention(dst: GraphModule, src: GraphModule) -> GraphModule:
    """Give ``dst`` (a rewrite of ``src``) the calling convention of ``src``: its pytree codegen
    (inputs and outputs structured as the model's) and the specs that code reads."""
    dst.graph._codegen = copy.deepcopy(src.graph._codegen)
    for k in ("_in_spec", "_out_spec"):
        if hasattr(src, k):
            setattr(dst, k, getattr(src, k))
    dst.recompile()
    return dst


def _fetch(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
