"""Streaming regions (issue 11) measured side by side with the untiled model, in one process.

    python benchmarks/streaming.py                                # the four models at 1024
    python benchmarks/streaming.py --models basic_unet_bn --size 512 --strips 16 32

For every model: the untiled captured model (*base*), the region streamed at a few strip
heights (``passes.stream_rewrite``; for MobileNetV2 the region ends at its last spatial layer,
the others are streamed whole), and the plan ``transform(model, x, max_overhead=B - 1)`` picks
with the issue's latency bound B. Peak with ``tilefx.measure.peak_memory``, latency with
``tilefx.measure.latency`` (alternating runs), the static model's predicted peak
(``tilefx.stream_plan.stream_cost`` with the planner's outer liveness) and the simulator's
(``passes.memory.simulate``), extra MACs (rows computed beyond the untiled model's), max abs
error against eager. CPU, float32, batch 1, random weights. Not part of the tests.
"""

from __future__ import annotations

import os

import argparse
import sys
import time

import torch
import torchvision

import tilefx
from tilefx.capture import as_inputs
from tilefx.cost import calibrate
from tilefx.measure import latency, peak_memory
from tilefx.passes.memory import simulate
from tilefx.passes.stream_rewrite import stream_rewrite
from tilefx.plan_model import StaticModel, outer_peaks
from tilefx.stream_plan import stream_cost

# Each run measures afresh (its planning times and choices are its own), not from another
# run's measurements kept on disk (tilefx.cache), unless TILEFX_CACHE_DIR names a folder.
os.environ.setdefault("TILEFX_CACHE_DIR", "")


def _basic_unet():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, norm="batch")


def _smp_unet():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, classes=2)


#: name: (factory, region end: "output" or the first node of the head, issue 11's targets:
#: (peak ratio at least, latency at most), default strip heights at 1024, in rows of the
#: region's tallest map: 512 for MobileNetV2 after its stem, 1024 for the others)
MODELS = {
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), "adaptive_avg_pool2d",
                     (16.0, 1.0), (4, 8, 16)),
    "fcn_resnet50": (lambda: torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=False), "output", (3.0, 1.3), (16, 32, 64)),
    "smp_unet_resnet34": (_smp_unet, "output", (5.0, 1.3), (16, 32, 64)),
    "basic_unet_bn": (_basic_unet, "output", (13.0, 1.1), (16, 32, 64)),
}


MIN_ROWS_ARG: int | None = None


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def first(out):
    return out["out"] if isinstance(out, dict) else out


def bench(name: str, size: int, strips: list[int] | None, repeats: int, planned: bool) -> list[dict]:
    factory, merge, (target_ratio, bound), default_strips = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(1, 3, size, size)
    gm = tilefx.prepare(model, x)
    with torch.no_grad():
        want = first(model(x))
    sm = StaticModel(gm, as_inputs(x), calibrate(), "measured")
    end = next(i for i, n in enumerate(sm.nodes)
               if n.name == merge or (merge == "output" and n.op == "output"))
    seg = sm.segment(0, end)
    rest, at = outer_peaks(sm, [seg])
    runs = {"base": gm}
    info = {}
    for h in strips or default_strips:
        t0 = time.perf_counter()
        kw = {} if MIN_ROWS_ARG is None else {"min_rows": MIN_ROWS_ARG}
        s = stream_rewrite(gm, [sm.nodes[end].name], h, **kw)
        c = stream_cost(sm, seg, h)
        info[f"strips of {h}"] = dict(
            pred=max(rest, at[0] + c.peak_bytes), sim=simulate(s, x).peak_bytes,
            extra=c.extra_macs / max(sm.total_macs, 1), buffers=c.buffer_bytes,
            strips=c.strips, rewrite_s=time.perf_counter() - t0,
            pred_lat=(sm.base_time + c.extra_time_s) / sm.base_time)
        runs[f"strips of {h}"] = s
    if planned:
        t0 = time.perf_counter()
        p = tilefx.plan(model, x, max_overhead=bound - 1)
        plan_s = time.perf_counter() - t0
        g = tilefx.transform(model, x, plan=p)
        key = f"planned ({p})".split(":")[0] + ")"
        runs[key] = g
        info[key] = dict(pred=p.peak_bytes, sim=simulate(g, x).peak_bytes,
                         extra=p.extra_compute, buffers=float("nan"), strips=0,
                         rewrite_s=plan_s, pred_lat=1 + p.overhead)
    base_peak = peak_memory(gm, x)
    stats = latency(runs, x, repeats=repeats, warmup=1)
    rows = []
    for label, f in runs.items():
        if label == "base":
            continue
        with torch.no_grad():
            err = (first(f(x)) - want).abs().max().item()
        peak = peak_memory(f, x)
        row = dict(model=name, size=size, label=label, base_peak=base_peak, peak=peak,
                   ratio=base_peak / max(peak, 1),
                   lat=stats[label].median_s / stats["base"].median_s,
                   base_ms=stats["base"].median_s * 1e3, err=err, scale=want.abs().max().item(),
                   target=f">= {target_ratio:g}x at <= {bound:g}x", **info[label])
        rows.append(row)
        print(f"  {name}@{size} {label}: peak {mib(peak)}/{mib(base_peak)} MiB ({row['ratio']:.2f}x; "
              f"pred {mib(row['pred'])}, sim {mib(row['sim'])}), latency {row['lat']:.2f}x "
              f"(pred {row['pred_lat']:.2f}x), extra MACs {row['extra']:+.2%}, err {err:.2g}",
              file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| model | input | run | peak MiB (base -> run) | lower | latency | target | "
             "predicted / simulated MiB | row buffers MiB | strips | extra MACs | max abs err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['label']} | {mib(r['base_peak'])} -> {mib(r['peak'])} | "
            f"**{r['ratio']:.1f}x** | {r['lat']:.2f}x (pred {r['pred_lat']:.2f}x) | {r['target']} | "
            f"{mib(r['pred'])} / {mib(r['sim'])} | {mib(r['buffers'])} | {r['strips'] or '-'} | "
            f"{r['extra']:+.2%} | {r['err']:.1e} (of {r['scale']:.2g}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--strips", type=int, nargs="+", default=None,
                    help="strip heights (rows of the region's tallest output)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-plan", action="store_true", help="skip transform(max_overhead=B-1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--min-rows", type=int, default=None, help="stream_rewrite's min_rows")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global MIN_ROWS_ARG
    MIN_ROWS_ARG = args.min_rows
    rows = []
    for name in args.models:
        rows += bench(name, args.size, args.strips, args.repeats, not args.no_plan)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32, batch 1")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
