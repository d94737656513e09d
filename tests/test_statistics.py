"""Multi-pass regions: group norm, instance norm and squeeze-and-excitation tiled exactly.

Every test compares with the eager model. Tolerances: float32 outputs within 1e-4 (absolute
and relative; the statistics are the same sums in another order, and a norm divides by a
standard deviation that can be small, so rounding can grow by the norm's gain); float64 within
1e-10; float16 and bfloat16 within their own eager rounding against a float32 reference (the
statistics are accumulated in float32 either way, so tiling must not make them worse than
eager).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilefx
import tilefx.measure
from tilefx.errors import TilingError
from tilefx.passes.regions import find_region
from tilefx.passes.tile_rewrite import tile_rewrite
from tilefx.statistics import Accumulator, Statistic

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


class NormNet(nn.Module):
    """Convolutions with a group norm, an instance norm (affine and not), and an SE gate."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.gn = nn.GroupNorm(2, c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(c)
        self.c3 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.inorm_affine = nn.InstanceNorm2d(c, affine=True)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.gn(self.c1(x)))
        y = torch.relu(self.inorm(self.c2(y)))
        y = self.inorm_affine(self.c3(y))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * gate)


def bright_and_dark(shape=(1, 3, 64, 64)) -> torch.Tensor:
    """A bright top half and a dark, flat bottom half: tiles with very different statistics."""
    x = torch.randn(shape)
    h = shape[-2] // 2
    x[..., :h, :] = x[..., :h, :] * 3 + 10
    x[..., h:, :] = x[..., h:, :] * 0.1 - 2
    return x


def _model(dtype=torch.float32) -> nn.Module:
    m = NormNet().eval().to(dtype)
    with torch.no_grad():  # norms with a non-trivial affine, so a wrong statistic shows
        for p in m.inorm_affine.parameters():
            p.uniform_(0.5, 1.5)
        for p in m.gn.parameters():
            p.uniform_(0.5, 1.5)
    return m


def _output(gm):
    return next(n for n in gm.graph.nodes if n.op == "output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiles", [2, 3, (4, 2)])
def test_multipass_region_matches_eager(dtype, tiles):
    m, x = _model(dtype), bright_and_dark().to(dtype)
    gm = tilefx.prepare(m, x)
    tiled = tile_rewrite(gm, _output(gm), tiles, multipass=True)
    passes = [n.target for n in tiled.graph.nodes if n.op == "call_module"
              and n.target.startswith("tiled_region")]
    assert len(passes) == 5, passes  # three norms, the SE mean, then the outputs
    torch.testing.assert_close(tiled(x), m(x), **TOL[dtype])


def test_between_tile_term_is_what_makes_it_exact():
    """The test input separates Chan's combination from averaging per-tile variances: the
    naive combination moves the output by far more than the tolerance."""
    x = bright_and_dark()
    halves = (x[..., :32, :], x[..., 32:, :])
    acc = Accumulator(Statistic("moments", groups=1, eps=1e-5), nsp=2)
    for h in halves:
        acc.add(h)
    var, mean = torch.var_mean(x.view(1, 1, -1), dim=-1, correction=0)
    torch.testing.assert_close(acc.result()[..., 1], (var + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    naive = sum(torch.var(h, correction=0) for h in halves) / 2  # drops sum n_i (mu_i - mu)^2
    assert abs(naive - var.item()) / var.item() > 0.5


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_moments_of_a_piece_in_bands_are_exact(monkeypatch, groups):
    """A piece goes through the moments kernel in bands of rows (ATen's group norm kernel,
    which ``torch.var_mean`` ran 15x slower than): bands of a bright and a dark piece, a
    constant group (variance 0: eps alone) and a strided view all give the float64 moments of
    the whole map."""
    import tilefx.statistics as st

    monkeypatch.setattr(st, "MOMENTS_BAND_ELEMENTS", 5 * 64)  # 5 rows of a 16-column piece
    x = bright_and_dark((1, 4, 64, 64))
    x[:, 3] = 7.0  # a constant channel: one group of its own when groups == 4
    wide = torch.nn.functional.pad(x, (1, 1, 1, 1))
    acc = Accumulator(Statistic("moments", groups=groups, eps=1e-5), nsp=2)
    for rows in (slice(0, 29), slice(29, 64)):
        for cols in (slice(0, 16), slice(16, 64)):
            r0, c0 = rows.start + 1, cols.start + 1
            acc.add(wide[..., r0:rows.stop + 1, c0:cols.stop + 1])  # views, as tiles own them
    ref = x.double().view(1, groups, -1)
    var, mean = torch.var_mean(ref, dim=-1, correction=0)
    torch.testing.assert_close(acc.result()[..., 0], mean.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(acc.result()[..., 1], (var + 1e-5).rsqrt().float(), rtol=1e-5, atol=0)


def test_the_end_to_end_check_fails_without_the_between_tile_term(monkeypatch):
    """The bright/dark input makes the multi-pass check sensitive to the combination: with
    per-tile variances merely pooled (the between-tile term dropped, as tiled-VAE tools do),
    the tiled output leaves the tolerance by far."""
    import tilefx.statistics as st

    m, x = _model(), bright_and_dark()
    gm = tilefx.prepare(m, x)
    tiled = tile_rewrite(gm, _output(gm), 2, multipass=True)
    torch.testing.assert_close(tiled(x), m(x), **TOL[torch.float32])

    def pooled(na, mean_a, m2_a, nb, mean_b, m2_b):
        n = na + nb
        return n, (mean_a * na + mean_b * nb) / n, m2_a + m2_b

    monkeypatch.setattr(st, "combine_moments", pooled)
    err = (tiled(x) - m(x)).abs().max().item()
    assert err > 100 * TOL[torch.float32]["atol"], err


def test_regions_stop_at_statistics_unless_multipass():
    m, x = _model(), bright_and_dark()
    gm = tilefx.prepare(m, x)
    single = find_region(gm, [_output(gm)])
    multi = find_region(gm, [_output(gm)], multipass=True)
    assert len(single.phases) == 1 and not single.phases[0].statistics
    assert len(multi.nodes) > len(single.nodes)
    assert [len(p.statistics) for p in multi.phases] == [1, 1, 1, 1, 0]
    assert {s.name for p in multi.phases for s, _ in p.statistics} >= {"group_norm", "mean"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_statistics_no_worse_than_eager(dtype):
    m, x = _model(), bright_and_dark()
    want = m(x)
    low = _model().to(dtype)
    low.load_state_dict({k: v.to(dtype) for k, v in m.state_dict().items()})
    gm = tilefx.prepare(low, x.to(dtype))
    tiled = tile_rewrite(gm, _output(gm), 3, multipass=True)
    eager_err = (low(x.to(dtype)).float() - want).abs().max().item()
    tiled_err = (tiled(x.to(dtype)).float() - want).abs().max().item()
    assert tiled_err <= 2 * eager_err + 1e-3, (tiled_err, eager_err)


def test_global_pool_at_the_region_end_is_reduced_not_assembled():
    """A classifier's global pooling ends the region: its input is accumulated in the last
    pass, never assembled full-size."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 4)).eval()
    x = bright_and_dark()
    gm = tilefx.prepare(m, x)
    flatten = next(n for n in gm.graph.nodes if n.op == "call_function" and "view" in str(n.target)
                   or "flatten" in str(n.target))
    tiled = tile_rewrite(gm, flatten, 4, multipass=True)
    region = next(mod for name, mod in tiled.named_children() if name.startswith("tiled_region"))
    assert region.writes == () and [s for s, _ in region.statistics] == ["adaptive_avg_pool2d"]
    torch.testing.assert_close(tiled(x), m(x), **TOL[torch.float32])


def test_transform_with_merge_goes_through_statistics():
    m, x = _model(), bright_and_dark()
    gm = tilefx.transform(m, x, merge=_output(tilefx.prepare(m, x)).name, tiles=2)
    assert gm.meta["tilefx_plan"].regions[0].multipass
    torch.testing.assert_close(gm(x), m(x), **TOL[torch.float32])


def test_planner_tiles_a_group_norm_network_exactly():
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.SiLU(),
                      nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.SiLU(),
                      nn.Conv2d(32, 3, 3, padding=1)).eval()
    x = bright_and_dark((1, 3, 256, 256))
    untiled = tilefx.plan(m, x, max_overhead=0.0)
    p = tilefx.plan(m, x, memory_budget=untiled.baseline_peak_bytes // 2)
    assert p.regions and p.regions[-1].multipass
    gm = tilefx.transform(m, x, plan=p)
    torch.testing.assert_close(gm(x), m(x), **TOL[torch.float32])
    measured = tilefx.measure.peak_memory(gm, x)
    assert measured < tilefx.measure.peak_memory(m, x)


def test_approximate_mode_refuses_statistics():
    m, x = _model(), bright_and_dark()
    gm = tilefx.prepare(m, x)
    with pytest.raises(TilingError, match="halo=True"):
        tile_rewrite(gm, _output(gm), 2, halo=False, multipass=True)


def test_multipass_region_runs_at_another_shape():
    m = _model()
    x = bright_and_dark()
    gm = tilefx.prepare(m, x)
    tiled = tile_rewrite(gm, _output(gm), 2, multipass=True)
    for shape in ((1, 3, 48, 80), (2, 3, 64, 64)):  # statistics take their shape from the tiles
        y = bright_and_dark(shape)
        torch.testing.assert_close(tiled(y), m(y), **TOL[torch.float32])


def test_explain_shows_the_passes_and_their_statistics():
    m, x = _model(), bright_and_dark()
    gm = tilefx.transform(m, x, merge=_output(tilefx.prepare(m, x)).name, tiles=2)
    text = tilefx.explain(gm, file=None)
    assert text.count("finds exactly:") == 4
    assert "group_norm: mean and variance over space per sample and group (2 groups)" in text
    assert "mean: mean over space" in text
    assert "a pass that finds statistics" in text


class LayerNormNet(nn.Module):
    """Layer norms over the whole map: over channels and space (one group per sample), then
    over space alone (per sample and channel), as ``F.layer_norm(x, x.shape[1:])`` writes it."""

    def __init__(self, affine: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.ln = nn.LayerNorm([8, 64, 64], elementwise_affine=affine)

    def forward(self, x):
        y = self.ln(self.c1(x))
        y = torch.relu(nn.functional.layer_norm(y, y.shape[2:]))
        return self.c2(y)


@pytest.mark.parametrize("tiles", [2, (3, 2)])
def test_a_layer_norm_over_space_is_tiled_exactly(tiles):
    """Its statistics are a group norm's (one group, or one per channel), found in passes; the
    bright/dark input fails any combination that drops the between-tile term."""
    m, x = LayerNormNet().eval(), bright_and_dark()
    gm = tilefx.prepare(m, x)
    stats = [n.meta["tilefx"].rule.statistic for n in gm.graph.nodes if "layer_norm" in n.name]
    assert [s.groups for s in stats] == [1, 8]
    tiled = tile_rewrite(gm, _output(gm), tiles, multipass=True)
    passes = [n for n in tiled.graph.nodes if n.op == "call_module" and n.target.startswith("tiled_region")]
    assert len(passes) == 3  # two statistics passes, then the outputs
    torch.testing.assert_close(tiled(x), m(x), **TOL[torch.float32])


def test_a_layer_norm_with_an_affine_over_positions_stays_a_barrier():
    m, x = LayerNormNet(affine=True).eval(), bright_and_dark()
    gm = tilefx.prepare(m, x)
    ln = next(n for n in gm.graph.nodes if "layer_norm" in n.name)
    rule = ln.meta["tilefx"].rule
    assert rule.statistic is None and "elementwise_affine=False" in rule.reason
    # and the planner still gives the exact model
    torch.testing.assert_close(tilefx.transform(m, x)(x), m(x), **TOL[torch.float32])
