"""Convolution primitives measured on this machine: memory against time, layer by layer.

    python benchmarks/primitives.py            # about 10 minutes on 2 cores; prints markdown

1. One call of each primitive on the layers of issue 10's table: measured peak (profiler
   allocator events), the workspace formula's prediction, and seconds per call
   (``tilefx.primitives.time_primitives``: interleaved, a low quantile).
2. Whole models, CPU float32, batch 1, untiled and on the planner's lowest-peak plan, each as
   captured and with primitives chosen by hand, all four run side by side
   (``tilefx.measure.latency``, alternating calls): ResNet-50 @224 with every 512-channel 3x3
   convolution on ``native``; timm's vgg16 @512 with its pre-logits 7x7 convolution on
   ``native`` and the 1x1 after it on ``matmul``; MobileNetV2 @224 with its 320->1280 1x1
   convolution on ``matmul``. Peaks measured and predicted (``passes.memory.simulate``).
   Numbers are never edited by hand: rerun the command.
"""

from __future__ import annotations

import os

import torch
import torchvision

import tilefx
from tilefx import planner
from tilefx import primitives as P
from tilefx.measure import latency, peak_memory
from tilefx.passes.memory import simulate
from tilefx.passes.primitives import apply_primitives

# Each run measures afresh (its planning times and choices are its own), not from another
# run's measurements kept on disk (tilefx.cache), unless TILEFX_CACHE_DIR names a folder.
os.environ.setdefault("TILEFX_CACHE_DIR", "")

MiB = 2**20

LAYERS = [  # (label, weight shape, stride, padding, input shape)
    ("512->512 3x3 at 7x7", (512, 512, 3, 3), 1, 1, (1, 512, 7, 7)),
    ("1024->1024 1x1 at 14x14", (1024, 1024, 1, 1), 1, 0, (1, 1024, 14, 14)),
    ("64->64 3x3 at 56x56", (64, 64, 3, 3), 1, 1, (1, 64, 56, 56)),
    ("320->1280 1x1 at 7x7", (1280, 320, 1, 1), 1, 0, (1, 320, 7, 7)),
    ("4096->512x7x7 at 16x16 (vgg16 pre-logits)", (4096, 512, 7, 7), 1, 0, (1, 512, 16, 16)),
]


def layer_table() -> None:
    print("| convolution | primitive | peak MiB (measured) | workspace MiB predicted / measured"
          " | ms per call |")
    print("|---|---|---|---|---|")
    for label, w, s, pad, shape in LAYERS:
        p = P.OpParams("conv", w, (s, s), (pad, pad), (1, 1), 1, True)
        names = P.candidates_for(p)
        times = P.time_primitives(p, shape, names)
        out = torch.Size(p.out_shape(shape)).numel() * 4
        for n in names:
            ws = P.measure_workspace(n, p, shape)
            print(f"| {label} | {n} | {(out + ws) / MiB:.2f} | "
                  f"{P.workspace_bytes(n, p, shape) / MiB:.2f} / {ws / MiB:.2f} | "
                  f"{times[n] * 1e3:.2f} |", flush=True)


def _convs(gm, pred) -> list[str]:
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and (p := P.op_params(n)) is not None and pred(p)]


def _model_rows(label: str, model: torch.nn.Module, x: torch.Tensor,
                choices: dict[str, str]) -> None:
    """The model untiled and on its lowest-peak plan, each with and without ``choices``, run
    side by side (latency ratio against the untiled model as captured)."""
    gm = tilefx.prepare(model, x)
    plan = planner.plan(gm, x).pareto()[-1]
    tiled = tilefx.transform(model, x, plan=plan)
    variants = {"untiled": gm, "untiled + primitives": apply_primitives(gm, choices),
                "lowest-peak plan": tiled,
                "lowest-peak plan + primitives": apply_primitives(tiled, choices)}
    with torch.no_grad():
        want = model(x)
        for g in variants.values():
            torch.testing.assert_close(g(x), want, rtol=1e-4, atol=1e-4)
    stats = latency(variants, x, repeats=9, warmup=1)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(
        {k: sum(v == k for v in choices.values()) for k in set(choices.values())}.items()))
    for name, g in variants.items():
        prim = kinds if name.endswith("primitives") else "as captured"
        where = str(plan).split(":")[0] if name.startswith("lowest") else "untiled"
        print(f"| {label} | {where} | {prim} | {peak_memory(g, x) / MiB:.2f} | "
              f"{simulate(g, x).peak_bytes / MiB:.2f} | "
              f"{stats[name].median_s / stats['untiled'].median_s:.2f}x |", flush=True)


def model_table() -> None:
    print("\n| model | plan | primitives | peak MiB measured | peak MiB predicted | "
          "latency vs untiled |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    m = torchvision.models.resnet50().eval()
    gm = tilefx.prepare(m, x)
    _model_rows("ResNet-50 @224", m, x,
                {n: "native" for n in _convs(gm, lambda p: p.weight_shape == (512, 512, 3, 3))})

    import timm

    m = timm.create_model("vgg16", pretrained=False).eval()
    x = torch.randn(1, 3, 512, 512)
    gm = tilefx.prepare(m, x)
    fc1 = _convs(gm, lambda p: p.weight_shape == (4096, 512, 7, 7))
    fc2 = _convs(gm, lambda p: p.weight_shape == (4096, 4096, 1, 1))
    _model_rows("timm vgg16 @512", m, x, {**{n: "native" for n in fc1},
                                          **{n: "matmul" for n in fc2}})

    m = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 224, 224)
    gm = tilefx.prepare(m, x)
    _model_rows("MobileNetV2 @224", m, x,
                {n: "matmul" for n in _convs(gm, lambda p: p.weight_shape == (1280, 320, 1, 1))})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    layer_table()
    model_table()
