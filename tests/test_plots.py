"""tilefx.plots: each function returns a Figure whose artists say what the picture claims.

Rendered with the Agg canvas (the figures are built without pyplot, so no GUI backend is
touched). Invariants rather than pixels: the curves' peaks equal the simulator's, the tile
shares partition the image, the chosen plan is on the frontier plot.
"""

from __future__ import annotations

import builtins
import io

import pytest
import torch
from torch import nn

import tilefx

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from tilefx.plots import plot_memory, plot_pareto, plot_strips, plot_tiles  # noqa: E402


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    ).eval()


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    data = buf.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_plot_memory_before_and_after():
    from tilefx.passes.memory import simulate

    m, x = net(), torch.randn(1, 3, 64, 64)
    gm = tilefx.transform(m, x, merge="6", tiles=(2, 2))
    fig = plot_memory(m, x, tiled=gm)
    ax = fig.axes[0]
    untiled, tiled = ax.get_lines()[:2]
    assert untiled.get_label().startswith("untiled") and tiled.get_label().startswith("tiled")
    want_before = simulate(tilefx.prepare(m, x), x).peak_bytes / 2**20
    want_after = simulate(gm, x).peak_bytes / 2**20
    assert max(untiled.get_ydata()) == pytest.approx(want_before)
    assert max(tiled.get_ydata()) == pytest.approx(want_after)
    assert max(tiled.get_xdata()) <= len(untiled.get_xdata())  # drawn on the untiled positions
    assert any("tiled_region_0" in t.get_text() for t in ax.texts)
    png(fig)


def test_plot_memory_transforms_when_not_given_and_draws_into_ax():
    from matplotlib.figure import Figure

    m, x = net(), torch.randn(1, 3, 64, 64)
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_memory(m, x, ax=ax, merge="6", tiles=2, title="mine") is fig
    assert ax.get_title() == "mine" and len(ax.get_lines()) >= 2


def test_plot_memory_of_a_tiled_module_alone():
    m, x = net(), torch.randn(1, 3, 64, 64)
    gm = tilefx.transform(m, x, merge="6", tiles=(2, 2))
    ax = plot_memory(gm, x).axes[0]
    assert ax.get_lines()[0].get_label().startswith("memory")


def test_plot_tiles_shares_partition_the_image():
    from matplotlib.patches import Rectangle

    m, x = net(), torch.randn(1, 3, 64, 48)
    gm = tilefx.transform(m, x, merge="6", tiles=(3, 2))
    fig = plot_tiles(gm, x)
    ax = fig.axes[0]
    shares = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] == (1, 1, 1)]
    assert len(shares) == 6
    assert sum(p.get_width() * p.get_height() for p in shares) == pytest.approx(64 * 48)
    reads = [p for p in ax.patches if isinstance(p, Rectangle) and p not in shares]
    # every tile reads at least its share (its halo), and the highlighted one is filled
    assert any(p.get_fill() for p in reads)
    assert ax.get_title().startswith("tiled_region_0: 3x2 tiles over a 64x48 input")
    png(fig)


def test_plot_tiles_with_image_and_errors():
    m, x = net(), torch.randn(1, 3, 64, 64)
    gm = tilefx.transform(m, x, merge="6", tiles=2)
    img = torch.rand(3, 64, 64)
    png(plot_tiles(gm, x, image=img, region="tiled_region_0", highlight=(1, 1)))
    with pytest.raises(tilefx.TilingError, match="no region"):
        plot_tiles(gm, x, region="nope")
    with pytest.raises(tilefx.TilingError, match="out of range"):
        plot_tiles(gm, x, region=3)
    with pytest.raises(tilefx.TilingError, match="no tiled region"):
        plot_tiles(torch.fx.symbolic_trace(m), x)


def test_plot_pareto_marks_the_chosen_plan():
    from tilefx.planner import plan

    m, x = net(), torch.randn(1, 3, 96, 96)
    p = plan(tilefx.prepare(m, x), x)
    fig = plot_pareto(p, budget=p.baseline_peak_bytes // 2)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(s.startswith("chosen") for s in labels)
    assert any(s.startswith("untiled") for s in labels)
    assert any(s.startswith("budget") for s in labels)
    assert ax.get_ylabel() == "predicted peak memory (MiB)"
    png(fig)


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    m, x = net(), torch.randn(1, 3, 32, 32)
    gm = tilefx.transform(m, x, merge="6", tiles=2)
    with pytest.raises(ImportError, match=r"pip install 'tilefx\[plot\]'"):
        plot_tiles(gm, x)


class SmallUNet(nn.Module):
    """Two levels: a skip at full resolution read by the decoder after the lower level."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e0 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.e1 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.d0 = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        a = self.e0(x)
        return self.d0(torch.cat([a, self.up(self.e1(a))], 1))


def test_plot_strips_shows_schedule_and_fifos():
    from tilefx.passes.stream_rewrite import stream_rewrite

    m, x = SmallUNet().eval(), torch.randn(1, 3, 64, 32)
    gm = stream_rewrite(tilefx.prepare(m, x), "output", strip=4)
    region = gm.stream_region_0
    rows = region.schedule_for({region.spec.region.inputs[0]: (64, 32)}).rows
    fig = plot_strips(gm, x)
    left, right = fig.axes
    assert left.get_title().startswith("stream_region_0: strips of 4 rows")
    lines = left.get_lines()[:len(region.spec.stored)]
    # every stored node's line ends with all its rows computed
    assert all(line.get_ydata()[-1] == pytest.approx(1.0) for line in lines)
    inner = [n for n in region.spec.stored if n not in region.spec.outputs]
    widths = sorted(p.get_width() for p in right.patches)
    assert max(widths) == max(rows.capacity[n] for n in inner)  # the skip's FIFO, in rows
    png(fig)
    with pytest.raises(tilefx.TilingError, match="no streaming region"):
        plot_strips(tilefx.prepare(m, x), x)
