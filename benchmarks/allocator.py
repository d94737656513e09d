"""The untiled baseline under three CPU allocators: one tiled plan, timed beside the untiled graph.

Run by ``python benchmarks/run.py --sections allocator``; ``python benchmarks/allocator.py
--model resnet50 --size 1024`` prints one model's rows. :data:`ABOUT` says what and why (it is
the section's text in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ABOUT = """\
At 1024 an untiled call spends a third to a half of its CPU time in the kernel: glibc maps an
allocation over its mmap threshold (at most 32 MiB) afresh unless a free chunk of its heap fits
it, and the kernel faults its pages in on every call, while a tiled plan's buffers are small
and reused from the heap. The latency ratios of the other sections, measured under glibc's
defaults as most users run, so credit tiling with time the untiled graph loses to the
allocator. This section times the same plan under

- *default*: glibc's defaults;
- `THP_MEM_ALLOC_ENABLE=1`: torch asks for 2 MiB pages (`madvise`), up to 512x fewer faults;
- `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64 GiB`: glibc serves every allocation from its
  heap and never gives memory back, a caching allocator like PyTorch's CUDA one: after the first
  call an untiled call takes few faults (where the heap is fragmented it grows), and the
  process keeps its peak resident.

Each setting runs in its own process (the variables are read when it starts), one after another.
The first plans (`transform`'s default, memory first within +15%, tuned under glibc's defaults)
and saves the tiled module with `torch.save`; the next two load it, so they time the same plan
beside the same untiled graph, in alternating calls. A fourth process, with the caching heap,
plans afresh: `transform`'s default where the untiled graph runs without faults.
"""

#: The models whose default plans the section times, at 1024.
MODELS = ("mobilenet_v2", "resnet50", "vgg16", "densenet121")

CACHING_HEAP = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64 GiB"
#: The allocators: name -> the environment of a process that runs with it.
ALLOCATORS = {
    "default": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    CACHING_HEAP: {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)},
}
#: The section's processes: name -> (environment, whether it plans afresh rather than load the
#: first process's plan): each allocator with the plan chosen under glibc's defaults, then the
#: caching heap planning for itself.
SETTINGS = {**{name: (env, name == "default") for name, env in ALLOCATORS.items()},
            "the same, planned there": (ALLOCATORS[CACHING_HEAP], True)}


def bench(model: str, size: int, repeats: int) -> list[dict]:
    """One row per setting: the default plan of ``model`` at ``size``, timed in a process of
    each setting's own."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "tiled.pt")
        for name, (env, plans_here) in SETTINGS.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model,
                   "--size", str(size), "--repeats", str(repeats), "--saved", saved]
            if not plans_here:  # the plan the first process chose, timed for as many rounds
                cmd += ["--load", "--rounds", str(rows[0]["rounds"])]
            done = subprocess.run(cmd, env={**os.environ, **env}, check=True,
                                  stdout=subprocess.PIPE, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(dict(row, section="allocator", model=model, size=size, setting=name))
            print(f"  {model}@{size} {name}: base {row['base_ms']:.0f} ms, tiled "
                  f"{row['tiled_ms']:.0f} ms ({row['lat']:.2f}x), faults per call "
                  f"{row['faults'][0]:.0f} / {row['faults'][1]:.0f}", file=sys.stderr)
    return rows


def _child(model: str, size: int, repeats: int, saved: str, load: bool, rounds: int) -> dict:
    import torch

    import run  # the benchmark's models and row timing (benchmarks/ is not a package)
    import tilefx
    from tilefx.measure import latency, peak_memory

    m, x = run.MODELS[model](size)
    gm = tilefx.prepare(m, x)
    if load:
        tiled = torch.load(saved, weights_only=False)
        label = ""
    else:
        plan = tilefx.api.tuned_plan(gm, x, tilefx.planner.frontier(gm, x))
        tiled = tilefx.apply(gm, plan)
        if not os.path.exists(saved):  # the first process's plan is the one the others load
            torch.save(tiled, saved)
        label, rounds = plan.label, run.row_rounds(plan, repeats)
    with torch.no_grad():
        want, got = run._first(gm(x)), run._first(tiled(x))
    # The loaded module must be the plan the first process chose and computes: float32 sums in
    # another order differ by ~1e-5 relative at most (tests/test_zoo.py's tolerances).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stats = latency({"base": gm, "tiled": tiled}, x, repeats=rounds, warmup=2)
    # Tensor bytes (allocator events): the same under every allocator, for the same plan.
    peaks = (peak_memory(gm, x), peak_memory(tiled, x))
    base_use, tiled_use = run.kernel_use(gm, x), run.kernel_use(tiled, x)
    return dict(plan=label, rounds=rounds, peaks=peaks, base_ms=stats["base"].median_s * 1e3,
                tiled_ms=stats["tiled"].median_s * 1e3,
                lat=stats["tiled"].median_s / stats["base"].median_s,
                faults=(base_use[1], tiled_use[1]), kernel=(base_use[0], tiled_use[0]),
                err=float((got.double() - want.double()).abs().max()))


def table(rows: list[dict]) -> list[str]:
    """The section's table and its summary lines."""
    out = ["| model | input | allocator | peak MiB (base / tiled) | base ms | tiled ms | latency "
           "ratio | minor faults per call (base / tiled) | kernel share (base / tiled) | "
           "max abs err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base, tiled = r["peaks"]
        out.append(f"| {r['model']} | {r['size']} | {r['setting']} | {base / 2**20:.1f} / "
                   f"{tiled / 2**20:.1f} (**{base / max(tiled, 1):.2f}x**) | {r['base_ms']:.0f} | "
                   f"{r['tiled_ms']:.0f} | **{r['lat']:.2f}x** | {r['faults'][0]:,.0f} / "
                   f"{r['faults'][1]:,.0f} | {r['kernel'][0]:.0%} / {r['kernel'][1]:.0%} | "
                   f"{r['err']:.1e} |")
    plans = [f"- {r['model']}@{r['size']} ({r['setting']}): `{r['plan']}`" for r in rows if r["plan"]]
    return out + ["", "The plans (`transform`'s default, chosen where the row says; a row without "
                  "one times the plan of its model's *default* row):", "", *plans, ""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--saved", help=argparse.SUPPRESS)
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import run

        run.log_tuner()  # as in run.py's own process
        print(json.dumps(_child(args.model, args.size, args.repeats, args.saved, args.load,
                                args.rounds)))
        return
    print("\n".join(table(bench(args.model, args.size, args.repeats))))


if __name__ == "__main__":
    main()
