"""The ``tilefx`` command: ``demo``, ``plan`` and ``bench``.

::

    tilefx demo                                          # tile ResNet-50, show what it buys
    tilefx plan resnet50 --shape 1,3,1024,1024 --budget 200MB
    tilefx bench resnet18 --shape 1,3,512,512 --json
    tilefx plan mypkg.models:build_unet --shape 1,1,512,512

MODEL is a torchvision model name (``torchvision.models.list_models()``; random weights, nothing
is downloaded), a timm model name when timm is installed, or ``package.module:callable`` (a
module instance, or a callable with no required arguments that returns one). Errors are one line
on stderr and a nonzero exit status (2 for bad arguments, 1 for everything else); ``--traceback``
shows the full Python traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import math
import re
import statistics
import sys
import time
from typing import Any, Sequence, TextIO

__all__ = ["main", "load_model", "parse_shape", "parse_bytes", "UsageError"]


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


# --------------------------------------------------------------------------- argument parsing


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20,
          "g": 2**30}


def parse_bytes(text: str) -> int:
    """Parse a memory size: a number of bytes, or a number with a unit.

    ``KB``/``MB``/``GB`` are powers of 1000, ``KiB``/``MiB``/``GiB`` (and the bare ``K``/``M``/
    ``G``) powers of 1024; case does not matter.

    >>> parse_bytes("200MB"), parse_bytes("1.5GiB"), parse_bytes("4096")
    (200000000, 1610612736, 4096)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read {text!r} as a memory size; write e.g. 200MB, 1.5GiB or 4096")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"memory size {text!r} must be positive")
    return int(value)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse an input shape ``N,C,H,W`` (``x`` also separates; 3 to 5 axes).

    >>> parse_shape("1,3,512,512"), parse_shape("2x3x64x96")
    ((1, 3, 512, 512), (2, 3, 64, 96))
    """
    parts = [p for p in re.split(r"[,x×\s]+", str(text).strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"cannot read shape {text!r}; write N,C,H,W e.g. 1,3,512,512") from None
    if not 3 <= len(shape) <= 5 or any(s < 1 for s in shape):
        raise UsageError(f"shape {text!r} must have 3 to 5 positive sizes (N, C, *spatial), "
                         "e.g. 1,3,512,512")
    return shape


def _parse_tiles(text: str) -> tuple[int, ...]:
    try:
        tiles = tuple(int(p) for p in re.split(r"[,x×]+", text.strip()) if p)
    except ValueError:
        raise UsageError(f"cannot read tile grid {text!r}; write e.g. 4 or 4,4 or 4x4") from None
    if not tiles or any(t < 1 for t in tiles):
        raise UsageError(f"tile grid {text!r} needs positive counts, e.g. 4x4")
    return tiles


# --------------------------------------------------------------------------- models


def load_model(spec: str) -> Any:
    """Build the model named by ``spec``, in eval mode, with random weights.

    ``spec`` is a torchvision model name, a timm model name (when timm is installed), or
    ``package.module:callable`` where the attribute is an ``nn.Module`` or a callable taking
    no arguments that returns one.

    >>> type(load_model("resnet18")).__name__
    'ResNet'
    >>> load_model("torch.nn:Identity").training
    False
    """
    import torch

    if ":" in spec:
        model = _from_import_path(spec)
    else:
        model = _from_zoo(spec)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _from_import_path(spec: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"MODEL {spec!r}: write package.module:callable")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"MODEL {spec!r}: cannot import {mod_name!r} ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"MODEL {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(f"MODEL {spec!r}: {attr!r} is neither an nn.Module nor callable")
    return obj()


def _from_zoo(name: str) -> Any:
    import torchvision

    tv_names = torchvision.models.list_models()
    if name in tv_names:
        builder = torchvision.models.get_model_builder(name)
        kwargs: dict[str, Any] = {"weights": None}
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # else segmentation models download a backbone
        return builder(**kwargs)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return timm.create_model(name, pretrained=False)
    close = difflib.get_close_matches(name, tv_names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    where = "torchvision or timm" if timm is not None else "torchvision (timm is not installed)"
    raise UsageError(f"unknown MODEL {name!r}: not a model of {where}{hint}; "
                     "or write package.module:callable")


def _example(shape: tuple[int, ...], device: str, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device)


# --------------------------------------------------------------------------- progress


class Progress:
    """Stage lines and a progress bar on stderr (a redrawn bar only when stderr is a terminal).

    >>> import io
    >>> p = Progress(io.StringIO()); p.stage("tracing"); p.bar("timing", 1, 2); p.done()
    """

    def __init__(self, stream: TextIO | None, width: int = 30):
        self.stream = stream
        self.width = width
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._open = False

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.t0:6.1f}s"

    def stage(self, text: str) -> None:
        if self.stream is None:
            return
        self._close()
        print(f"[{self._elapsed()}] {text}", file=self.stream, flush=True)

    def bar(self, text: str, done: int, total: int) -> None:
        if self.stream is None or not self.tty:
            return
        filled = self.width * done // max(total, 1)
        self.stream.write(f"\r[{self._elapsed()}] {text} [{'#' * filled}{'.' * (self.width - filled)}]"
                          f" {done}/{total}")
        self.stream.flush()
        self._open = True

    def _close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False

    def done(self) -> None:
        if self.stream is not None:
            self._close()


# --------------------------------------------------------------------------- plan


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _plan_for(model: Any, x: Any, budget: int | None, max_overhead: float | None,
              max_extra_compute: float | None = None) -> tuple[Any, Any]:
    """(plan, annotated GraphModule): capture, check, annotate and ask the planner."""
    from . import planner
    from .api import prepare

    gm = prepare(model, x)
    return planner.plan(gm, x, memory_budget=budget, max_overhead=max_overhead,
                        max_extra_compute=max_extra_compute), gm


def _plan_dict(plan: Any) -> dict:
    return {
        "regions": [{"merge": list(r.merge), "tiles": list(r.tiles), "start": list(r.start),
                     "multipass": r.multipass, "stream": r.stream,
                     "primitives": [list(p) for p in r.primitives]} for r in plan.regions],
        "recompute": list(plan.recompute),
        "primitives": [list(p) for p in plan.primitives],
        "label": plan.label,
        "peak_bytes": int(plan.peak_bytes),
        "baseline_peak_bytes": int(plan.baseline_peak_bytes),
        "peak_ratio": plan.baseline_peak_bytes / max(plan.peak_bytes, 1),
        "extra_compute": float(plan.extra_compute),
        "time_s": getattr(plan, "time_s", None),
        "baseline_time_s": getattr(plan, "baseline_time_s", None),
    }


def _overhead(plan: Any) -> float | None:
    t, t0 = getattr(plan, "time_s", None), getattr(plan, "baseline_time_s", None)
    return t / t0 - 1.0 if t and t0 else None


def _frontier(plan: Any) -> list[Any]:
    """The Pareto frontier, lowest peak first."""
    return sorted(plan.pareto(), key=lambda p: (p.peak_bytes, p.extra_compute))


def format_plan(plan: Any, model_name: str, shape: tuple[int, ...]) -> str:
    """The plan and its Pareto frontier as text tables (what ``tilefx plan`` prints)."""
    base = plan.baseline_peak_bytes

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1%}"

    lines = [f"{model_name}, input {'x'.join(map(str, shape))}: predicted peak "
             f"{_mib(base)} MiB untiled",
             f"chosen: {plan.label}",
             f"  predicted peak {_mib(plan.peak_bytes)} MiB ({base / max(plan.peak_bytes, 1):.2f}x "
             f"lower), extra MACs {pct(plan.extra_compute)}, predicted time {pct(_overhead(plan))}",
             "",
             "Pareto frontier (predicted peak against predicted time; * = chosen):"]
    rows = [("", "plan", "peak MiB", "x lower", "extra MACs", "time")]
    for p in _frontier(plan):
        rows.append(("*" if p.rewrite == plan.rewrite else "", p.label, _mib(p.peak_bytes),
                     f"{base / max(p.peak_bytes, 1):.2f}", pct(p.extra_compute),
                     pct(_overhead(p))))
    lines += _table(rows, right=(2, 3, 4, 5))
    return "\n".join(lines)


def _table(rows: list[tuple], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
        if k == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    shape = parse_shape(args.shape)
    budget = parse_bytes(args.budget) if args.budget is not None else None
    progress = Progress(None if args.quiet or args.json else sys.stderr)
    progress.stage(f"building {args.model}")
    model = load_model(args.model).to(args.device)
    x = _example(shape, args.device, args.seed)
    progress.stage("tracing and planning")
    plan, _ = _plan_for(model, x, budget, args.max_overhead, args.max_extra_compute)
    progress.done()
    if args.json:
        out = {"model": args.model, "shape": list(shape), "memory_budget": budget,
               "max_overhead": args.max_overhead, "max_extra_compute": args.max_extra_compute,
               "plan": _plan_dict(plan),
               "pareto": [_plan_dict(p) for p in _frontier(plan)]}
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, args.model, shape))
    return 0


# --------------------------------------------------------------------------- bench


def _max_abs_diff(a: Any, b: Any) -> float:
    import torch
    from torch.utils._pytree import tree_flatten

    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    fa = [t for t in fa if isinstance(t, torch.Tensor)]
    fb = [t for t in fb if isinstance(t, torch.Tensor)]
    if len(fa) != len(fb) or any(s.shape != t.shape for s, t in zip(fa, fb)):
        return math.inf
    return max(((s.double() - t.double()).abs().max().item() for s, t in zip(fa, fb) if s.numel()),
               default=0.0)


def _scale(a: Any) -> float:
    import torch
    from torch.utils._pytree import tree_flatten

    flat, _ = tree_flatten(a)
    return max((t.abs().max().item() for t in flat if isinstance(t, torch.Tensor) and t.numel()),
               default=0.0)


def _timings(fns: dict, x: Any, repeats: int, warmup: int, progress: Progress) -> dict:
    """Interleaved timing, one round at a time so the progress bar can move."""
    from .measure import latency

    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    total = warmup + repeats
    for rnd in range(total):
        progress.bar("timing", rnd, total)
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        stats = latency({n: fns[n] for n in order}, x, repeats=1, warmup=0)
        if rnd >= warmup:
            for n in names:
                times[n].append(stats[n].median_s)
    progress.bar("timing", total, total)
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        out[n] = {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "runs": len(ts)}
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import tilefx
    from .measure import peak_memory

    shape = parse_shape(args.shape)
    budget = parse_bytes(args.budget) if args.budget is not None else None
    tiles = _parse_tiles(args.tiles) if args.tiles else None
    if tiles is not None and len(tiles) == 1:
        tiles = tiles[0]
    progress = Progress(None if args.quiet else sys.stderr)
    progress.stage(f"building {args.model}")
    model = load_model(args.model).to(args.device)
    x = _example(shape, args.device, args.seed)
    progress.stage("tracing, planning and rewriting")
    t0 = time.perf_counter()
    with torch.no_grad():
        gm = tilefx.transform(model, x, merge=args.merge, tiles=tiles, memory_budget=budget,
                              max_overhead=args.max_overhead,
                              max_extra_compute=args.max_extra_compute)
    transform_s = time.perf_counter() - t0
    progress.stage("checking outputs")
    with torch.no_grad():
        ref = model(x)
        out = gm(x)  # also warms the tile-window cache before peak memory is measured
    diff = _max_abs_diff(ref, out)
    tol = args.atol + args.rtol * _scale(ref)
    progress.stage("measuring peak memory (untiled, tiled)")
    peaks = {"untiled": peak_memory(model, x), "tiled": peak_memory(gm, x)}
    progress.stage(f"timing {args.repeats} interleaved rounds after {args.warmup} warm-up")
    times = _timings({"untiled": model, "tiled": gm}, x, args.repeats, args.warmup, progress)
    progress.done()

    regions = [m for m in gm.modules() if isinstance(m, tilefx.TiledRegion)]
    result = {
        "model": args.model, "shape": list(shape), "device": str(x.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transform_s": transform_s,
        "regions": [{"grid": list(r.grid), "outputs": list(r.spec.outputs),
                     "nodes": len(r.spec.nodes)} for r in regions],
        "untiled": {"peak_bytes": peaks["untiled"], **times["untiled"]},
        "tiled": {"peak_bytes": peaks["tiled"], **times["tiled"]},
        "peak_ratio": peaks["untiled"] / max(peaks["tiled"], 1),
        "latency_ratio": times["tiled"]["median_s"] / max(times["untiled"]["median_s"], 1e-12),
        "max_abs_diff": diff, "tolerance": tol, "outputs_match": diff <= tol,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_bench(result))
    return 0 if result["outputs_match"] else 1


def format_bench(r: dict) -> str:
    """The table ``tilefx bench`` prints, from its JSON result."""
    grids = ", ".join("x".join(map(str, g["grid"])) for g in r["regions"]) or "none (untiled)"
    rows = [("", "peak MiB", "latency ms", "IQR ms")]
    for k in ("untiled", "tiled"):
        rows.append((k, _mib(r[k]["peak_bytes"]), f"{r[k]['median_s'] * 1e3:.1f}",
                     f"{r[k]['iqr_s'] * 1e3:.1f}"))
    lines = [f"{r['model']}, input {'x'.join(map(str, r['shape']))} on {r['device']} "
             f"({r['threads']} threads), tile grid {grids}; median of {r['tiled']['runs']} runs", ""]
    lines += _table(rows, right=(1, 2, 3))
    lines += ["",
              f"peak memory {r['peak_ratio']:.2f}x lower, latency {r['latency_ratio']:.2f}x",
              f"max |tiled - untiled| = {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}): "
              + ("outputs match" if r["outputs_match"] else "OUTPUTS DIFFER")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    kwargs = {k: v for k, v in (("size", args.size), ("model_name", args.model)) if v is not None}
    code = demo.run(**kwargs)
    return int(code or 0)


# --------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tilefx", description="Exact receptive-field tiling of CNNs: lower peak "
                "activation memory, same outputs.")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="{demo,plan,bench}", parser_class=_Parser)

    d = sub.add_parser("demo", help="tile a torchvision model and show memory, latency, error")
    d.add_argument("--size", type=int, default=None, help="input height and width")
    d.add_argument("--model", default=None, help="torchvision model name")
    d.set_defaults(func=cmd_demo)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", metavar="MODEL",
                        help="torchvision name, timm name, or package.module:callable")
        sp.add_argument("--shape", required=True, help="input shape N,C,H,W, e.g. 1,3,512,512")
        sp.add_argument("--budget", default=None, help="memory budget, e.g. 200MB or 1.5GiB")
        sp.add_argument("--max-overhead", type=float, default=None,
                        help="predicted time allowed over untiled, as a fraction (0.2 = 20%%)")
        sp.add_argument("--max-extra-compute", type=float, default=None,
                        help="MACs a plan may compute twice, as a fraction of the model's "
                             "(0 = every MAC once)")
        sp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
        sp.add_argument("--seed", type=int, default=0, help="seed of the random input and weights")
        sp.add_argument("--json", action="store_true", help="print JSON on stdout")
        sp.add_argument("--quiet", action="store_true", help="no progress on stderr")

    pl = sub.add_parser("plan", help="print the plan and the Pareto frontier of MODEL")
    common(pl)
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="measure peak memory and latency, tiled against untiled")
    common(b)
    b.add_argument("--merge", default=None, help="merge node or module name (default: planner)")
    b.add_argument("--tiles", default=None, help="tile grid, e.g. 4x4 (default: planner)")
    b.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    b.add_argument("--rtol", type=float, default=1e-4, help="output check: relative tolerance")
    b.add_argument("--atol", type=float, default=1e-4, help="output check: absolute tolerance")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tilefx`` command; returns its exit status.

    Errors print one line on stderr (here: ``tilefx: error: shape '1,3' must have 3 to 5
    positive sizes ...``) and return a nonzero status:

    >>> main(["plan", "resnet18", "--shape", "1,3"])
    2
    """
    parser = build_parser()
    show_tb = "--traceback" in (sys.argv[1:] if argv is None else list(argv))
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "repeats", 1) < 1 or getattr(args, "warmup", 0) < 0:
            raise UsageError("--repeats must be at least 1 and --warmup at least 0")
        import torch

        if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")
        torch.manual_seed(getattr(args, "seed", 0))
        return args.func(args)
    except UsageError as e:
        if show_tb:
            raise
        _error(e)
        return 2
    except SystemExit as e:  # --help, --version: argparse exits on its own
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        print("tilefx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line shows one line, not a traceback
        if show_tb:
            raise
        from .errors import TilingError

        _error(e if isinstance(e, TilingError) else f"{type(e).__name__}: {e} "
               "(run with --traceback for details)")
        return 1


def _error(e: Any) -> None:
    print("tilefx: error: " + " ".join(str(e).split()), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
