"""Regenerate BENCHMARKS.md from real runs: measured peaks, latency, error, plans.

    python benchmarks/run.py                       # default set (about 15 minutes on 2 cores)
    python benchmarks/run.py --sizes 224 1024 2048 --models resnet50 --out BENCHMARKS.md

For every model and input size: the planner's default (knee) plan and its lowest-peak plan are
applied with tilefx's passes; each is measured against the untiled captured model in the same
process: peak memory with ``tilefx.measure.peak_memory`` (allocator events), latency with
``tilefx.measure.latency`` (alternating runs), max abs error against eager. Numbers are never
edited by hand: rerun the command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch
import torchvision

import tilefx
from tilefx import planner
from tilefx.measure import latency, peak_memory
from tilefx.passes.memory import simulate
from tilefx.passes.tile_rewrite import tile_rewrite

MODELS = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "resnet50": lambda: torchvision.models.resnet50(),
    "vgg16": lambda: torchvision.models.vgg16(),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "densenet121": lambda: torchvision.models.densenet121(),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(),
    "fcn_resnet50": lambda: torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=False),
}

#: Plans chosen by hand (issue 2's check: a merge node and a 4x4 grid picked by a person).
HAND = {
    "resnet50": planner.RegionChoice(("layer3",), (4, 4)),
    "mobilenet_v2": planner.RegionChoice(("features.7",), (4, 4)),
}

PUBLISHED = [
    ("MobileNetV2", "receptive-field tiling paper", "5.3x lower peak"),
    ("ResNet-50", "receptive-field tiling paper", "2.3x lower peak"),
    ("MobileNetV2", "MCUNetV2 (patch-based inference)", "8x lower peak (int8, input not counted)"),
]

TARGETS = {  # (model, size): (ratio at least, latency at most)
    ("mobilenet_v2", 224): (6.0, 1.15), ("resnet50", 224): (3.0, 1.2),
    ("mobilenet_v2", 1024): (10.0, 1.15), ("resnet50", 1024): (6.0, 1.2),
}


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def apply(gm, p):
    out = gm
    for r in p.regions:
        out = tile_rewrite(out, r.merge, r.tiles, start=r.start)
    return out


def bench(name: str, size: int, repeats: int, budget: int | None) -> list[dict]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, size, size)
    gm = tilefx.prepare(model, x)
    with torch.no_grad():
        want = model(x)
    want = want["out"] if isinstance(want, dict) else want
    t0 = time.perf_counter()
    default = planner.plan(gm, x)
    plan_s = time.perf_counter() - t0
    chosen = {"default (knee)": default, "lowest peak": default.pareto()[-1]}
    if budget is not None:
        try:
            chosen[f"budget {mib(budget)} MiB"] = planner.plan(gm, x, memory_budget=budget)
        except tilefx.TilingError as e:
            print(f"  budget: {e}", file=sys.stderr)
    if name in HAND and size >= 1024:
        hand = HAND[name]
        tiled = tile_rewrite(gm, list(hand.merge), hand.tiles)
        sim = simulate(tiled, x).peak_bytes
        chosen[f"by hand ({hand})"] = planner.Plan(
            regions=(hand,), peak_bytes=sim, baseline_peak_bytes=default.baseline_peak_bytes,
            extra_compute=float("nan"), time_s=float("nan"), baseline_time_s=default.baseline_time_s)
    base_peak = peak_memory(gm, x)
    base_pred = simulate(gm, x).peak_bytes
    rows = []
    seen = {}
    for label, p in chosen.items():
        key = p.regions
        if key in seen:
            seen[key]["plan_label"] += f", {label}"
            continue
        tiled = apply(gm, p)
        with torch.no_grad():
            got = tiled(x)
        got = got["out"] if isinstance(got, dict) else got
        err = (got - want).abs().max().item()
        peak = peak_memory(tiled, x)
        stats = latency({"base": gm, "tiled": tiled}, x, repeats=repeats, warmup=1)
        row = dict(model=name, size=size, plan_label=label, plan=str(p).split(":")[0],
                   base_peak=base_peak, base_pred=base_pred, peak=peak, pred=p.peak_bytes,
                   sim=simulate(tiled, x).peak_bytes,
                   ratio=base_peak / max(peak, 1), lat=stats["tiled"].median_s / stats["base"].median_s,
                   pred_lat=1 + p.overhead, base_ms=stats["base"].median_s * 1e3,
                   extra=p.extra_compute, err=err, plan_s=plan_s, frontier=len(p.pareto()))
        seen[key] = row
        rows.append(row)
        print(f"  {name}@{size} {label}: {row['plan']} peak {mib(peak)}/{mib(base_peak)} MiB "
              f"({row['ratio']:.2f}x), latency {row['lat']:.2f}x, err {err:.2g}", file=sys.stderr)
    return rows


def _num(v: float, spec: str) -> str:
    """A number, or '-' where the row has none (a plan chosen by hand has no time prediction)."""
    return "-" if v != v else format(v, spec)


def render(rows: list[dict], args, wall: float) -> str:
    cal = planner.calibrate()
    lines = [
        "# tilefx benchmarks",
        "",
        "Generated by `python benchmarks/run.py "
        + " ".join(a for a in sys.argv[1:]) + "`; do not edit by hand.",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()}, {platform.platform()}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}",
        "- device: CPU, float32, NCHW, batch 1, eval mode, random weights (weights=None)",
        f"- time model calibration: {cal.call_s * 1e6:.0f} us per window-op call, "
        f"{cal.pointwise_call_s * 1e6:.0f} us per other call, "
        f"{cal.reorder_s_per_byte * 2**30:.3f} s per GiB of weights reordered (oneDNN); "
        "per-node times measured on the untiled model (`tilefx.cost`)",
        f"- wall time of this run: {wall / 60:.1f} min",
        "",
        "Peak = highest total of tensor bytes allocated during the call and alive at once "
        "(torch.profiler allocator events; the caller's input and the weights are not counted, "
        "oneDNN's scratch buffers are). *base* is the untiled captured model; *predicted* is the "
        "planner's static prediction (`tilefx.passes.memory`), *sim* the simulator run on the "
        "rewritten module. Latency ratio: medians of alternating runs in one process.",
        "",
        "| model | input | plan | chosen as | base peak MiB | tiled peak MiB | ratio | predicted MiB "
        "(base / tiled / sim) | latency ratio (pred) | base ms | extra MACs | max abs err | plan s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | `{r['plan']}` | {r['plan_label']} | {mib(r['base_peak'])} | "
            f"{mib(r['peak'])} | **{r['ratio']:.2f}x** | {mib(r['base_pred'])} / {mib(r['pred'])} / {mib(r['sim'])} | "
            f"{r['lat']:.2f}x ({_num(r['pred_lat'], '.2f')}x) | {r['base_ms']:.0f} | {_num(r['extra'], '+.1%')} | "
            f"{r['err']:.1e} | {r['plan_s']:.1f} |")
    lines += ["", "## Prediction accuracy", ""]
    errs = []
    for r in rows:
        errs.append(abs(r["base_pred"] / r["base_peak"] - 1))
        errs.append(abs(r["pred"] / r["peak"] - 1))
    if errs:
        within = sum(e <= 0.10 for e in errs)
        lines.append(f"Predicted vs measured peak: {within} of {len(errs)} predictions within 10%; "
                     f"largest error {max(errs):.1%}.")
    lines += ["", "## Targets (issue 3)", "", "| target | measured | met |", "|---|---|---|"]
    for (name, size), (want_ratio, want_lat) in TARGETS.items():
        cands = [r for r in rows if r["model"] == name and r["size"] == size]
        if not cands:
            lines.append(f"| {name}@{size}: >= {want_ratio}x at <= {want_lat}x latency | not run | - |")
            continue
        ok = [r for r in cands if r["ratio"] >= want_ratio and r["lat"] <= want_lat]
        best = max(cands, key=lambda r: r["ratio"])
        fast = [r for r in cands if r["lat"] <= want_lat]
        best_fast = max(fast, key=lambda r: r["ratio"]) if fast else None
        txt = (f"best ratio {best['ratio']:.2f}x (at {best['lat']:.2f}x latency); "
               + (f"best within {want_lat}x latency: {best_fast['ratio']:.2f}x" if best_fast
                  else f"no plan within {want_lat}x latency"))
        lines.append(f"| {name}@{size}: >= {want_ratio}x at <= {want_lat}x latency | {txt} | "
                     f"{'yes' if ok else 'no'} |")
    bud = [r for r in rows if r["model"] == "resnet50" and r["size"] == 1024 and "budget" in r["plan_label"]]
    if bud:
        r = bud[0]
        lines.append(f"| resnet50@1024 under a 40 MiB budget | measured peak {mib(r['peak'])} MiB "
                     f"(predicted {mib(r['pred'])}) | {'yes' if r['peak'] <= 40 * 2**20 else 'no'} |")
    lines += ["", "## Published figures (for reference, not comparable one to one)", "",
              "| model | source | reported |", "|---|---|---|"]
    lines += [f"| {m} | {s} | {v} |" for m, s, v in PUBLISHED]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 1024])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (224: x4)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for size in args.sizes:
        for name in args.models:
            budget = 40 * 2**20 if (name == "resnet50" and size == 1024) else None
            reps = args.repeats * 4 if size <= 256 else args.repeats
            try:
                rows += bench(name, size, reps, budget)
            except Exception as e:  # one model failing must not lose the others' numbers
                print(f"  {name}@{size} failed: {type(e).__name__}: {e}", file=sys.stderr)
    with open(args.out, "w") as f:
        f.write(render(rows, args, time.perf_counter() - t0))
    print(f"wrote {os.path.abspath(args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
