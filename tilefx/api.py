"""The public entry points: prepare(), plan(), apply(), transform(), explain(), compare(), and
TilePass (the transform as an fx pass)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import autotune, parts, planner
from .cost import measurement_key
from .plans import DEFAULT_MAX_OVERHEAD
from .capture import (Inputs, NotCaptured, as_inputs, capture, keep_calling_convention,
                      module_path, outputs_match)
from .errors import TilingError
from .passes.channels_last import fold_channels_last
from .passes.primitives import apply_primitives, primitive_nodes
from .passes.receptive_field import annotate, facts
from .passes.recompute import recompute_skips
from .passes.regions import find_region, resolve_merge
from .passes.stream_rewrite import stream_rewrite
from .passes.tile_rewrite import tile_rewrite
from .region import TiledRegion
from .stream_region import StreamRegion
from .statistics import describe
from .tiling import read_window, tile_grid

__all__ = ["transform", "prepare", "plan", "apply", "tuned_plan", "explain", "compare", "Comparison", "reference_input",
           "TilePass"]

#: Spatial extent of the reference input used when transform() is given no example.
REFERENCE_EXTENT = {1: 4096, 2: 512, 3: 64}


def reference_input(model: torch.nn.Module) -> torch.Tensor:
    """A random input for ``model`` at the reference extent, from its first convolution.

    >>> import torchvision
    >>> tuple(reference_input(torchvision.models.resnet18()).shape)
    (1, 3, 512, 512)
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            nsp = len(m.kernel_size)
            w = m.weight
            return torch.randn(1, m.in_channels, *(REFERENCE_EXTENT[nsp],) * nsp,
                               dtype=w.dtype, device=w.device)
    raise TilingError(
        f"{type(model).__name__} has no convolution to infer its input from; pass example_input"
    )


def _inputs(model: torch.nn.Module, example_inputs: Any, example_kwargs: dict | None) -> Inputs:
    if example_inputs is None and not example_kwargs:
        return as_inputs(reference_input(model))
    return as_inputs(example_inputs, example_kwargs)


def prepare(model: torch.nn.Module, example_inputs: Any = None,
            example_kwargs: dict | None = None) -> GraphModule:
    """The analysed graph every other step starts from: capture, fold, annotate.

    Captures ``model`` with ``torch.export`` (``tilefx.capture.capture``: dynamic spatial dims
    where the model allows, checked against eager on the example), folds channels-last
    per-position blocks into pointwise calls (``passes.channels_last``), and annotates every
    node with its receptive-field rule or barrier (``passes.receptive_field``). Inputs as for
    :func:`transform`.

    >>> import torch, torchvision, tilefx
    >>> gm = tilefx.prepare(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    >>> from tilefx.passes.receptive_field import facts
    >>> sum(facts(n).spatial for n in gm.graph.nodes) > 40
    True
    """
    inputs = _inputs(model, example_inputs, example_kwargs)
    gm = capture(model, inputs)
    # ConvNeXt-style NHWC blocks become one pointwise call each, so they can join a region.
    return annotate(fold_channels_last(gm), inputs)


def transform(model: torch.nn.Module, example_inputs: Any = None,
              example_kwargs: dict | None = None, *, merge: Any = None,
              tiles: int | tuple[int, ...] | None = None, halo: bool = True,
              plan: "planner.Plan | None" = None, memory_budget: int | None = None,
              max_overhead: float | None = None, max_extra_compute: float | None = None,
              tune: bool = True) -> GraphModule:
    """Return a GraphModule computing ``model``'s outputs with lower peak activation memory.

    The memory-heavy part of the network (the region before the merge node) runs tile by
    tile, each tile with the halo its receptive field needs; outputs equal the model's to
    rounding. The model is captured with ``torch.export`` (non-strict); the result is called
    like the model.

    Args:
        model: an ``nn.Module`` in eval mode (or a ``torch.fx.GraphModule``).
        example_inputs: the input to plan for: one tensor, or a tuple of positional inputs
            (as ``torch.export`` takes them). Image-like inputs of the same extent are tiled
            together; other inputs (a timestep, a conditioning vector) pass through. Without
            it, a random input at a reference extent (512x512 for 2-d nets) is used.
        example_kwargs: keyword inputs.
        merge: a node name or a module's qualified name (``"layer2"``) before which the region
            ends, or a list of them; default: chosen by the planner.
        tiles: the tile grid, one count or one per spatial axis; default: chosen by the planner.
        halo: ``False`` selects the approximate "splitting image" mode (no halos; see
            :func:`compare` for its error). Never used unless asked.
        plan: a :class:`tilefx.planner.Plan` from :func:`tilefx.plan`.
        memory_budget: bytes; the fastest plan whose predicted peak fits.
        max_overhead: fraction of extra time allowed over untiled (default
            ``plans.DEFAULT_MAX_OVERHEAD``, 0.15); the lowest peak within it.
            ``float("inf")``: the lowest peak, its latency measured while planning.
        max_extra_compute: fraction of the model's MACs a plan may compute again (halos of
            tiles, skips computed again instead of stored), with any of the options above;
            default: no limit. ``0`` keeps to plans that compute every MAC once (streaming).
        tune: check the time bound by measuring the few plans near it beside the untiled
            model (``tilefx.autotune``; default). ``False`` trusts the time model's
            prediction (faster planning; the bound then holds only as well as the model).

    >>> import torch, torchvision, tilefx
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 256, 256)
    >>> gm = tilefx.transform(model, x, merge="layer2", tiles=(2, 2))
    >>> torch.testing.assert_close(gm(x), model(x))
    >>> "tiled_region_0" in gm.code
    True
    """
    inputs = _inputs(model, example_inputs, example_kwargs)
    try:
        gm = prepare(model, inputs)
    except NotCaptured as e:
        if merge is not None or tiles is not None or plan is not None:
            raise  # a user-fixed merge, grid or plan names the whole model's graph
        return _transform_parts(model, inputs, e, halo=halo, memory_budget=memory_budget,
                                max_overhead=max_overhead, max_extra_compute=max_extra_compute,
                                tune=tune)
    if plan is None:
        plan = _choose(gm, inputs, merge, tiles, memory_budget, max_overhead, tune,
                       max_extra_compute)
    elif not isinstance(plan, planner.Plan):
        raise TilingError(f"plan= takes a tilefx.planner.Plan (from tilefx.plan), got "
                          f"{type(plan).__name__}")
    out = apply(gm, plan, halo=halo)
    out.meta["tilefx_example_shape"] = tuple(inputs.spatial.shape)
    return out


def apply(gm: GraphModule, plan: "planner.Plan", halo: bool = True) -> GraphModule:
    """Apply ``plan`` to ``gm`` (annotated, from :func:`prepare`): first the skips it computes
    again (``passes.recompute``), then its regions in order, each one ``tile_rewrite`` (merge
    node(s), tile grid, the tensors it starts after, whether it runs in passes) or
    ``stream_rewrite`` (a streaming region), then the primitives it chose for untiled layers
    and inside its regions (``passes.primitives``); ``gm`` is not modified. ``halo=False`` is the
    approximate mode. The result carries the plan (``explain``).

    >>> import torch, torchvision, tilefx
    >>> m = torchvision.models.resnet18().eval(); x = torch.randn(1, 3, 128, 128)
    >>> gm = tilefx.prepare(m, x)
    >>> p = tilefx.plan(m, x, max_overhead=1.0)
    >>> torch.testing.assert_close(apply(gm, p)(x), m(x))
    """
    out = recompute_skips(gm, plan.recompute) if plan.recompute else gm
    for region in plan.regions:
        if region.stream and halo:
            out = stream_rewrite(out, region.merge, region.stream, start=region.start)
            continue
        out = tile_rewrite(out, region.merge, region.tiles, halo=halo, start=region.start,
                           multipass=region.multipass and halo)
    if plan.every_primitive:  # after the regions: an emitted primitive is a barrier to them
        out = apply_primitives(out, plan.every_primitive)
    if out is gm:  # nothing worth tiling: an untiled copy, still an ordinary GraphModule
        out = tile_rewrite_copy(gm)
    out.meta["tilefx_plan"] = plan
    return out


def _transform_parts(model: torch.nn.Module, inputs: Inputs, err: NotCaptured,
                     **options: Any) -> GraphModule:
    """Transform each child of a model that cannot be captured whole (``tilefx.parts``)."""
    sp = parts.split(model, inputs)
    if sp is None:
        raise err
    glue = sp.glue
    report: dict[str, str] = {}
    for name in [n.target for n in glue.graph.nodes if n.op == "call_module"]:
        child_inputs = sp.calls.get(name)
        if child_inputs is None:
            report[name] = "left as it is: called more than once, or not on an image"
            continue
        child = glue.get_submodule(name)
        try:
            tiled = transform(child, child_inputs, **options)
        except TilingError as e:
            report[name] = f"left as it is: {str(e).splitlines()[0][:200]}"
            continue
        glue.add_submodule(name, tiled)  # the glue's own module tree; the model is untouched
        sub = tiled.meta.get("tilefx_parts")
        report[name] = "tiled" if any(True for _ in _regions_of(tiled)) else "captured, untiled"
        if sub:
            report.update({f"{name}.{k}": v for k, v in sub.items()})
    glue.meta["tilefx_parts"] = report
    glue.meta["tilefx_parts_reason"] = str(err).splitlines()[0]
    glue.meta["tilefx_example_shape"] = tuple(inputs.spatial.shape)
    want = _run(model, inputs)
    if not outputs_match(want, _run(glue, inputs)):  # pragma: no cover - each part is checked
        raise TilingError(f"the parts of {type(model).__name__} transformed one by one compute "
                          "something else than the model; please report this") from err
    return glue


def _run(m: torch.nn.Module, inputs: Inputs) -> Any:
    with torch.no_grad():
        return m(*inputs.args, **inputs.kwargs)


def tile_rewrite_copy(gm: GraphModule) -> GraphModule:
    """An untiled copy of ``gm`` with its calling convention."""
    out = GraphModule(gm, gm.graph.__deepcopy__(), type(gm).__name__)
    out.meta.update(gm.meta)
    return keep_calling_convention(out, gm)


def plan(model: torch.nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None,
         *, tiles: int | tuple[int, ...] | None = None, memory_budget: int | None = None,
         max_overhead: float | None = None, max_extra_compute: float | None = None,
         tune: bool = True) -> "planner.Plan":
    """Plan the tiling of ``model`` without rewriting it: merge node(s), tile grids, predictions.

    The returned :class:`tilefx.planner.Plan` carries the predicted peak (``peak_bytes``,
    ``baseline_peak_bytes``), the halos' extra MACs (``extra_compute``), the predicted time
    (``overhead``) and every Pareto-optimal alternative (``pareto()``, lowest peak last). Pass
    it to :func:`transform` as ``plan=`` to apply it. Options as in :func:`transform`.

    >>> import torch, torchvision, tilefx
    >>> model = torchvision.models.mobilenet_v2().eval()
    >>> x = torch.randn(1, 3, 512, 512)
    >>> p = tilefx.plan(model, x, tune=False)  # the time model's choice, measuring no plan
    >>> p.peak_bytes < p.baseline_peak_bytes
    True
    >>> p.pareto()[-1].peak_bytes <= p.peak_bytes   # the frontier, lowest peak last
    True
    >>> gm = tilefx.transform(model, x, plan=p)
    >>> torch.testing.assert_close(gm(x), model(x))
    """
    inputs = _inputs(model, example_inputs, example_kwargs)
    return _choose(prepare(model, inputs), inputs, None, tiles, memory_budget, max_overhead, tune,
                   max_extra_compute)


def _choose(gm: GraphModule, inputs: Inputs, merge, tiles, memory_budget, max_overhead,
            tune: bool = True, max_extra_compute: float | None = None) -> "planner.Plan":
    nsp = inputs.spatial.dim() - 2
    if merge is not None:
        merge_nodes = resolve_merge(gm, merge)
        grid = _default_grid(gm, merge_nodes, nsp) if tiles is None else tile_grid(tiles, nsp)
        names = tuple(n.name for n in merge_nodes)
        # Through statistics over the whole map when the region has any: exact, in passes.
        multipass = any(ph.statistics for ph in find_region(gm, merge_nodes, multipass=True).phases)
        return planner.fixed_plan(gm, inputs, [planner.RegionChoice(names, grid, (), multipass)])
    grid = None if tiles is None else tile_grid(tiles, nsp)
    if not tune or memory_budget is not None:
        return planner.plan(gm, inputs, memory_budget=memory_budget, max_overhead=max_overhead,
                            max_extra_compute=max_extra_compute, tiles=grid)
    front = planner.frontier(gm, inputs, tiles=grid).within_compute(max_extra_compute)
    return tuned_plan(gm, inputs, front, max_overhead, allow_untiled=grid is None)


def tuned_plan(gm: GraphModule, example_inputs: Any, front: "planner.Frontier",
               max_overhead: float | None = None, allow_untiled: bool = True) -> "planner.Plan":
    """The lowest-peak plan of ``front`` whose *measured* latency is within ``1 +
    max_overhead`` of the untiled graph's (default ``plans.DEFAULT_MAX_OVERHEAD``): a few
    plans near the bound applied and timed beside ``gm`` (``tilefx.autotune``).
    ``allow_untiled=False`` (a tile grid the user fixed) never falls back to the untiled
    model."""
    inputs = as_inputs(example_inputs)
    bound = DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead

    def ratio_of(p: "planner.Plan", repeats: int) -> float:
        return autotune.measure_ratio(gm, apply(gm, p), inputs.flat, repeats)

    # The choice depends on which plans the frontier offers (a grid, a MAC limit filter them).
    key = measurement_key(gm, inputs, "tune", tuple(p.rewrite for p in front))
    return autotune.choose_measured(front, ratio_of, bound, key=key, allow_untiled=allow_untiled)


def _default_grid(gm: GraphModule, merge_nodes: list, nsp: int) -> tuple[int, ...]:
    """Four tiles per axis, fewer where the region output is too short."""
    outputs = find_region(gm, merge_nodes, multipass=True).outputs
    shortest = [min(facts(o).sizes[a] for o in outputs) for a in range(nsp)]
    return tuple(max(1, min(4, s)) for s in shortest)


class TilePass(PassBase):
    """:func:`transform` as a ``torch.fx`` ``PassBase``, for a ``PassManager``.

    Tiling can then run after other fx passes (conv-bn fusion, a quantizer's rewrites) and
    before ``torch.compile``. Like every tilefx pass it never mutates the module it is given:
    ``call(gm)`` returns ``PassResult(tiled_gm, modified)``, where ``modified`` is ``True`` when
    at least one tiled region was created. Also importable as ``tilefx.passes.TilePass``.

    >>> import torch, torchvision
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> from tilefx.passes import TilePass
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 128, 128)
    >>> result = PassManager([TilePass(x, merge="layer2", tiles=2)])(torch.fx.symbolic_trace(model))
    >>> result.modified, "tiled_region_0" in result.graph_module.code
    (True, True)
    >>> torch.testing.assert_close(result.graph_module(x), model(x))
    """

    def __init__(self, example_inputs: Any, example_kwargs: dict | None = None, *,
                 merge: Any = None, tiles: int | tuple[int, ...] | None = None,
                 halo: bool = True, plan: Any = None, memory_budget: int | None = None,
                 max_overhead: float | None = None, max_extra_compute: float | None = None,
                 tune: bool = True):
        super().__init__()
        self.inputs = as_inputs(example_inputs, example_kwargs)
        self.options = dict(merge=merge, tiles=tiles, halo=halo, plan=plan,
                            memory_budget=memory_budget, max_overhead=max_overhead,
                            max_extra_compute=max_extra_compute, tune=tune)

    def call(self, graph_module: torch.nn.Module) -> PassResult:
        before = sum(isinstance(m, (TiledRegion, StreamRegion)) for m in graph_module.modules())
        out = transform(graph_module, self.inputs, **self.options)
        after = sum(isinstance(m, (TiledRegion, StreamRegion)) for m in out.modules())
        return PassResult(out, after > before)

    def requires(self, graph_module: torch.nn.Module) -> None:
        """Check the pass's precondition: an ``nn.Module`` (ideally a ``GraphModule``)."""
        if not isinstance(graph_module, torch.nn.Module):
            raise TilingError(f"TilePass runs on an nn.Module or torch.fx.GraphModule, got "
                              f"{type(graph_module).__name__}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items()
                         if v is not None and not (k == "halo" and v is True))
        return f"TilePass(example_inputs=({self.inputs.describe()}){', ' if opts else ''}{opts})"


# --------------------------------------------------------------------------- explain


def _regions_of(gm: GraphModule) -> list[tuple[str, TiledRegion | StreamRegion]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, (TiledRegion, StreamRegion))]


def explain(gm: GraphModule, file: TextIO | None = sys.stdout) -> str:
    """Print (and return) the plan of a transformed GraphModule.

    For every tiled region: the merge node(s) reading it, the tile grid, the region's size,
    its outputs, and the halo each tile carries at the planned input shape (a multi-pass
    region is one entry per pass: the statistics each finds, then the pass writing the
    outputs, reading every statistic found before it as a constant); then the
    planner's predictions (peak memory, extra compute), when a planner chose the plan.

    >>> import torch, torchvision, tilefx
    >>> model = torchvision.models.resnet18().eval()
    >>> gm = tilefx.transform(model, torch.randn(1, 3, 128, 128), merge="layer2", tiles=2)
    >>> text = tilefx.explain(gm, file=None)
    >>> "grid 2x2" in text
    True
    """
    lines = []
    shape = gm.meta.get("tilefx_example_shape")
    if "tilefx_parts" in gm.meta:
        lines.append(f"captured in parts ({gm.meta['tilefx_parts_reason'][:160]}):")
        lines.extend(f"  {k}: {v}" for k, v in gm.meta["tilefx_parts"].items())
    regions = _regions_of(gm)
    if not regions:
        lines.append("untiled: no region lowered the predicted peak (the model runs as captured)")
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, region in regions:
        spec = region.spec
        call = by_target.get(name)
        readers = []
        if call is not None:
            for out in call.users:
                readers.extend(_named(u) for u in out.users if _named(u) not in readers)
        if isinstance(region, StreamRegion):
            lines.extend(_stream_lines(gm, name, region, call, readers, shape))
            continue
        grid = "x".join(map(str, spec.grid))
        mode = "exact (halo)" if region.halo else "APPROXIMATE (no halo)"
        lines.append(f"{name}: {len(spec.nodes)} nodes tiled on a grid {grid}, {mode}")
        lines.append(f"  merge node(s): {', '.join(readers[:6]) or '-'}"
                     + (" ..." if len(readers) > 6 else ""))
        nodes = {n.name: n for n in gm.graph.nodes}
        lines.append("  starts after: " + ", ".join(
            _named(nodes[i]) if i in nodes else i for i in spec.inputs))
        if region.statistics:
            lines.append("  finds exactly: " + "; ".join(
                f"{s}: {describe(stat)}" for s, stat in region.statistics))
        lines.append(f"  region outputs: {', '.join(region.writes) or '- (a pass that finds statistics)'}")
        stored = _checkpoints(call, by_target, region.writes) if call is not None else {}
        if stored:
            lines.append("  checkpoints (stored full-size, read by later regions): " + "; ".join(
                f"{o} -> {', '.join(r)}" for o, r in stored.items()))
        if shape is not None and region.halo and call is not None:
            lines.extend("  " + s for s in _halo_lines(region, call, shape))
    plan = gm.meta.get("tilefx_plan")
    if plan is not None and plan.predicted:
        calls = [n for n, _ in regions]
        passes = sum(1 for n in calls if "_pass" in n)
        lines.append(f"plan: {len(plan.regions)} region(s), {len(calls)} tile loop(s) "
                     f"({passes} of them statistics passes)")
        lines.append(f"predicted peak: {_mib(plan.peak_bytes)} tiled vs "
                     f"{_mib(plan.baseline_peak_bytes)} untiled "
                     f"({plan.baseline_peak_bytes / max(plan.peak_bytes, 1):.1f}x lower); "
                     f"extra compute {plan.extra_compute:+.1%}; predicted time {plan.overhead:+.1%}")
    if plan is not None and plan.recompute:
        lines.append("computed again for their late readers instead of stored: "
                     + ", ".join(plan.recompute))
    if plan is not None and plan.primitives:
        shown = ", ".join(f"{n} {p}" for n, p in plan.primitives[:12])
        more = f", ... ({len(plan.primitives)} in all)" if len(plan.primitives) > 12 else ""
        lines.append(f"primitives other than ATen's default (untiled layers): {shown}{more}")
    text = "\n".join(lines)
    if file is not None:
        print(text, file=file)
    return text


def _checkpoints(call, by_target: dict, writes: tuple[str, ...]) -> dict[str, list[str]]:
    """The outputs of a region call that later region calls read: stored full-size between
    them (what a multi-region plan stores instead of recomputing)."""
    out: dict[str, list[str]] = {}
    for item in call.users:
        if item.name not in writes:
            continue  # a statistic, not a stored map
        later = sorted({u.target for u in item.users if u.op == "call_module"
                        and isinstance(by_target.get(u.target) and _module_of(u), TiledRegion)})
        if later:
            out[item.name] = later
    return out


def _module_of(n):
    root = n.graph.owning_module
    return root.get_submodule(n.target) if root is not None else None


def _named(n) -> str:
    """``node (module.path)``: a node with the module it runs in, as users name merge points."""
    path = module_path(n)
    return f"{n.name} ({path[-1]})" if path else n.name


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def _halo_lines(region: TiledRegion, call, shape) -> list[str]:
    spec = region.spec
    nsp = spec.nsp
    sizes = {}
    for name, arg in zip(spec.inputs, (call.args[i] for i in region.spatial_args)):
        tm = arg.meta.get("tensor_meta")
        sizes[name] = tuple(tm.shape[-nsp:]) if tm is not None else tuple(shape[-nsp:])
    sched = region.schedule_for(sizes)
    first = spec.inputs[0]
    reads = [tuple(b - a for a, b in read_window(tile, first)) for tile in sched.tiles]
    share = tuple(-(-L // g) for L, g in zip(sizes[first], spec.grid))
    widest = tuple(max(r[a] for r in reads) for a in range(nsp))
    return [
        f"input {first} {'x'.join(map(str, sizes[first]))}: each tile reads up to "
        f"{'x'.join(map(str, widest))} for a share of {'x'.join(map(str, share))} "
        f"(halo up to +{max(w - s for w, s in zip(widest, share))} px per axis)"
    ]


def _stream_lines(gm: GraphModule, name: str, region: StreamRegion, call, readers: list[str],
                  shape) -> list[str]:
    """A streaming region: strip height, strips at the planned shape, row buffers and FIFOs."""
    spec = region.spec
    nodes = {n.name: n for n in gm.graph.nodes}
    lines = [f"{name}: {len(spec.nodes)} nodes streamed in strips of {spec.strip} rows "
             f"({len(spec.stages)} stages), exact: every row of every node computed once",
             f"  merge node(s): {', '.join(readers[:6]) or '-'}" + (" ..." if len(readers) > 6 else ""),
             "  starts after: " + ", ".join(_named(nodes[i]) if i in nodes else i
                                           for i in spec.region.inputs),
             f"  region outputs: {', '.join(spec.outputs)}"]
    chosen = {k: v for stage in region.stages for k, v in primitive_nodes(stage).items()}
    if chosen:
        lines.append("  primitives other than ATen's default, on every strip: "
                     + ", ".join(f"{n} {p}" for n, p in sorted(chosen.items())))
    if shape is None or call is None:
        return lines
    nsp = spec.nsp
    sizes = {}
    for i, arg in zip(spec.region.inputs, (call.args[k] for k in region.spatial_args)):
        tm = arg.meta.get("tensor_meta")
        sizes[i] = tuple(tm.shape[-nsp:]) if tm is not None else tuple(shape[-nsp:])
    rows = region.schedule_for(sizes).rows
    first = spec.region.inputs[0]
    lines.append(f"  at {'x'.join(map(str, sizes[first]))}: {len(rows.new)} strips "
                 f"({rows.warmup} warm-up strips while the first output rows' lead fills)")
    stored = [n for n in spec.stored if n not in spec.outputs]

    def nbytes(n: str) -> float:
        return (rows.capacity[n] * math.prod(rows.sizes[n][1:])
                * region.position_bytes.get(n, 0.0))

    total = sum(nbytes(n) for n in stored)
    lines.append(f"  row buffers: {_mib(total)} in {len(stored)} (rows kept of the map's; "
                 "carried = rows a later strip reads again):")
    for n in sorted(stored, key=nbytes, reverse=True)[:8]:
        fifo = " (FIFO)" if rows.carried[n] > 2 * spec.strip else ""
        lines.append(f"    {n}: {rows.capacity[n]} rows of {rows.sizes[n][0]}, carries "
                     f"{rows.carried[n]}{fifo}, {_mib(nbytes(n))}")
    if len(stored) > 8:
        lines.append(f"    ... and {len(stored) - 8} smaller")
    return lines


# --------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class Comparison:
    """How far a transformed module's output is from the model's."""

    max_abs: float
    rel_l2: float
    top1_agreement: float | None

    def __str__(self) -> str:
        top1 = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.1%}"
        return f"max abs error {self.max_abs:.3g}, relative L2 {self.rel_l2:.3g}, top-1 agreement {top1}"


def compare(model: torch.nn.Module, gm: torch.nn.Module, x: torch.Tensor) -> Comparison:
    """Run both on ``x`` and report max abs error, relative L2 error and top-1 agreement.

    Top-1 agreement is the fraction of positions where the argmax over dim 1 (classes) agrees;
    for a halo (exact) transform it is 100% and the errors are rounding.

    >>> import torch, torchvision, tilefx
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 128, 128)
    >>> gm = tilefx.transform(model, x, merge="layer2", tiles=2, halo=False)
    >>> c = tilefx.compare(model, gm, x)
    >>> c.max_abs > 0
    True
    """
    with torch.no_grad():
        want, _ = tree_flatten(model(x))
        got, _ = tree_flatten(gm(x))
    want = [t for t in want if isinstance(t, torch.Tensor)]
    got = [t for t in got if isinstance(t, torch.Tensor)]
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        raise TilingError("the transformed module's outputs do not match the model's in structure")
    max_abs, num, den, agree, total = 0.0, 0.0, 0.0, 0, 0
    for a, b in zip(want, got):
        a64, b64 = a.double(), b.double()
        max_abs = max(max_abs, (a64 - b64).abs().max().item() if a.numel() else 0.0)
        num += (a64 - b64).pow(2).sum().item()
        den += a64.pow(2).sum().item()
        if a.dim() >= 2 and a.shape[1] > 1 and a.is_floating_point():
            agree += (a.argmax(1) == b.argmax(1)).sum().item()
            total += a.argmax(1).numel()
    return Comparison(max_abs, math.sqrt(num / den) if den else 0.0,
                      agree / total if total else None)
