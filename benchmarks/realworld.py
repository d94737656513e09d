"""tilefx's default transform on real-world CNNs (timm, smp, MONAI, diffusers): outcome and peak.

    python benchmarks/realworld.py                              # every catalogue model at 512
    python benchmarks/realworld.py --size 256 --only timm_resnet50,smp_unet
    python benchmarks/realworld.py --json out.json --md out.md

For each model of ``benchmarks/models.py``: build it (random weights, seed 0, eval), draw
``x = torch.randn(shape)`` (seed 0), call ``tilefx.transform(model, x)`` with no options and
classify the outcome:

* ``tiled``    the result contains a ``tilefx.TiledRegion`` and its outputs equal eager's;
* ``untiled``  no ``TiledRegion`` (the planner kept the model whole), outputs equal eager's;
* ``refused``  transform raised ``tilefx.TilingError``;
* ``crash``    transform raised any other exception, calling the result on ``x`` raised, or the
               model's subprocess died or ran past the timeout;
* ``wrong``    the result ran but some output tensor differs from eager beyond
               ``rtol=1e-4, atol=1e-4 * max|want|`` (float32 summation order differs between a
               tile and the whole map).

Where the result ran, the measured peak activation bytes of eager ``model(x)`` and of
``gm(x)`` (``tilefx.measure.peak_memory``) and their ratio are reported, with the wall time of
``transform``. Each model runs in its own subprocess, one at a time, so a crash or a memory
blow-up loses only that model. Only the public API is used (``transform``, ``TilingError``,
``TiledRegion``, ``measure.peak_memory``), so the script runs against any version of tilefx;
the header names the git commit of the tilefx checkout actually imported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# Each run measures afresh (its planning times and choices are its own), not from another
# run's measurements kept on disk (tilefx.cache), unless TILEFX_CACHE_DIR names a folder.
os.environ.setdefault("TILEFX_CACHE_DIR", "")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

OUTCOMES = ("tiled", "untiled", "refused", "crash", "wrong")
RTOL = 1e-4
ATOL_REL = 1e-4  # atol = ATOL_REL * max|want|, per output tensor


# --------------------------------------------------------------------------------------------
# one model (runs in a subprocess)


def _first(msg: str, n: int = 200) -> str:
    return " ".join(str(msg).split())[:n]


def run_one(name: str, size: int) -> dict:
    import torch
    from torch.utils._pytree import tree_flatten

    import tilefx
    from tilefx.measure import peak_memory
    from models import catalogue

    build, shape, family = catalogue(size)[name]
    row = dict(name=name, family=family, shape=list(shape), outcome=None, note="",
               base_peak=None, tiled_peak=None, ratio=None, transform_s=None, rel_err=None,
               regions=None)
    model = build()
    torch.manual_seed(0)
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x)
    want_leaves = [t for t in tree_flatten(want)[0] if isinstance(t, torch.Tensor)]
    want_leaves = [t.detach().clone() for t in want_leaves]

    t0 = time.perf_counter()
    try:
        gm = tilefx.transform(model, x)
    except tilefx.TilingError as e:
        row["transform_s"] = time.perf_counter() - t0
        row.update(outcome="refused", note=_first(e))
        return row
    except Exception as e:  # noqa: BLE001 - any other failure of transform is a crash
        row["transform_s"] = time.perf_counter() - t0
        row.update(outcome="crash", note=_first(f"transform: {type(e).__name__}: {e}"))
        return row
    row["transform_s"] = time.perf_counter() - t0
    row["regions"] = sum(isinstance(m, tilefx.TiledRegion) for m in gm.modules())

    try:
        with torch.no_grad():
            got = gm(x)
    except Exception as e:  # noqa: BLE001
        row.update(outcome="crash", note=_first(f"call: {type(e).__name__}: {e}"))
        return row
    got_leaves = [t for t in tree_flatten(got)[0] if isinstance(t, torch.Tensor)]

    wrong = None
    rel = 0.0
    if len(got_leaves) != len(want_leaves):
        wrong = f"{len(got_leaves)} output tensors, eager has {len(want_leaves)}"
    else:
        for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
            scale = w.abs().max().item() if w.numel() else 0.0
            if g.shape == w.shape and w.is_floating_point() and w.numel():
                rel = max(rel, ((g - w).abs().max().item() / max(scale, 1e-30)))
            try:
                torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL_REL * scale)
            except AssertionError as e:
                wrong = wrong or f"output {i}: " + _first(e, 160)
    row["rel_err"] = rel

    row["base_peak"] = peak_memory(model, x)
    row["tiled_peak"] = peak_memory(gm, x)
    row["ratio"] = row["base_peak"] / max(row["tiled_peak"], 1)
    if wrong:
        row.update(outcome="wrong", note=f"rel err {rel:.1e}; {wrong}")
    else:
        row["outcome"] = "tiled" if row["regions"] else "untiled"
        row["note"] = (f"{row['regions']} TiledRegion(s), " if row["regions"] else "") + f"rel err {rel:.1e}"
    return row


# --------------------------------------------------------------------------------------------
# the driver


def tilefx_origin() -> tuple[str, str]:
    """(path of the tilefx package that a subprocess imports, its checkout's git commit)."""
    spec = importlib.util.find_spec("tilefx")
    if spec is None or spec.origin is None:
        return "?", "?"
    pkg = os.path.dirname(spec.origin)
    try:
        commit = subprocess.run(["git", "-C", pkg, "rev-parse", "--short", "HEAD"], text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", pkg, "status", "--porcelain", "--untracked-files=no"],
                               text=True, capture_output=True).stdout.strip()
        return pkg, commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return pkg, "?"


def versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "timm", "segmentation_models_pytorch", "monai", "diffusers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def run_isolated(name: str, family: str, size: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--size", str(size),
               "--worker-out", out]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(name=name, family=family, outcome="crash",
                        note=f"timeout: no result after {timeout:.0f} s", wall_s=time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        if os.path.exists(out):
            with open(out) as f:
                row = json.load(f)
            row["wall_s"] = wall
            return row
        tail = _first(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "", 200)
        return dict(name=name, family=family, outcome="crash", wall_s=wall,
                    note=_first(f"subprocess exit {proc.returncode}: {tail}"))


def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def render(rows: list[dict], meta: dict) -> str:
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    other = len(rows) - sum(counts.values())
    v = meta["versions"]
    lines = [
        "# tilefx on real-world CNNs (timm, smp, MONAI, diffusers)",
        "",
        f"Generated by `python benchmarks/realworld.py {meta['argv']}`; do not edit by hand.",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- torch {v['torch']}, timm {v['timm']}, segmentation_models_pytorch {v['segmentation_models_pytorch']}, "
        f"monai {v['monai']}, diffusers {v['diffusers']}, python {meta['python']}",
        f"- tilefx commit {meta['tilefx_commit']} ({meta['tilefx_path']})",
        f"- input side {meta['size']} (latent side/8 for the VAE decoder); CPU, float32, batch 1, "
        "eval mode, random weights; `tilefx.transform(model, x)` with no options",
        f"- wall time of this run: {meta['wall_s'] / 60:.1f} min",
        "",
        "**" + " / ".join(f"{counts[o]} {o}" for o in OUTCOMES) + (f" / {other} other" if other else "")
        + f"** of {len(rows)} models.",
        "",
        "Peak: measured peak activation bytes of one call (`tilefx.measure.peak_memory`), eager "
        "model -> transformed; ratio = eager / transformed. *transform s*: wall time of "
        "`tilefx.transform`. Outputs compared with `rtol=1e-4, atol=1e-4*max|want|`.",
        "",
        "| model | family | input | outcome | peak MiB eager -> tilefx | ratio | transform s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r.get("shape", [])[2:])) if r.get("shape") else ""
        peak = f"{_mib(r.get('base_peak'))} -> {_mib(r.get('tiled_peak'))}" if r.get("base_peak") is not None else ""
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
        ts = f"{r['transform_s']:.1f}" if r.get("transform_s") is not None else ""
        note = str(r.get("note", "")).replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['family']} | {shape} | {r['outcome']} | {peak} | {ratio} | {ts} | {note} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--only", default="", help="comma-separated catalogue names")
    ap.add_argument("--json", default=None, help="write the rows here (a JSON list)")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # the subprocess: one model, its row to --worker-out
        row = run_one(args.worker, args.size)
        with open(args.worker_out, "w") as f:
            json.dump(row, f)
        return

    from models import catalogue

    cat = catalogue(args.size)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or list(cat)
    unknown = [n for n in wanted if n not in cat]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(cat)}")
    path, commit = tilefx_origin()
    print(f"tilefx {commit} from {path}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rows = []
    for i, name in enumerate(wanted, 1):
        row = run_isolated(name, cat[name][2], args.size, args.timeout)
        row.setdefault("shape", list(cat[name][1]))
        rows.append(row)
        peak = (f" {_mib(row.get('base_peak'))} -> {_mib(row.get('tiled_peak'))} MiB"
                if row.get("base_peak") is not None else "")
        print(f"[{i}/{len(wanted)}] {name}: {row['outcome']}{peak} "
              f"({row.get('wall_s', 0):.0f} s) {row.get('note', '')}", file=sys.stderr, flush=True)
        if args.json:  # keep partial results if the run is interrupted
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    meta = dict(
        argv=" ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        python=platform.python_version(), versions=versions(), tilefx_commit=commit,
        tilefx_path=path, size=args.size, wall_s=time.perf_counter() - t0,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    text = render(rows, meta)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
        print(f"wrote {os.path.abspath(args.md)}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
