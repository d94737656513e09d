"""``tilefx demo``: tile ResNet-50 and show what it buys, measured on this machine."""

from __future__ import annotations

import platform
import time

import torch

__all__ = ["run"]


def run(size: int = 512, model_name: str = "resnet50") -> int:
    """Transform a random-weight torchvision model and print plan, graph, memory and latency.

    Returns a process exit code (0 when the tiled outputs match the model's).
    """
    import torchvision

    import tilefx
    from tilefx import autotune
    from tilefx.measure import latency, peak_memory

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    print(f"tilefx demo: {model_name} (random weights) on a 1x3x{size}x{size} input, "
          f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads\n")

    t0 = time.perf_counter()
    with torch.no_grad():
        gm = tilefx.transform(model, x)
    print(f"planned and rewritten in {time.perf_counter() - t0:.1f} s\n")
    print("== plan ==")
    tilefx.explain(gm)

    print("\n== the region call in the rewritten graph ==")
    for line in gm.code.splitlines():
        if "tiled_region" in line:
            print("   ", line.strip()[:110])

    with torch.no_grad():
        base = peak_memory(model, x)
        tiled = peak_memory(gm, x)
        # As many rounds as the tuner's verifying run (about ``autotune.VERIFY_S``, by the
        # plan's times): 3 rounds of a 200 ms model read 1.13x, then 1.32x, for the same plan.
        plan = gm.meta.get("tilefx_plan")  # absent where the model was captured in parts
        rounds = autotune.verify_repeats(plan) if plan is not None else autotune.VERIFY_REPEATS
        stats = latency({"untiled": model, "tiled": gm}, x, repeats=rounds, warmup=1)
        ref, out = model(x), gm(x)
    diff = (ref - out).abs().max().item()
    print("\n== measured on this machine (peak as docs/design.md defines it) ==")
    print(f"peak memory  untiled {base / 2**20:8.1f} MiB   tiled {tiled / 2**20:8.1f} MiB   "
          f"({base / max(tiled, 1):.1f}x lower)")
    u, t = stats["untiled"].median_s, stats["tiled"].median_s
    print(f"latency      untiled {u * 1e3:8.1f} ms    tiled {t * 1e3:8.1f} ms    ({t / u:.2f}x; "
          f"medians of {rounds} alternating calls)")
    print(f"max |tiled - untiled| over the logits: {diff:.3g}")
    ok = torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    print("outputs match" if ok else "OUTPUTS DIFFER")

    # The approximate baseline other tilers ship: the same plan with no halos (seams).
    plan = gm.meta.get("tilefx_plan")
    if getattr(plan, "regions", ()):
        with torch.no_grad():
            approx = tilefx.transform(model, x, plan=plan, halo=False)
            exact, seams = tilefx.compare(model, gm, x), tilefx.compare(model, approx, x)
        print("\n== exact (halo=True) against the no-halo baseline (halo=False), same plan ==")
        print(f"halo=True   {exact}")
        print(f"halo=False  {seams}")
    return 0 if ok else 1
