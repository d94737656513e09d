"""Pictures of a tiling: the live-memory curve, the planner's frontier, the tile grid, a
streaming region's strip schedule and row buffers.

Each function returns a ``matplotlib.figure.Figure`` (or draws into the ``ax`` it is given).
Figures are built without ``pyplot``, so nothing global changes and nothing pops up: in a
notebook, leave the figure as the cell's last expression to show it; elsewhere,
``fig.savefig("memory.png")``. matplotlib is an optional dependency
(``pip install 'tilefx[plot]'``) imported only when a function here is called.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .api import prepare, transform
from .errors import TilingError
from .passes.memory import simulate
from .region import TiledRegion
from .stream_region import StreamRegion
from .tiling import read_window

__all__ = ["plot_memory", "plot_pareto", "plot_tiles", "plot_strips"]

_MIB = 2**20


def _mpl():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        raise ImportError("tilefx.plots needs matplotlib: pip install 'tilefx[plot]' "
                          "(or pip install matplotlib)") from None
    return Figure, Rectangle


_FIGURE_CLASS = None


def _figure_class():
    """``matplotlib.figure.Figure`` with a ``_repr_png_``, so that a figure left as a notebook
    cell's last expression shows without pyplot (and without pyplot's second copy)."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        Figure, _ = _mpl()

        class _NotebookFigure(Figure):
            def _repr_png_(self) -> bytes:
                import io

                buf = io.BytesIO()
                self.savefig(buf, format="png")
                return buf.getvalue()

        _NotebookFigure.__module__ = __name__
        globals()["_NotebookFigure"] = _FIGURE_CLASS = _NotebookFigure  # picklable by name
    return _FIGURE_CLASS


def _axes(ax: Any, size: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    fig = _figure_class()(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _regions(gm: torch.nn.Module, kind: type = TiledRegion) -> list[tuple[str, Any]]:
    """The (name, module) of every region module of ``kind`` in ``gm``."""
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, kind)]


# --------------------------------------------------------------------------- memory curve


def _group(name: str) -> str:
    """The top-level block a node belongs to, from its name (``layer2_0_conv1`` -> ``layer2``)."""
    return name.split("_")[0] or name


def _groups(gm: torch.nn.Module, depth: int = 1) -> dict[str, str]:
    """Node name -> the submodule it runs in, ``depth`` levels deep (``layer2``, ``layer2.0``)."""
    out = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
        paths = [p for p in paths if p]
        path = str(n.target) if n.op == "call_module" else (paths[-1] if paths else None)
        if path:
            out[n.name] = ".".join(path.split(".")[:depth])
    return out


def _block_ticks(gm: torch.nn.Module, names: list[str]) -> tuple[list[int], list[str]]:
    """Tick positions where a block starts: top-level blocks, or one level deeper when the
    model has fewer than five top-level blocks (``backbone``, ``classifier``)."""
    best = ([], [])
    for depth in (1, 2, 3):
        groups = _groups(gm, depth)
        ticks, labels, last = [], [], None
        gap = max(1, len(names) // 60)  # keep labels from piling up on short blocks
        for i, name in enumerate(names):
            g = groups.get(name, last if last is not None else _group(name))
            if g != last:
                if not ticks or i - ticks[-1] >= gap:
                    ticks.append(i)
                    labels.append(g)
                last = g
        if len(ticks) > 30:
            break
        best = (ticks, labels)
        if len(ticks) >= 5:
            break
    return best


def plot_memory(model: torch.nn.Module, x: torch.Tensor, tiled: torch.nn.Module | None = None, *,
                ax: Any = None, title: str | None = None, workspace: str | None = "auto",
                **transform_options: Any):
    """Plot the predicted live memory during the forward pass, untiled and tiled.

    The curve is ``tilefx.passes.memory.simulate``'s: for every node in execution order, the
    bytes of the tensors alive while it runs (weights and the input excluded). The tiled
    curve is drawn against the untiled graph's nodes; a tiled region is one step spanning the
    nodes it runs tile by tile (shaded). Both peaks are marked.

    Args:
        model: the untiled model (an ``nn.Module`` or ``GraphModule``). If it already contains
            tiled regions (the output of :func:`tilefx.transform`), only its curve is drawn.
        x: the input.
        tiled: the transformed module; default ``tilefx.transform(model, x, **transform_options)``.
        ax: a matplotlib ``Axes`` to draw into (default: a new figure).
        title: the axes title (default: the model's class name and the input shape).
        workspace: the scratch-memory model of ``simulate`` (``"auto"``, ``"cpu"`` or ``None``).
        **transform_options: passed to :func:`tilefx.transform` when ``tiled`` is not given.

    Returns:
        The matplotlib ``Figure``.

    >>> import torch, torchvision
    >>> from tilefx.plots import plot_memory
    >>> model = torchvision.models.resnet18().eval()
    >>> fig = plot_memory(model, torch.randn(1, 3, 128, 128), merge="layer2", tiles=(2, 2))
    >>> [line.get_label().split(":")[0] for line in fig.axes[0].get_lines()[:2]]
    ['untiled', 'tiled']
    >>> fig.savefig("/tmp/tilefx_memory.png")
    """

    fig, ax = _axes(ax, (10, 4.2))
    with torch.no_grad():
        if _regions(model):
            before, after, after_gm = None, simulate(model, x, workspace=workspace), model
        else:
            base = prepare(model, x)
            before = simulate(base, x, workspace=workspace)
            after_gm = tiled if tiled is not None else transform(model, x, **transform_options)
            after = simulate(after_gm, x, workspace=workspace)

    ref = before.curve if before is not None else after.curve
    pos = {name: i for i, (name, _) in enumerate(ref)}
    n = len(ref)
    if before is not None:
        xs = list(range(n)) + [n]
        ys = [b / _MIB for _, b in before.curve]
        ax.step(xs, ys + ys[-1:], where="post", color="tab:gray", lw=1.6,
                label=f"untiled: peak {before.peak_bytes / _MIB:.1f} MiB at {before.peak_node}")

    # The tiled curve on the untiled graph's positions; a region spans the nodes it replaced.
    spans = {}
    for name, region in _regions(after_gm):
        inside = [pos[r.name] for r in region.spec.nodes if r.name in pos]
        if inside:
            spans[name] = (min(inside), max(inside) + 1, region)
    pts: list[tuple[float, float]] = []
    cursor = 0.0
    for name, b in after.curve:
        if name in spans:
            lo, hi, _ = spans[name]
            pts += [(lo, b / _MIB), (hi, b / _MIB)]
            cursor = hi
        elif name not in pos:  # a node the untiled graph does not have: one step after the last
            pts.append((cursor, b / _MIB))
            cursor += 1
        elif pos[name] >= cursor:
            pts.append((pos[name], b / _MIB))
            cursor = pos[name] + 1
        # else: a region output read back inside its span (a view): nothing new is alive
    pts.append((max(cursor, pts[-1][0] + 1), pts[-1][1]))
    label = "tiled" if before is not None else "memory"
    ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:blue", lw=2.0,
            label=f"{label}: peak {after.peak_bytes / _MIB:.1f} MiB at {after.peak_node}")
    for k, (name, (lo, hi, region)) in enumerate(spans.items()):
        ax.axvspan(lo, hi, color="tab:blue", alpha=0.08, lw=0)
        ax.text((lo + hi) / 2, 0.98 - 0.11 * k, f"{name}\n{'x'.join(map(str, region.grid))} tiles",
                transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8,
                color="tab:blue")

    peaks = [(after.peak_bytes, "tab:blue")]
    if before is not None:
        peaks.append((before.peak_bytes, "tab:gray"))
        ratio = before.peak_bytes / max(after.peak_bytes, 1)
        ax.annotate(f"{ratio:.1f}x lower peak", xy=(0.99, after.peak_bytes / _MIB),
                    xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=9,
                    color="tab:blue")
    for b, color in peaks:
        ax.axhline(b / _MIB, color=color, ls=":", lw=1)

    ticks, labels = _block_ticks(base if before is not None else after_gm, [nm for nm, _ in ref])
    ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(0, n)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("live memory (MiB)")
    ax.set_xlabel("nodes in execution order")
    shape = "x".join(map(str, x.shape))
    ax.set_title(title or f"{type(model).__name__}: predicted live memory per node, input {shape}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.88), fontsize=9)
    return fig


# --------------------------------------------------------------------------- Pareto frontier


def plot_pareto(plan: Any, *, ax: Any = None, budget: int | None = None, title: str | None = None,
                annotate: int = 3):
    """Plot the planner's Pareto frontier: predicted peak memory against predicted time.

    Every point is a plan from ``plan.pareto()``; the chosen ``plan`` is starred, the untiled
    model is the gray square at 1x, and ``budget`` (bytes), if given, is a dashed line. The x
    axis is the predicted time relative to the untiled model, on a log scale (or the extra MACs
    when the plans carry no time prediction).

    Args:
        plan: a :class:`tilefx.planner.Plan` (from ``tilefx.planner.plan``).
        ax: a matplotlib ``Axes`` to draw into (default: a new figure).
        budget: a memory budget in bytes to draw.
        title: the axes title.
        annotate: how many other frontier points to label, spread along it.

    Returns:
        The matplotlib ``Figure``.

    >>> import torch, torchvision
    >>> from tilefx import prepare
    >>> from tilefx.planner import plan
    >>> from tilefx.plots import plot_pareto
    >>> x = torch.randn(1, 3, 256, 256)
    >>> gm = prepare(torchvision.models.resnet18().eval(), x)
    >>> fig = plot_pareto(plan(gm, x))
    >>> fig.axes[0].get_ylabel()
    'predicted peak memory (MiB)'
    """
    fig, ax = _axes(ax, (8, 4.8))
    points = sorted(plan.pareto(), key=_cost)
    use_time = all(getattr(p, "time_s", None) for p in points + [plan])

    def xval(p: Any) -> float:
        return 1.0 + _cost(p) if use_time else 100 * p.extra_compute

    xs = [xval(p) for p in points]
    ys = [p.peak_bytes / _MIB for p in points]
    base = plan.baseline_peak_bytes / _MIB
    ax.step(xs, ys, where="post", color="tab:blue", lw=1, alpha=0.5)
    ax.scatter(xs, ys, color="tab:blue", s=22, zorder=3, label="Pareto-optimal plans")
    ax.axhline(base, color="tab:gray", ls=":", lw=1)
    ax.scatter([1.0 if use_time else 0.0], [base], marker="s", color="tab:gray", s=40, zorder=4,
               label=f"untiled: {base:.1f} MiB")
    chosen = (xval(plan), plan.peak_bytes / _MIB)
    ratio = plan.baseline_peak_bytes / max(plan.peak_bytes, 1)
    ax.scatter(*chosen, marker="*", color="tab:red", s=220, zorder=5,
               label=f"chosen: {plan.label}\n  {chosen[1]:.1f} MiB ({ratio:.1f}x lower)")
    if budget is not None:
        ax.axhline(budget / _MIB, color="tab:red", ls="--", lw=1,
                   label=f"budget {budget / _MIB:.1f} MiB")

    # Letter a few other points spread along the frontier (the lowest peak first), skipping
    # points too close to one already lettered; the legend says which plan each letter is.
    def far(a: tuple[float, float], b: tuple[float, float]) -> bool:
        dx = abs(math.log(a[0] / b[0])) if use_time else abs(a[0] - b[0]) / 100
        return dx > 0.03 or abs(a[1] - b[1]) > 0.06 * base

    taken = [chosen, (1.0 if use_time else 0.0, base)]
    for i in range(len(points) - 1, -1, -1):
        if len(taken) - 2 >= annotate:
            break
        p = points[i]
        if p.changes_nothing or p.rewrite == plan.rewrite or not all(far((xs[i], ys[i]), t) for t in taken):
            continue
        letter = "ABCDEFGHIJ"[len(taken) - 2]
        ax.annotate(letter, (xs[i], ys[i]), textcoords="offset points", xytext=(4, 5),
                    fontsize=9, fontweight="bold", color="tab:blue")
        ax.plot([], [], " ", label=f"{letter}: {p.label}, {ys[i]:.1f} MiB")
        taken.append((xs[i], ys[i]))
    if use_time:
        from matplotlib.ticker import FuncFormatter

        right = max(xs + [chosen[0], 1.0]) * 1.15
        ax.set_xscale("log")
        ax.set_xlim(0.95, right)
        ax.set_xticks([t for t in (1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100) if t <= right])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("predicted time relative to untiled (log scale)")
    else:
        ax.set_xlabel("extra compute (% of MACs)")
    ax.set_ylabel("predicted peak memory (MiB)")
    ax.set_ylim(0, base * 1.08)
    ax.set_title(title or "tilefx planner: the Pareto frontier of peak memory against time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _cost(p: Any) -> float:
    t, t0 = getattr(p, "time_s", None), getattr(p, "baseline_time_s", None)
    return t / t0 - 1.0 if t and t0 else p.extra_compute


# --------------------------------------------------------------------------- tile grid


def _region_input_sizes(gm: torch.nn.Module, region: TiledRegion, x: torch.Tensor) -> dict:
    """The spatial extents of ``region``'s inputs when ``gm`` runs on ``x``."""
    seen: dict = {}

    def hook(_, args):
        seen.update(region.input_sizes(args))

    handle = region.register_forward_pre_hook(hook)
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            gm(x)
    except Exception:  # some op without a fake kernel: run it for real
        if not seen:
            with torch.no_grad():
                gm(x)
    finally:
        handle.remove()
    return seen


def _display_image(x: torch.Tensor, image: Any):
    if image is not None:
        img = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.as_tensor(image)
        if img.dim() == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
            img = img.permute(1, 2, 0)
        return img.float().numpy(), None
    t = x[0].detach().float().cpu()
    if t.shape[0] == 3:
        lo = t.amin(dim=(1, 2), keepdim=True)
        hi = t.amax(dim=(1, 2), keepdim=True)
        return ((t - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0).numpy(), None
    return t.mean(0).numpy(), "gray"


def _pick(caller: str, found: list, region: str | int, none: str):
    """The ``(name, module)`` of ``found`` that ``region`` (an index or a name) selects, or a
    TilingError from ``caller`` naming what the module has."""
    if not found:
        raise TilingError(f"{caller}: {none}")
    names = [n for n, _ in found]
    if isinstance(region, int):
        if not -len(found) <= region < len(found):
            raise TilingError(f"{caller}: region {region} out of range; the module has {names}")
        return found[region]
    if region not in names:
        raise TilingError(f"{caller}: no region {region!r}; the module has {names}")
    return found[names.index(region)]


def plot_tiles(gm: torch.nn.Module, x: torch.Tensor, *, region: str | int = 0, image: Any = None,
               highlight: tuple[int, ...] | None = None, ax: Any = None, title: str | None = None):
    """Draw a tiled region's tile grid, with the halo each tile reads, over the input image.

    Solid white lines partition the image into the tiles' shares (what each tile produces,
    mapped back to input pixels); a dashed colored box per tile is the input window it
    actually reads, share plus halo, reaching past the border where the region pads. One tile
    (``highlight``, default the one nearest the center) is filled.

    Args:
        gm: a module returned by :func:`tilefx.transform`.
        x: the input (``N, C, H, W``); batch element 0 is drawn unless ``image`` is given.
        region: the region's name (``"tiled_region_0"``) or index.
        image: what to draw underneath (``H x W x 3`` array or ``3 x H x W`` tensor); default
            ``x[0]`` scaled to [0, 1] per channel (gray for other channel counts).
        highlight: the grid index of the tile to fill.
        ax: a matplotlib ``Axes`` to draw into (default: a new figure).
        title: the axes title.

    Returns:
        The matplotlib ``Figure``.

    >>> import torch, torchvision, tilefx
    >>> from tilefx.plots import plot_tiles
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 256, 256)
    >>> gm = tilefx.transform(model, x, merge="layer2", tiles=(3, 3))
    >>> fig = plot_tiles(gm, x)
    >>> fig.axes[0].get_title().startswith("tiled_region_0: 3x3 tiles")
    True
    """
    _, Rectangle = _mpl()
    name, reg = _pick("plot_tiles", _regions(gm), region,
                      "this module has no tiled region; pass the output of tilefx.transform")
    spec = reg.spec
    if spec.nsp != 2 or x.dim() != 4:
        raise TilingError(f"plot_tiles draws 2-d images; {name} tiles {spec.nsp} spatial axes")

    sizes = _region_input_sizes(gm, reg, x)
    first = spec.inputs[0]
    L = sizes[first]
    H, W = x.shape[-2:]
    sy, sx = H / L[0], W / L[1]  # a later region's input is a feature map: scale to pixels
    sched = reg.schedule_for(sizes)
    full = sched.sizes
    out0 = spec.outputs[0]

    fig, ax = _axes(ax, (7, 7 * H / W + 0.6))
    img, cmap = _display_image(x, image)
    ax.imshow(img, cmap=cmap, extent=(0, W, H, 0), interpolation="nearest")
    grid = spec.grid
    if highlight is None:
        highlight = tuple((g - 1) // 2 for g in grid)
    colors = ["tab:red", "tab:orange", "tab:green", "tab:cyan", "tab:purple", "tab:pink",
              "gold", "tab:olive"]
    reach = 0.0
    widest = (0, 0)
    for k, tile in enumerate(sched.tiles):
        piece = tile.pieces[out0].window
        share = [(a * L[ax_] / full[out0][ax_], b * L[ax_] / full[out0][ax_])
                 for ax_, (a, b) in enumerate(piece)]
        read = read_window(tile, first)
        (r0, r1), (c0, c1) = read
        (s0, s1), (t0, t1) = share
        reach = max(reach, -r0 * sy, -c0 * sx, (r1 - L[0]) * sy, (c1 - L[1]) * sx)
        widest = max(widest, (r1 - r0, c1 - c0))
        ax.add_patch(Rectangle((t0 * sx, s0 * sy), (t1 - t0) * sx, (s1 - s0) * sy, fill=False,
                               ec="white", lw=1.6, zorder=3))
        color = colors[k % len(colors)]
        hl = tuple(tile.index) == tuple(highlight)
        ax.add_patch(Rectangle((c0 * sx, r0 * sy), (c1 - c0) * sx, (r1 - r0) * sy,
                               fill=hl, fc=color, alpha=0.28 if hl else 0.75, ec=color,
                               ls="-" if hl else "--", lw=2.2 if hl else 1.0, zorder=4))
        if hl:
            ax.add_patch(Rectangle((c0 * sx, r0 * sy), (c1 - c0) * sx, (r1 - r0) * sy,
                                   fill=False, ec=color, lw=2.2, zorder=5))
            ax.text(c0 * sx + 2, r0 * sy + 2, f"tile {tile.index}: reads {r1 - r0}x{c1 - c0}",
                    color="white", fontsize=8, va="top", ha="left", zorder=6,
                    bbox=dict(fc=color, alpha=0.8, lw=0, pad=1.5))
    m = reach + 2
    ax.set_xlim(-m, W + m)
    ax.set_ylim(H + m, -m)
    ax.add_patch(Rectangle((0, 0), W, H, fill=False, ec="black", lw=1, zorder=2))
    share_px = (math.ceil(L[0] / grid[0]), math.ceil(L[1] / grid[1]))
    halo = max(widest[0] - share_px[0], widest[1] - share_px[1])
    scaled = (sy, sx) != (1.0, 1.0)
    unit = (f"\n(the region reads a {L[0]}x{L[1]} feature map, drawn at image scale)"
            if scaled else "")
    ax.set_title(title or f"{name}: {'x'.join(map(str, grid))} tiles over a {H}x{W} input{unit}\n"
                 f"white: each tile's share; dashed: the window it reads\n(up to "
                 f"{widest[0]}x{widest[1]}, halo up to +{halo} {'feature-map ' if scaled else ''}px)",
                 fontsize=10)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    return fig


# --------------------------------------------------------------------------- strips


def plot_strips(gm: torch.nn.Module, x: torch.Tensor, *, region: str | int = 0,
                ax: Any = None, title: str | None = None):
    """A streaming region's strip schedule and its row buffers.

    Left: for every stored node (a stage's last node), the fraction of its rows computed after
    each strip (a line), and the rows its row buffer holds (the band below the line, from the
    first row a later strip still reads): encoders run ahead of decoders by their receptive-field
    delay, and a U-Net skip's band is the FIFO the decoder reads. Right: each row buffer's
    capacity in rows and the rows it carries from strip to strip. ``ax`` (optional) is the left
    axes; the right one is added beside it.

    >>> import torch, tilefx
    >>> from tilefx.passes.stream_rewrite import stream_rewrite
    >>> from tilefx.plots import plot_strips
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                         torch.nn.Conv2d(4, 2, 3, padding=1)).eval()
    >>> x = torch.randn(1, 3, 32, 32)
    >>> fig = plot_strips(stream_rewrite(tilefx.prepare(m, x), "output", strip=4), x)
    >>> fig.axes[0].get_title().startswith("stream_region_0: strips of 4 rows")
    True
    """
    _mpl()
    name, reg = _pick("plot_strips",
                      _regions(gm, StreamRegion), region,
                      "this module has no streaming region; pass the output of "
                      "passes.stream_rewrite (or tilefx.transform with a streaming plan)")
    spec = reg.spec
    sizes = {spec.region.inputs[0]: tuple(x.shape[-spec.nsp:])}
    if len(spec.region.inputs) > 1:  # pragma: no cover - regions with several image inputs
        sizes = _region_input_sizes(gm, reg, x)
    rows = reg.schedule_for(sizes).rows
    if ax is None:
        fig = _figure_class()(figsize=(12, 5.5), layout="constrained")
        ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig = ax.figure
        bars = fig.add_subplot(1, 2, 2)
    stored = list(spec.stored)
    strips = range(len(rows.new))
    cmap = _cmap(len(stored))
    for k, n in enumerate(stored):
        H = rows.sizes[n][0]
        done = [d / H for d in rows.done[n]]
        keep = [min(kp, d) / H for kp, d in zip(rows.keep[n], rows.done[n])]
        color = cmap(k)
        ax.plot(strips, done, color=color, lw=1.4, label=f"{n} ({H} rows)")
        if n not in spec.outputs:
            ax.fill_between(strips, keep, done, color=color, alpha=0.18, lw=0)
    ax.axvline(rows.warmup - 0.5, color="gray", ls=":", lw=1)
    ax.text(rows.warmup - 0.5, 1.02, " first output rows", color="gray", fontsize=8,
            transform=ax.get_xaxis_transform())
    ax.set_xlabel("strip")
    ax.set_ylabel("fraction of the node's rows computed (band: rows its buffer holds)")
    ax.set_ylim(0, 1.05)
    if len(stored) <= 16:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or f"{name}: strips of {spec.strip} rows, {len(rows.new)} strips at "
                 f"{'x'.join(map(str, sizes[spec.region.inputs[0]]))} ({rows.warmup} warm-up)",
                 fontsize=10)
    inner = [n for n in stored if n not in spec.outputs]
    ys = range(len(inner))
    bars.barh(ys, [rows.capacity[n] for n in inner], color="tab:blue", alpha=0.5,
              label="ring capacity (rows)")
    bars.barh(ys, [rows.carried[n] for n in inner], color="tab:red", alpha=0.7,
              label="carried from strip to strip")
    bars.set_yticks(list(ys), [f"{n} /{rows.sizes[n][0]}" for n in inner], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("rows (of the node's map, after the slash)")
    bars.set_title("row buffers and FIFOs", fontsize=10)
    bars.legend(fontsize=7, loc="lower right")
    return fig


def _cmap(n: int):
    from matplotlib import colormaps

    base = colormaps["viridis"]
    return lambda k: base(k / max(n - 1, 1))
