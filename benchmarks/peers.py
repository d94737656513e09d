"""The peers' own approximate or streaming methods, measured side by side with the untiled model.

    python benchmarks/peers.py                          # every peer
    python benchmarks/peers.py --only monai_instance lightstream_512 --md PEERS.md
    python benchmarks/peers.py --list

Each peer builds its model with random weights (``torch.manual_seed(0)``, eval mode, float32,
CPU), draws one input (``example_input``), and runs the untiled model and the peer's method on
it in the same process:

* ``vae_tiling``      diffusers ``AutoencoderKL.enable_tiling()``: each latent tile is decoded on
                      its own (its GroupNorms and mid-block attention see only that tile) and the
                      seams are cross-faded; 128x128 latents to 1024x1024, 512-pixel tiles.
* ``monai_instance``  MONAI ``sliding_window_inference`` on ``BasicUNet`` with its default
                      InstanceNorm (statistics per window), 1024x1024, 256-pixel windows,
                      overlap 0.25, gaussian blending, ``sw_batch_size=1``.
* ``monai_batch``     the same on ``BasicUNet(norm="batch")`` (eval batch norm is pointwise: the
                      error is the windows' borders and the blending alone).
* ``lightstream_1024`` lightstream's streaming forward pass (``StreamingCNN``, the exact
                      streaming CNN library) on a ResNet-18 trunk, 1024x1024, 512-pixel tiles.
* ``lightstream_512`` the same at 512x512 with 256-pixel tiles.

Each record (:class:`PeerRecord`) holds the peak activation bytes of each
(``tilefx.measure.peak_memory``, the first call of each, under the profiler), their times
(``tilefx.measure.latency``: alternating calls, medians), the max and mean abs error of the
peer's output against the untiled one, the output's magnitude (max abs of the untiled output),
and for segmentation outputs the share of pixels whose argmax class changes. Numbers are never
edited by hand: rerun the command. Timings on a shared machine are noisy; the ratios, measured
side by side in one process, are what count.

The run is dominated by lightstream, whose streamed passes recompute most of every tile: on 2
CPU cores shared with other jobs (load average 6 to 9) the whole run took 22 minutes, 15 of them
lightstream's; the VAE took 4, MONAI 3.

Optional packages: ``pip install -e '.[peers]'`` (diffusers, MONAI, lightstream; lightstream's
package imports ``lightning`` at the top, so that comes too). A peer whose package is missing
is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import io
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tilefx.measure import LatencyStats, latency, peak_memory

__all__ = ["PeerRecord", "Outputs", "Case", "measure", "example_input", "build_vae",
           "build_basicunet", "build_resnet18_trunk", "vae_tiling", "monai_sliding_window",
           "lightstream_streaming", "PEERS", "render", "main"]

MIB = 2**20


# --------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Outputs:
    """The two outputs a record was measured on (kept only when asked: they can be large)."""

    untiled: torch.Tensor
    peer: torch.Tensor


@dataclass(frozen=True)
class PeerRecord:
    """One peer's method against the untiled model on the same input, in the same process.

    Peaks are bytes (``tilefx.measure.peak_memory``); times are :class:`LatencyStats` of
    alternating calls. Errors are of the peer's output against the untiled output;
    ``output_magnitude`` is the untiled output's max abs value. ``class_change_share`` is the
    share of pixels whose argmax over channels differs (segmentation outputs only).
    """

    peer: str
    model: str
    setting: str
    input_shape: tuple[int, ...]
    untiled_peak_bytes: int
    peer_peak_bytes: int
    untiled_time: LatencyStats
    peer_time: LatencyStats
    max_abs_error: float
    mean_abs_error: float
    output_magnitude: float
    class_change_share: float | None = None
    note: str = ""
    outputs: Outputs | None = field(default=None, repr=False, compare=False)

    @property
    def peak_ratio(self) -> float:
        """Untiled peak over the peer's: 3.8 means 3.8x lower."""
        return self.untiled_peak_bytes / max(self.peer_peak_bytes, 1)

    @property
    def latency_ratio(self) -> float:
        """The peer's median time over the untiled one's: 2.0 means twice as long."""
        return self.peer_time.median_s / self.untiled_time.median_s

    @property
    def relative_error(self) -> float:
        """Max abs error over the output's magnitude."""
        return self.max_abs_error / self.output_magnitude if self.output_magnitude else math.inf


@dataclass(frozen=True)
class Case:
    """What one peer measurement runs: the untiled callable and the peer's, on ``x``.

    ``describe`` is called after the runs, for a note the runs themselves reveal (how many
    tiles lightstream ran).
    """

    peer: str
    model: str
    setting: str
    x: torch.Tensor
    untiled: Callable[[torch.Tensor], torch.Tensor]
    approx: Callable[[torch.Tensor], torch.Tensor]
    segmentation: bool = False
    describe: Callable[[], str] = lambda: ""


def _peak_and_output(fn: Callable, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    box = []

    def call(x):
        out = fn(x)
        box.append(out)
        return out

    peak = peak_memory(call, x)
    return peak, box[0].detach()


def measure(case: Case, repeats: int = 3, keep_outputs: bool = False) -> PeerRecord:
    """Run ``case``: peak and output of one call of each, then ``repeats`` alternating timed
    calls of each (the first calls served as warm-up). Everything runs under ``no_grad``."""
    with torch.no_grad():
        untiled_peak, want = _peak_and_output(case.untiled, case.x)
        peer_peak, got = _peak_and_output(case.approx, case.x)
        if got.shape != want.shape:
            raise RuntimeError(f"{case.peer}: output shape {tuple(got.shape)} differs from the "
                               f"untiled {tuple(want.shape)}")
        diff = (got.double() - want.double()).abs()
        errors = dict(max_abs_error=float(diff.max()), mean_abs_error=float(diff.mean()),
                      output_magnitude=float(want.abs().max()))
        del diff
        share = (float((got.argmax(1) != want.argmax(1)).double().mean())
                 if case.segmentation else None)
        outputs = Outputs(want, got) if keep_outputs else None
        del want, got
        times = latency({"untiled": case.untiled, "peer": case.approx}, case.x,
                        repeats=repeats, warmup=0)
    return PeerRecord(peer=case.peer, model=case.model, setting=case.setting,
                      input_shape=tuple(case.x.shape), untiled_peak_bytes=untiled_peak,
                      peer_peak_bytes=peer_peak, untiled_time=times["untiled"],
                      peer_time=times["peer"], class_change_share=share, note=case.describe(),
                      outputs=outputs, **errors)


def example_input(shape: tuple[int, ...]) -> torch.Tensor:
    """The input every peer runs on: standard normal, from its own generator (seed 1)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# diffusers: AutoencoderKL.enable_tiling()

VAE_CONFIG = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4)


def build_vae(tile: int = 512) -> torch.nn.Module:
    """The small AutoencoderKL (seed 0, eval). ``tile`` is its ``sample_size``, which is also
    the tile size ``enable_tiling()`` decodes in, in output pixels (diffusers' default of 32
    would decode 4x4 latent tiles; Stable Diffusion's VAE config has 512)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_CONFIG, sample_size=tile).eval()


def vae_case(latent: int = 128, tile: int = 512) -> Case:
    """Untiled ``vae.decode(z).sample`` against the same decode after ``enable_tiling()``."""
    vae = build_vae(tile)
    tiled = copy.deepcopy(vae)  # a second instance: the untiled one never has tiling switched on
    tiled.enable_tiling()
    lat_tile = tiled.tile_latent_min_size
    if latent <= lat_tile:
        raise ValueError(f"vae_tiling: {latent}x{latent} latents fit one {lat_tile}-latent tile, "
                         "so enable_tiling() would not tile; use a smaller tile")
    stride = int(lat_tile * (1 - tiled.tile_overlap_factor))
    n = len(range(0, latent, stride))
    setting = (f"enable_tiling(), {tile}-px tiles ({lat_tile} latents), overlap "
               f"{tiled.tile_overlap_factor:g}, {n}x{n} tiles")
    return Case(peer="diffusers enable_tiling()", model="AutoencoderKL decoder (32,64,128,128)",
                setting=setting, x=example_input((1, 4, latent, latent)),
                untiled=lambda z: vae.decode(z).sample, approx=lambda z: tiled.decode(z).sample)


def vae_tiling(latent: int = 128, tile: int = 512, repeats: int = 3,
               keep_outputs: bool = False) -> PeerRecord:
    """diffusers' tiled decode against the untiled one: ``latent``x``latent`` latents."""
    return measure(vae_case(latent, tile), repeats, keep_outputs)


# --------------------------------------------------------------------------------------------
# MONAI: sliding_window_inference


def build_basicunet(norm: str = "instance") -> torch.nn.Module:
    """MONAI's 2-d BasicUNet, 3 channels in, 2 classes out (seed 0, eval); ``norm="instance"``
    is its default (InstanceNorm, affine)."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    kw = {} if norm == "instance" else {"norm": norm}
    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, **kw).eval()


def monai_case(norm: str = "instance", size: int = 1024, roi: int = 256,
               overlap: float = 0.25) -> Case:
    from monai.inferers import sliding_window_inference

    net = build_basicunet(norm)

    def window(x):
        return sliding_window_inference(x, (roi, roi), 1, net, overlap=overlap, mode="gaussian")

    step = max(int(roi * (1 - overlap)), 1)  # MONAI's scan interval
    n = math.ceil(max(size - roi, 0) / step) + 1
    return Case(peer="MONAI sliding_window_inference", model=f"BasicUNet 2d, {norm} norm",
                setting=f"roi {roi}, overlap {overlap:g}, gaussian, sw_batch_size 1, {n}x{n} windows",
                x=example_input((1, 3, size, size)), untiled=net, approx=window,
                segmentation=True)


def monai_sliding_window(norm: str = "instance", size: int = 1024, roi: int = 256,
                         overlap: float = 0.25, repeats: int = 3,
                         keep_outputs: bool = False) -> PeerRecord:
    """MONAI's sliding window against the whole-image BasicUNet."""
    return measure(monai_case(norm, size, roi, overlap), repeats, keep_outputs)


# --------------------------------------------------------------------------------------------
# lightstream: StreamingCNN


def build_resnet18_trunk() -> torch.nn.Module:
    """torchvision's ResNet-18 without avgpool and fc (seed 0, eval), as lightstream's
    ``split_resnet`` cuts it."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    return torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                               net.layer1, net.layer2, net.layer3, net.layer4).eval()


def _streaming(trunk: torch.nn.Module, tile: int) -> torch.nn.Module:
    """lightstream's streaming network for ``trunk``, built as ``StreamingResNet`` builds it
    (``StreamingConstructor`` keeping batch norms, no input normalisation), on the CPU.

    The constructor moves the model to CUDA for either value of ``statistics_on_cpu``; it is
    built with ``True`` (no move in ``__init__``) and the flag is cleared before
    ``prepare_streaming_model``, so ``StreamingCNN`` finds its statistics where the weights
    are. Its chatter goes to a buffer, and the grad mode it switches on is restored.
    """
    from lightstream.core.constructor import StreamingConstructor

    with torch.enable_grad(), contextlib.redirect_stdout(io.StringIO()):
        constructor = StreamingConstructor(
            trunk, tile, verbose=False, deterministic=True, statistics_on_cpu=True,
            copy_to_gpu=False, normalize_on_gpu=False, add_keep_modules=[torch.nn.BatchNorm2d])
        constructor.statistics_on_cpu = False
        return constructor.prepare_streaming_model().eval()


def lightstream_case(size: int = 1024, tile: int = 512) -> Case:
    trunk = build_resnet18_trunk()
    stream = _streaming(copy.deepcopy(trunk), tile)
    calls = []
    hook = stream.stream_module.register_forward_pre_hook(lambda m, a: calls.append(1))

    def approx(x):
        calls.clear()
        return stream(x)

    def describe() -> str:
        hook.remove()
        lost = stream.tile_output_lost
        return (f"{len(calls)} tiles per call; each tile loses {lost.top} output px per side "
                f"(stride {int(stream.output_stride[1])})")

    return Case(peer="lightstream StreamingCNN", model="ResNet-18 trunk",
                setting=f"{tile}-px tiles", x=example_input((1, 3, size, size)),
                untiled=trunk, approx=approx, describe=describe)


def lightstream_streaming(size: int = 1024, tile: int = 512, repeats: int = 2,
                          keep_outputs: bool = False) -> PeerRecord:
    """lightstream's streaming forward pass against the untiled trunk."""
    return measure(lightstream_case(size, tile), repeats, keep_outputs)


# --------------------------------------------------------------------------------------------
# the command line

#: name -> (packages it needs, run(repeats) -> PeerRecord, default repeats)
PEERS: dict[str, tuple[tuple[str, ...], Callable[[int], PeerRecord], int]] = {
    "vae_tiling": (("diffusers",), lambda r: vae_tiling(128, 512, repeats=r), 3),
    "monai_instance": (("monai",), lambda r: monai_sliding_window("instance", repeats=r), 3),
    "monai_batch": (("monai",), lambda r: monai_sliding_window("batch", repeats=r), 3),
    "lightstream_1024": (("lightstream", "lightning"),
                         lambda r: lightstream_streaming(1024, 512, repeats=r), 2),
    "lightstream_512": (("lightstream", "lightning"),
                        lambda r: lightstream_streaming(512, 256, repeats=r), 1),
}

VERSIONED = ("torch", "torchvision", "diffusers", "monai", "lightstream", "lightning")


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _have(pkg: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(pkg) is not None


def _mib(b: int) -> str:
    return f"{b / MIB:.1f}"


def render(records: list[PeerRecord], skipped: list[str], argv: list[str], wall_s: float,
           load: tuple[float, float, float] | None) -> str:
    """The markdown report: a header (date, machine, versions), the table, what was skipped."""
    load_txt = (f"; load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"
                if load else "")
    lines = [
        "# Peers, measured side by side with the untiled model",
        "",
        "Generated by `python benchmarks/peers.py " + " ".join(argv) + "`; do not edit by hand.",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}, {platform.platform()}{load_txt}",
        "- " + ", ".join(f"{p} {_version(p)}" for p in VERSIONED)
        + f", python {platform.python_version()}",
        "- device: CPU, float32, batch 1, eval mode, random weights (seed 0), input "
        "standard normal (seed 1)",
        f"- wall time of this run: {wall_s / 60:.1f} min",
        "",
        "Peak = highest total of tensor bytes allocated during the call and alive at once "
        "(`tilefx.measure.peak_memory`: torch.profiler allocator events; the input and the "
        "weights are not counted). Times are medians of alternating calls in one process "
        "(`tilefx.measure.latency`); the machine may be shared, so absolute times are noisy and "
        "the ratios are what count. Errors: the peer's output against the untiled model's; "
        "magnitude = max abs of the untiled output; class changed = share of pixels whose "
        "argmax class differs.",
        "",
        "| peer | model | input | setting | untiled peak MiB | peer peak MiB | lower peak | "
        "untiled s | peer s | latency | max abs err | mean abs err | magnitude | max err / magnitude "
        "| class changed | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        share = "-" if r.class_change_share is None else f"{r.class_change_share:.2%}"
        lines.append(
            f"| {r.peer} | {r.model} | {'x'.join(map(str, r.input_shape))} | {r.setting} | "
            f"{_mib(r.untiled_peak_bytes)} | {_mib(r.peer_peak_bytes)} | **{r.peak_ratio:.2f}x** | "
            f"{r.untiled_time.median_s:.2f} | {r.peer_time.median_s:.2f} | "
            f"{r.latency_ratio:.2f}x | {r.max_abs_error:.2e} | {r.mean_abs_error:.2e} | "
            f"{r.output_magnitude:.3g} | {r.relative_error:.1e} | {share} | {r.note} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[PeerRecord]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(PEERS),
                    help="run only these peers (default: all)")
    ap.add_argument("--md", metavar="FILE", help="also write the markdown report to FILE")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls of each side (default: per peer, 1 to 3)")
    ap.add_argument("--list", action="store_true", help="list the peers and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (pkgs, _, reps) in PEERS.items():
            print(f"{name:18s} needs {', '.join(pkgs)}; {reps} timed call(s) of each side")
        return []
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    records, skipped = [], []
    for name in args.only or list(PEERS):
        pkgs, run, reps = PEERS[name]
        missing = [p for p in pkgs if not _have(p)]
        if missing:
            skipped.append(f"{name} ({', '.join(missing)} not installed)")
            print(f"[{name}] skipped: {', '.join(missing)} not installed", file=sys.stderr)
            continue
        t = time.perf_counter()
        rec = run(args.repeats or reps)
        print(f"[{name}] {rec.peak_ratio:.2f}x lower peak at {rec.latency_ratio:.2f}x the time, "
              f"max abs err {rec.max_abs_error:.2e} ({time.perf_counter() - t:.0f} s)",
              file=sys.stderr)
        records.append(rec)
    text = render(records, skipped, argv, time.perf_counter() - t0, load)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return records


if __name__ == "__main__":
    main()
