"""Regenerate BENCHMARKS.md from real runs: measured peaks, latency, error, plans, peers.

    python benchmarks/run.py                         # every section (36 min to hours on 2 idle cores)
    python benchmarks/run.py --sections streaming    # that section; BENCHMARKS.md keeps the others
    python benchmarks/run.py --sections frontier --models resnet50 --sizes 1024 --out /tmp/B.md
    python benchmarks/run.py --no-peers --out /tmp/B.md

The file is rewritten after each model, so a run stopped early keeps what it measured. Each
section carries the provenance of the run that measured it (``sections.py``): a run replaces the
sections it runs, whole, and keeps the others; ``--models`` and ``--sizes`` measure part of a
section, so they need an ``--out`` other than BENCHMARKS.md.

Every row plans with the default time model (measured on this machine), applies the chosen plan
with ``tilefx.apply`` and measures it against the untiled captured graph in the same process:
peak memory with ``tilefx.measure.peak_memory`` (allocator events; the eager model's peak is
shown too where it differs), latency with ``tilefx.measure.latency`` (alternating runs), max abs
error against eager. Sections:

* ``frontier``: the planner's default (memory first within its +15% bound), its lowest-peak
  plan (``max_overhead=float("inf")``, tuned: its latency measured while planning), a 40 MiB
  budget (ResNet-50 @1024) and plans chosen by hand, at 224 and 1024;
* ``statistics``: networks with squeeze-and-excitation, group and instance norms, each row
  ``transform(model, x, max_overhead=B - 1)`` for the row's latency bound B, beside the peers
  (diffusers' tiled VAE decode, MONAI's sliding window) on the same inputs;
* ``streaming`` (when the streaming strategy is present): U-Nets and segmentation networks,
  rows with their latency bounds, beside MONAI's sliding window and lightstream;
* ``allocator``: the default plans at 1024 timed under three CPU allocators, each setting in a
  process of its own (``allocator.py``): how much of the untiled graph's time is fresh pages.

Every measurement the tuner takes is logged to stderr (``tilefx.autotune`` at DEBUG).

Numbers are never edited by hand: rerun the command.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision

import tilefx
from tilefx import autotune, cache, planner
from tilefx.measure import latency, peak_memory
from tilefx.passes.memory import simulate

sys.path.insert(0, os.path.dirname(__file__))
import allocator  # noqa: E402  (benchmarks/ is not a package)
import peers  # noqa: E402
import sections  # noqa: E402

# Each run measures afresh (its planning times and choices are its own), not from another
# run's measurements kept on disk (tilefx.cache), unless TILEFX_CACHE_DIR names a folder.
os.environ.setdefault("TILEFX_CACHE_DIR", "")

MIB = 2**20


def _tv(name: str, **kw) -> Callable[[int], tuple[torch.nn.Module, torch.Tensor]]:
    def build(size: int):
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, **kw).eval(), torch.randn(1, 3, size, size)
    return build


def _timm(name: str):
    def build(size: int):
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, size, size)
    return build


def _basicunet(norm: str):
    def build(size: int):
        return peers.build_basicunet(norm), peers.example_input((1, 3, size, size))
    return build


class VAEDecoder(torch.nn.Module):
    """``vae.decode(z).sample`` as a module (the call tilefx captures)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def _vae(size: int):
    return VAEDecoder(peers.build_vae()).eval(), peers.example_input((1, 4, size // 8, size // 8))


def _smp_unet(size: int):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet("resnet34", encoder_weights=None, classes=2).eval(), torch.randn(1, 3, size, size)


#: name -> builder(size) -> (model in eval mode, example input)
MODELS: dict[str, Callable[[int], tuple[torch.nn.Module, torch.Tensor]]] = {
    "mobilenet_v2": _tv("mobilenet_v2"),
    "resnet50": _tv("resnet50"),
    "vgg16": _tv("vgg16"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "densenet121": _tv("densenet121"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "convnext_tiny": _tv("convnext_tiny"),
    "fcn_resnet50": _tv("fcn_resnet50", weights_backbone=None, aux_loss=False),
    "timm_vgg16": _timm("vgg16"),
    "basicunet": _basicunet("instance"),
    "basicunet_bn": _basicunet("batch"),
    "vae_decoder": _vae,
    "smp_unet": _smp_unet,
}


@dataclass(frozen=True)
class Row:
    """One benchmark row: a model at a size, the plan choice, the issue's target."""

    section: str
    model: str
    size: int
    choice: str                  # "default", "lowest", "max_overhead", "budget", "hand"
    bound: float | None = None   # the latency bound B (max_overhead = B - 1)
    ratio: float | None = None   # the target: at least this much lower peak
    budget: int | None = None
    hand: planner.RegionChoice | None = None
    peer: str | None = None      # a peers.PEERS key measured on the same input, in the next row
    max_macs: float | None = None  # the target: extra MACs of the plan at most this fraction
    max_extra_compute: float | None = None  # the option: plans computing at most this much twice


#: issue 10's targets for the default plan: (at least this much lower peak, latency at most)
DEFAULT_TARGETS = {("mobilenet_v2", 224): (8, 1.15), ("resnet50", 224): (3, 1.2),
                   ("mobilenet_v2", 1024): (16, 1.15), ("resnet50", 1024): (8, 1.2),
                   ("vgg16", 1024): (20, None)}

ROWS = [
    # issue 10's defaults (with its targets), and the frontier's lowest peak
    *(Row("frontier", m, s, c, *(DEFAULT_TARGETS.get((m, s), (None, None))[::-1] if c == "default"
                                 else (None, None)))
      for s in (224, 1024)
      for m in ("mobilenet_v2", "resnet50", "vgg16", "densenet121", "convnext_tiny")
      for c in ("default", "lowest")),
    Row("frontier", "resnet50", 1024, "budget", budget=40 * MIB),
    Row("frontier", "resnet50", 1024, "hand", hand=planner.RegionChoice(("layer3",), (4, 4))),
    Row("frontier", "mobilenet_v2", 1024, "hand", hand=planner.RegionChoice(("features.7",), (4, 4))),
    Row("frontier", "timm_vgg16", 512, "default", ratio=4),
    # issue 9: statistics over the whole map, with the rows' latency bounds
    Row("statistics", "efficientnet_b0", 1024, "max_overhead", bound=1.6, ratio=5),
    Row("statistics", "mobilenet_v3_large", 1024, "max_overhead", bound=1.6, ratio=5),
    Row("statistics", "regnet_y_400mf", 1024, "max_overhead", bound=1.6, ratio=4),
    Row("statistics", "basicunet", 1024, "max_overhead", bound=2.5, ratio=5, peer="monai_instance"),
    Row("statistics", "vae_decoder", 1024, "max_overhead", bound=2.5, ratio=3, peer="vae_tiling"),
    Row("statistics", "efficientnet_b0", 224, "default"),
    # issue 11: streaming, with the rows' latency bounds. The lowest peaks within the bound
    # may compute halos or skips again (extra MACs: the U-Nets, MobileNetV2 on a machine where
    # its tiles run fast); the rows with max_extra_compute=0.03 show what plans computing at
    # most 3% of the model's MACs twice reach, and carry the MAC target.
    Row("streaming", "fcn_resnet50", 1024, "max_overhead", bound=1.3, ratio=3, max_macs=0.03),
    Row("streaming", "smp_unet", 1024, "max_overhead", bound=1.3, ratio=5),
    Row("streaming", "smp_unet", 1024, "max_overhead", bound=1.3, ratio=5, max_macs=0.03,
        max_extra_compute=0.03),
    Row("streaming", "basicunet_bn", 1024, "max_overhead", bound=1.1, ratio=13, peer="monai_batch"),
    Row("streaming", "basicunet_bn", 1024, "max_overhead", bound=1.1, ratio=13, max_macs=0.03,
        max_extra_compute=0.03),
    Row("streaming", "mobilenet_v2", 1024, "max_overhead", bound=1.0, ratio=16,
        peer="lightstream_1024"),
    Row("streaming", "mobilenet_v2", 1024, "max_overhead", bound=1.0, ratio=16, max_macs=0.03,
        max_extra_compute=0.03),
    # the default plans at 1024 again, under three allocators (benchmarks/allocator.py)
    *(Row("allocator", m, 1024, "default") for m in allocator.MODELS),
]


def mib(b: float) -> str:
    return f"{b / MIB:.1f}"


def _first(out):
    if isinstance(out, dict):
        out = out.get("out", next(iter(out.values())))
    return out[0] if isinstance(out, (tuple, list)) else out


def _choose(front: planner.Frontier, row: Row, gm, x) -> planner.Plan:
    """As ``transform`` chooses: the default and ``max_overhead`` rows check their time bound by
    measuring the plans near it (``tilefx.autotune``)."""
    if row.choice == "default":
        return tilefx.api.tuned_plan(gm, x, front)
    if row.choice == "lowest":
        # transform(model, x, max_overhead=float("inf")): the lowest peak, its time measured
        return tilefx.api.tuned_plan(gm, x, front, max_overhead=math.inf)
    if row.choice == "max_overhead":
        return tilefx.api.tuned_plan(gm, x, front.within_compute(row.max_extra_compute),
                                     max_overhead=row.bound - 1)
    if row.choice == "budget":
        return front.choose(memory_budget=row.budget)
    raise ValueError(row.choice)


#: A row's timing lasts about this many seconds (by the plan's time), at least ``--repeats`` and
#: ROW_MIN_ROUNDS rounds, at most ROW_MAX_ROUNDS: 3 rounds of a 110 ms baseline (RegNetY-400MF
#: @1024) put a row 18% over its tuned ratio where the tuner's 11 rounds did not, and 3 rounds
#: of a 450 ms one (EfficientNet-B0 @1024) ran 0.90x where the tuner had verified 1.40x: an
#: untiled call at 1024 spends much of its time in page faults, whose cost comes and goes.
ROW_S = 6.0
ROW_MIN_ROUNDS = 5
ROW_MAX_ROUNDS = 25


def row_rounds(plan, repeats: int) -> int:
    """Timed rounds of one row: ``repeats``, or more where the plan and the untiled graph run
    short (their predicted, or tuned, times): the tuner's rule with the benchmark's numbers."""
    return autotune.rounds_for(plan, ROW_S, max(repeats, ROW_MIN_ROUNDS), ROW_MAX_ROUNDS)


KERNEL_SHARE_S = 0.5


def kernel_use(fn, x) -> tuple[float, float]:
    """The share of one call's CPU time spent in the kernel, and the minor page faults per call
    (the kernel's time is mostly those: glibc maps an allocation over its mmap threshold
    afresh unless a free chunk of its heap fits it, and the kernel faults its pages in on first
    touch)."""
    r0, t0, calls = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    with torch.no_grad():  # calls for at least KERNEL_SHARE_S: the kernel's clock is coarse
        while True:
            fn(x)
            calls += 1
            if time.perf_counter() - t0 >= KERNEL_SHARE_S:
                break
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    sys_s, user_s = r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime
    return sys_s / max(sys_s + user_s, 1e-9), (r1.ru_minflt - r0.ru_minflt) / calls


def bench(model_name: str, size: int, rows: list[Row], repeats: int) -> list[dict]:
    """Every row of one model at one size: one capture, one frontier, one untiled baseline."""
    model, x = MODELS[model_name](size)
    with torch.no_grad():
        want = _first(model(x))
    gm = tilefx.prepare(model, x)
    t0 = time.perf_counter()
    front = planner.frontier(gm, x)
    plan_s = time.perf_counter() - t0
    # Issue 11: a streaming plan computes every row once. Its extra MACs, over the frontier's
    # plans that stream every region and compute no skip again.
    streamed = [q for q in front if q.regions and all(c.stream for c in q.regions)
                and not q.recompute]
    stream_macs = (len(streamed), max((q.extra_compute for q in streamed), default=float("nan")))
    base_peak = peak_memory(gm, x)
    eager_peak = peak_memory(model, x)
    base_pred = simulate(gm, x).peak_bytes
    out, seen = [], {}
    for row in rows:
        tune_s = 0.0
        if row.choice == "hand":
            plan = planner.fixed_plan(gm, x, [row.hand])
        else:
            try:
                t0 = time.perf_counter()
                plan = _choose(front, row, gm, x)
                tune_s = time.perf_counter() - t0
            except tilefx.TilingError as e:
                print(f"  {model_name}@{size} {row.choice}: {e}", file=sys.stderr)
                continue
        limit = ("" if row.max_extra_compute is None
                 else f", max_extra_compute={row.max_extra_compute:g}")
        label = (f"max_overhead={row.bound - 1:g}{limit}" if row.choice == "max_overhead"
                 else f"budget {mib(row.budget)} MiB" if row.choice == "budget"
                 else f"by hand ({row.hand})" if row.choice == "hand" else row.choice)
        key = plan.rewrite
        if key in seen and row.peer is None:
            seen[key]["label"] += f", {label}"
            if row.max_macs is not None:  # the same plan must meet the merged row's target too
                before = seen[key]["max_macs"]
                seen[key]["max_macs"] = row.max_macs if before is None else min(before, row.max_macs)
            continue
        tiled = tilefx.apply(gm, plan)
        with torch.no_grad():
            got = _first(tiled(x))
        err = float((got.double() - want.double()).abs().max())
        peak = peak_memory(tiled, x)
        stats = latency({"base": gm, "tiled": tiled}, x, repeats=row_rounds(plan, repeats),
                        warmup=2)
        r = dict(section=row.section, model=model_name, size=size, label=label,
                 plan=plan.label, base_peak=base_peak, eager_peak=eager_peak,
                 base_pred=base_pred, peak=peak, pred=plan.peak_bytes,
                 sim=simulate(tiled, x).peak_bytes, ratio=base_peak / max(peak, 1),
                 lat=stats["tiled"].median_s / stats["base"].median_s,
                 pred_lat=(1 + plan.overhead) if plan.predicted else float("nan"),
                 model_lat=next((1 + q.overhead for q in front
                                 if q.rewrite == key), float("nan")),
                 tuned=plan.tuned,
                 base_ms=stats["base"].median_s * 1e3,
                 kernel=(kernel_use(gm, x)[0], kernel_use(tiled, x)[0]),
                 extra=plan.extra_compute if plan.predicted else float("nan"), err=err,
                 rel_err=err / max(float(want.abs().max()), 1e-30), plan_s=plan_s, tune_s=tune_s,
                 target=(row.ratio, row.bound), max_macs=row.max_macs, regions=len(plan.regions),
                 stream_macs=stream_macs)
        seen[key] = r
        out.append(r)
        print(f"  {model_name}@{size} {label}: {r['plan'][:90]} peak {mib(peak)}/{mib(base_peak)} MiB "
              f"({r['ratio']:.2f}x), latency {r['lat']:.2f}x (pred {r['pred_lat']:.2f}x), "
              f"err {err:.1e}", file=sys.stderr)
        if row.peer:
            out.append(dict(section=row.section, peer=_peer(row.peer, repeats)))
    return out


def _peer(name: str, repeats: int) -> peers.PeerRecord | str:
    needs, run, default_repeats = peers.PEERS[name]
    missing = [p for p in needs if not peers._have(p)]
    if missing:
        return f"{name}: not measured ({', '.join(missing)} not installed)"
    return run(min(repeats, default_repeats))


def _num(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)


SECTIONS = {
    "frontier": ("Plans on the frontier", "The planner's default (memory first: the lowest "
                 "predicted peak within +15% predicted time), its lowest-peak plan "
                 "(`max_overhead=float(\"inf\")`, its time measured while planning), a budget and "
                 "plans chosen by hand."),
    "statistics": ("Statistics over the whole map (squeeze-and-excitation, GroupNorm, InstanceNorm)",
                   "Each row is `transform(model, x, max_overhead=B - 1)` for the row's latency "
                   "bound B; the peer rows run the peers' own methods on the same input."),
    "streaming": ("U-Nets and segmentation networks", "Each row is `transform(model, x, "
                  "max_overhead=B - 1)` for the row's latency bound B."),
    "allocator": ("The untiled baseline under three allocators", allocator.ABOUT),
}


def _commit() -> str:
    """The checkout's commit (with ``+changes`` when the tree differs from it), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" +changes" if dirty else "")


def _start() -> tuple[str, float, str]:
    """The run's start: ISO date, load average then, the commit measured."""
    return datetime.datetime.now().isoformat(timespec="seconds"), os.getloadavg()[0], _commit()


def _write(path: str, text: str) -> None:
    """Replace ``path`` at once: a run stopped mid-write leaves the previous file whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def header() -> str:
    """The file's header: what it is and what its columns mean (each section names its run)."""
    return "\n".join([
        "# tilefx benchmarks", "",
        "Generated by `python benchmarks/run.py` (every section) or `python benchmarks/run.py "
        "--sections NAME...` (those sections; the others are kept); do not edit by hand. Each "
        "section names the run that measured it: compare ratios within a section, whose rows "
        "ran side by side in one process.", "",
        "Device: CPU, float32, NCHW, batch 1, eval mode, random weights (weights=None).", "",
        "Peak = highest total of tensor bytes allocated during the call and alive at once "
        "(torch.profiler allocator events; the caller's input and the weights are not counted, "
        "oneDNN's scratch buffers are). *base* is the untiled captured graph (*eager*, the model "
        "itself, where it differs); *predicted* is the planner's static prediction "
        "(`tilefx.passes.memory`), *sim* the simulator run on the rewritten module. Latency ratio: "
        "medians of alternating runs in one process; (pred) is the planner's figure: measured while "
        "planning where the choice was tuned (`tilefx.autotune`; *model* is then the time model's "
        "prediction for the same plan), predicted otherwise. *base ms*: the untiled graph's median "
        "call; kernel share: of one call's CPU time (`getrusage`), the part spent in the kernel, "
        "mostly faulting in the fresh pages glibc maps for large allocations that no free chunk "
        "of its heap fits, which tiles' small buffers avoid; it varies with the process's "
        "history (a heap grown by earlier calls serves them without faults) and the machine's "
        "state, and so does the untiled time. Error: "
        "max abs difference from eager, and relative to the output's largest magnitude.",
    ])


def _provenance(argv: list[str], wall: float, pending: list[str], failed: list[str],
                started: tuple[str, float, str]) -> list[str]:
    """The lines naming the run that measured a section: command, date, commit, machine."""
    cal = planner.calibrate()
    return [
        "Measured by `python benchmarks/run.py " + " ".join(argv) + "`:", "",
        f"- date: {started[0]} (the run's start), commit {started[2]}",
        f"- machine: {platform.machine()} {cache.cpu_name()}, {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()}, load average at the start "
        f"{started[1]:.1f}, {platform.platform()}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, python "
        f"{platform.python_version()}; " + ", ".join(f"{p} {peers._version(p)}" for p in
                                                     ("diffusers", "monai", "lightstream", "timm")),
        f"- time model calibration: {cal.call_s * 1e6:.0f} us per window-op call, "
        f"{cal.pointwise_call_s * 1e6:.0f} us per other call, "
        f"{cal.reorder_s_per_byte * 2**30:.3f} s per GiB of weights reordered (oneDNN), "
        f"{cal.cold_weight_s_per_byte * 2**30:.3f} s per GiB more for weights read from memory "
        f"(tile loops over more than the {cal.cache_bytes >> 20} MiB cache); every node "
        "timed on the whole map and on tile-sized windows (`tilefx.cost`)",
        f"- wall time of the run: {wall / 60:.1f} min"
        + (f"; **partial**: the run stopped before {', '.join(pending)}" if pending else ""),
        *([f"- **failed** (no rows): {'; '.join(failed)}"] if failed else []), "",
    ]


def render(rows: list[dict], argv: list[str], wall: float, pending: list[str] = (),
           started: tuple[str, float, str] | None = None,
           failed: dict[str, list[str]] | None = None) -> dict[str, str]:
    """The blocks of the sections with rows measured so far, by section name; ``started``: the
    run's start (ISO date, load average then, commit); ``failed``: section -> the models that
    raised (a section whose every model failed gets a block saying so)."""
    started, failed = started or _start(), failed or {}
    out = {}
    for section, (title, text) in SECTIONS.items():
        mine = [r for r in rows if r["section"] == section]
        if not mine and not failed.get(section):
            continue
        prov = _provenance(argv, wall, list(pending), failed.get(section, []), started)
        if section == "allocator":
            out[section] = sections.wrap(section, "\n".join(
                [f"## {title}", "", *prov, text, "", *allocator.table(mine)]))
            continue
        lines = [f"## {title}", "", *prov, text, "",
                 "| model | input | plan | chosen as | base (eager) peak MiB | tiled peak MiB | ratio | "
                 "predicted MiB (base / tiled / sim) | latency ratio (planner) | base ms (kernel share: base / "
                 "tiled) | extra MACs | "
                 "max abs err (rel) | plan s (+ tune s) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if "peer" in r:
                lines.append(_peer_row(r["peer"]))
                continue
            eager = f" ({mib(r['eager_peak'])})" if abs(r["eager_peak"] - r["base_peak"]) > 0.02 * r["base_peak"] else ""
            plan = r["plan"] if len(r["plan"]) < 160 else r["plan"][:157] + "..."
            lines.append(
                f"| {r['model']} | {r['size']} | `{plan}` ({r['regions']} regions) | {r['label']} | "
                f"{mib(r['base_peak'])}{eager} | {mib(r['peak'])} | **{r['ratio']:.2f}x** | "
                f"{mib(r['base_pred'])} / {mib(r['pred']) if r['pred'] else '-'} / {mib(r['sim'])} | "
                f"{r['lat']:.2f}x ({_num(r['pred_lat'], '.2f')}x"
                + (f" tuned; model {_num(r['model_lat'], '.2f')}x" if r.get("tuned") else "")
                + f") | {r['base_ms']:.0f} ({r['kernel'][0]:.0%} / {r['kernel'][1]:.0%}) | "
                f"{_num(r['extra'], '+.1%')} | {r['err']:.1e} ({r['rel_err']:.0e}) | {r['plan_s']:.1f}"
                + (f" (+{r['tune_s']:.1f})" if r.get("tune_s") else "") + " |")
        lines += [""] + _accuracy(mine) + _targets(mine)
        out[section] = sections.wrap(section, "\n".join(lines))
    return out


def _peer_row(p) -> str:
    if isinstance(p, str):
        return f"| {p} | | | | | | | | | | | | |"
    share = f", {p.class_change_share:.2%} of pixels change class" if p.class_change_share is not None else ""
    return (f"| *peer:* {p.peer} on {p.model} | {'x'.join(map(str, p.input_shape[2:]))} | {p.setting} "
            f"| approximate | {mib(p.untiled_peak_bytes)} (eager) | {mib(p.peer_peak_bytes)} | "
            f"**{p.peak_ratio:.2f}x** | - | {p.latency_ratio:.2f}x | {p.untiled_time.median_s * 1e3:.0f} | - | "
            f"{p.max_abs_error:.2g} ({p.relative_error:.0e}; mean {p.mean_abs_error:.2g}{share}) | - |")


def _accuracy(rows: list[dict]) -> list[str]:
    mine = [r for r in rows if "peer" not in r]
    peaks = [abs(r["pred"] / r["peak"] - 1) for r in mine if r["pred"]]
    peaks += [abs(r["base_pred"] / r["base_peak"] - 1) for r in mine]
    lats = [abs(r["pred_lat"] / r["lat"] - 1) for r in mine if r["pred_lat"] == r["pred_lat"]]
    model = [abs(r["model_lat"] / r["lat"] - 1) for r in mine if r["model_lat"] == r["model_lat"]]
    if not peaks:
        return []
    out = ["### Prediction accuracy", "",
           f"- Predicted vs measured peak: {sum(e <= 0.10 for e in peaks)} of {len(peaks)} within 10%; "
           f"largest error {max(peaks):.1%}."]
    if lats:
        out.append(f"- Planner's latency ratio (measured at planning for the tuned default, lowest "
                   f"and max_overhead rows, predicted for the others) vs measured: "
                   f"{sum(e <= 0.25 for e in lats)} of {len(lats)} within 25%; largest error {max(lats):.1%}.")
    if model:
        out.append(f"- The time model alone (`tilefx.cost`, the plan's predicted ratio before any "
                   f"tuning) vs measured: {sum(e <= 0.25 for e in model)} of {len(model)} within 25%; "
                   f"largest error {max(model):.1%}.")
    return out + [""]


def _targets(rows: list[dict]) -> list[str]:
    out = ["### Targets", "", "| row | target | measured | met |", "|---|---|---|---|"]
    for r in rows:
        if "peer" in r or r["target"] == (None, None):
            continue
        ratio, bound = r["target"]
        want = f">= {ratio}x lower peak" + (f" at <= {bound}x latency" if bound else "")
        ok = (ratio is None or r["ratio"] >= ratio) and (bound is None or r["lat"] <= bound)
        got = f"{r['ratio']:.2f}x at {r['lat']:.2f}x"
        if r.get("max_macs") is not None:
            want += f", extra MACs <= {r['max_macs']:.0%}"
            got += f", {r['extra']:+.1%} MACs"
            ok = ok and r["extra"] <= r["max_macs"]  # False for NaN (a plan without predictions)
        out.append(f"| {r['model']}@{r['size']} ({r['label']}) | {want} | {got} | "
                   f"{'yes' if ok else 'no'} |")
    return (out + [""] if len(out) > 4 else []) + _stream_macs(rows)


#: Issue 11: a streaming plan's extra MACs at most this share of the untiled model's.
STREAM_MAX_MACS = 0.03


def _stream_macs(rows: list[dict]) -> list[str]:
    """One line: the extra MACs of every frontier plan that streams all its regions."""
    per_model = {(r["model"], r["size"]): r["stream_macs"] for r in rows
                 if "peer" not in r and r.get("stream_macs")}
    counted = {k: v for k, v in per_model.items() if v[0]}
    if not counted:
        return []
    (model, size), (_, worst) = max(counted.items(), key=lambda kv: kv[1][1])
    plans = sum(n for n, _ in counted.values())
    ok = worst <= STREAM_MAX_MACS
    return [f"Every region streamed and no skip computed again: {plans} frontier plans of "
            f"{len(counted)} of the {len(per_model)} benchmarked models and sizes; largest extra "
            f"MACs {worst:+.1%} ({model}@{size}); target <= {STREAM_MAX_MACS:.0%}: "
            f"{'met' if ok else 'not met'}.", ""]


def log_tuner() -> None:
    """Every measurement the tuner takes to stderr, so a row's choice can be explained from the
    run's log (EfficientNet-B0 @1024 came out untiled in one run and tiled, verified at 0.94x,
    in fresh processes)."""
    logging.basicConfig(stream=sys.stderr, format="  tune %(message)s")
    logging.getLogger("tilefx.autotune").setLevel(logging.DEBUG)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    ap.add_argument("--sizes", nargs="+", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (224: x4)")
    ap.add_argument("--no-peers", action="store_true", help="skip the peers' rows")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    log_tuner()
    default_out = os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md")
    if (args.models or args.sizes) and os.path.abspath(args.out) == os.path.abspath(default_out):
        ap.error("--models and --sizes measure part of a section, and a run replaces the "
                 "sections it runs whole: pass --out elsewhere, or run whole sections")
    titles = {name: title for name, (title, _) in SECTIONS.items()}
    kept = {}
    if os.path.exists(args.out):  # the sections this run does not measure stay as they were
        with open(args.out) as f:
            kept = sections.blocks(f.read(), titles)
    t0, started = time.perf_counter(), _start()
    todo = [r for r in ROWS if r.section in args.sections
            and (args.models is None or r.model in args.models)
            and (args.sizes is None or r.size in args.sizes)]
    if args.no_peers:
        todo = [Row(**{**r.__dict__, "peer": None}) for r in todo]
    rank = {s: i for i, s in enumerate(args.sections)}  # sections run in the order asked
    groups: dict[tuple[str, int, bool], list[Row]] = {}  # (model, size, own processes)
    for r in sorted(todo, key=lambda r: rank[r.section]):
        groups.setdefault((r.model, r.size, r.section == "allocator"), []).append(r)
    results: list[dict] = []
    failed: dict[str, list[str]] = {}
    argv_shown = sys.argv[1:] if argv is None else list(argv)
    for k, ((name, size, own_processes), rows) in enumerate(groups.items()):
        reps = args.repeats * 4 if size <= 256 else args.repeats
        try:
            results += (allocator.bench(name, size, reps) if own_processes
                        else bench(name, size, rows, reps))
        except Exception as e:  # one model failing must not lose the others' numbers
            print(f"  {name}@{size} failed: {type(e).__name__}: {e}", file=sys.stderr)
            for section in {r.section for r in rows}:
                failed.setdefault(section, []).append(f"{name}@{size}: {type(e).__name__}: {e}")
        # Written after every model, so a run stopped early keeps what it measured and says
        # which models it did not reach.
        done = render(results, argv_shown, time.perf_counter() - t0,
                      pending=[f"{m}@{s}" for m, s, _ in list(groups)[k + 1:]], started=started,
                      failed=failed)
        _write(args.out, sections.merge(header(), kept, done, list(SECTIONS)))
    print(f"wrote {os.path.abspath(args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
