"""The time model's per-node costs (tilefx.cost) and the planner options built on them.

No test here asserts a duration: timings are the benchmarks' job. These check the invariants
the planner relies on (every computed node has a non-negative cost, the fixed part is at least
the call's dispatch) and that user-fixed grids are honoured.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilefx
from tilefx import planner
from tilefx.cost import Calibration, NodeCost, mac_node_costs, measure_node_costs
from tilefx.passes.memory import record
from tilefx.region import TiledRegion

CAL = Calibration(mac_rate=50e9, call_s=30e-6, pointwise_call_s=5e-6, reorder_s_per_byte=1e-10)


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def _computed(gm):
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


def test_measured_costs_cover_every_node_and_are_non_negative():
    x = torch.randn(1, 3, 96, 64)
    gm = tilefx.prepare(net(), x)
    costs = measure_node_costs(gm, x, CAL)
    assert {n.name for n in _computed(gm)} <= set(costs)
    for name, c in costs.items():
        assert c.fixed_s >= 0 and c.per_pixel_s >= 0, (name, c)
    conv = costs["conv2d"]
    # A convolution's fixed part is at least its dispatch (plus its weight reorder), unless the
    # call was measured faster than that on the whole map or on its smallest window (CAL is
    # not this machine's: its 30 us dispatch can exceed a measured call; the check was flaky).
    largest_window = conv.time(conv.knee_px)
    smallest_window = conv.knots[0][1] if conv.knots else largest_window
    assert conv.fixed_s >= min(CAL.call_s, conv.full_s, smallest_window) - 1e-12
    assert conv.fixed_s <= smallest_window + 1e-12
    # Windows of 1/2, 1/4 and 1/8 of each extent, each no faster than a smaller one.
    assert len(conv.knots) == 3
    assert all(p0 < p1 and t0 <= t1 for (p0, t0), (p1, t1) in zip(conv.knots, conv.knots[1:]))
    assert conv.knots[-1][0] == conv.knee_px
    # Measured on the whole map and on tile-sized windows: the untiled call is the whole map's.
    assert conv.full_px == 96 * 64 and conv.full_s > 0
    assert conv.knee_px < conv.full_px


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d(16), nn.GroupNorm(4, 16)], ids=["instance", "group"])
def test_a_norm_is_timed_on_tile_sized_windows(norm):
    """A multi-pass region applies a norm on every tile once its statistics are known, so the
    norm's cost is per position like a pointwise op's. Timed on the whole map only, it was one
    fixed cost per call, charged in full to every tile of every pass (BasicUNet @1024's
    multi-pass plans predicted at 4-7x the untiled time, measured at 1.2-1.8x)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), norm, nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 128, 128)
    gm = tilefx.prepare(model, x)
    costs = measure_node_costs(gm, x, CAL)
    name = next(n.name for n in gm.graph.nodes if "norm" in n.name)
    c = costs[name]
    assert c.full_px == 128 * 128 and c.knee_px < c.full_px, (name, c)
    assert c.per_pixel_s >= 0 and c.fixed_s <= c.time(c.knee_px)


def test_whole_map_measured_at_a_reduced_shape_for_large_inputs():
    """Above full_max_pixels the whole map is timed at a smaller shape of the same aspect and
    its time scaled to the example's positions."""
    x = torch.randn(1, 3, 160, 160)
    conv_net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    gm = tilefx.prepare(conv_net, x)  # captured with dynamic spatial dims: it runs at 80x80
    costs = measure_node_costs(gm, x, CAL, full_max_pixels=80 * 80)
    assert {n.name for n in _computed(gm)} <= set(costs)
    conv = costs["conv2d"]
    assert conv.per_pixel_s >= 0 and conv.full_px == 160 * 160 and conv.untiled() > 0
    assert conv.knee_px < 80 * 80  # windows of the 80x80 map the whole map was timed at


def test_mac_costs_are_deterministic_and_scale_with_macs():
    x = torch.randn(1, 3, 64, 64)
    gm = tilefx.prepare(net(), x)
    macs = {k: v["macs"] for k, v in record(gm, x).info.items()}
    a, b = mac_node_costs(gm, macs, CAL), mac_node_costs(gm, macs, CAL)
    assert a == b
    # conv2d_2 (16->32 at 32x32) has twice the MACs per position of conv2d_1 (16->16 at 32x32).
    assert a["conv2d_2"].per_pixel_s == pytest.approx(2 * a["conv2d_1"].per_pixel_s)
    assert a["relu"].per_pixel_s == 0.0  # relu: no MACs, only its call


def test_node_cost_time():
    assert NodeCost(1.0, 0.5).time(4) == pytest.approx(3.0)
    assert NodeCost(1.0, 0.5).untiled(4) == pytest.approx(3.0)  # no whole-map measurement
    # Beyond the knee the time runs linearly to the whole map's measured call.
    c = NodeCost(1.0, 0.5, full_s=20.0, full_px=20.0, knee_px=4.0)
    assert c.time(4) == pytest.approx(3.0) and c.time(20) == pytest.approx(20.0)
    assert c.time(12) == pytest.approx(11.5) and c.untiled() == 20.0


def test_unknown_timing_is_a_tiling_error():
    x = torch.randn(1, 3, 64, 64)
    gm = tilefx.prepare(net(), x)
    with pytest.raises(tilefx.TilingError, match="timing="):
        planner.plan(gm, x, calibration=CAL, timing="guess")


def test_tiles_without_merge_fixes_the_grid():
    """transform(model, x, tiles=...) lets the planner choose the merge node only."""
    m, x = net(), torch.randn(2, 3, 64, 48)
    gm = tilefx.transform(m, x, tiles=(2, 3))
    regions = [r for r in gm.modules() if isinstance(r, TiledRegion)]
    assert regions and all(r.grid == (2, 3) for r in regions)
    with torch.no_grad():
        # float32: tiles sum each convolution in another order; three layers stay near 1e-6.
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiles", [0, (2,), (2, 2, 2), (2.5, 2), True])
def test_bad_tiles_are_a_tiling_error(tiles):
    with pytest.raises(tilefx.TilingError, match="tiles="):
        tilefx.transform(net(), torch.randn(1, 3, 64, 64), tiles=tiles)


def test_weights_are_read_from_memory_only_where_the_loop_holds_more_than_the_cache():
    from tilefx.cost import last_level_cache_bytes, weight_reread_s

    cal = Calibration(mac_rate=50e9, call_s=30e-6, pointwise_call_s=5e-6, reorder_s_per_byte=1e-10,
                      cold_weight_s_per_byte=2e-11, cache_bytes=1 << 20)
    assert weight_reread_s(cal, 1000, 1 << 20) == 0.0            # the loop's weights fit
    assert weight_reread_s(cal, 1000, (1 << 20) + 1) == pytest.approx(2e-8)
    assert last_level_cache_bytes() > 0


@pytest.mark.parametrize("strip", [None, 4])
def test_a_loop_over_more_weights_than_the_cache_pays_for_reading_them_each_call(strip):
    """VGG-16 @224 on 7x7 tiles: each tile calls every 512-channel layer again after the others
    have evicted its 9 MiB of weights, 0.3 ms more per call than the window timings (taken
    back to back, weights in cache) say; the model predicted the plan 40% faster than it ran.
    The charge is the weights' bytes times the calibrated cold rate, per tile and layer."""
    from dataclasses import replace

    from tilefx.capture import as_inputs
    from tilefx.plan_model import StaticModel, tile_cost
    from tilefx.stream_plan import stream_cost

    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = tilefx.prepare(model, x)
    w = 64 * 64 * 9 * 4 + 64 * 3 * 9 * 4  # the two convolutions' weight bytes
    hot = replace(CAL, cold_weight_s_per_byte=1e-9, cache_bytes=w)   # they fit: no charge
    cold = replace(hot, cache_bytes=w - 1)

    def extra(cal):
        sm = StaticModel(gm, as_inputs(x), cal, "macs")
        a, b = sm.boundaries[0], sm.boundaries[-1]
        seg = sm.segment(a, b)
        if strip is None:
            return tile_cost(sm, seg, (2, 2)).extra_time_s, 4
        c = stream_cost(sm, seg, strip)
        return c.extra_time_s, c.strips

    (t_hot, _), (t_cold, calls) = extra(hot), extra(cold)
    # Every call of both layers reads its weights again (the whole-map call was already cold):
    # once per tile; once per strip a layer computes rows in (the strips of the schedule, less
    # the warm-up strips where a layer has no new rows yet).
    per_call = w * 1e-9
    if strip is None:
        assert t_cold - t_hot == pytest.approx(per_call * calls, rel=1e-6)
    else:
        assert per_call * (calls - 3) <= t_cold - t_hot <= per_call * calls


def test_a_strip_pays_the_fixed_part_fitted_on_small_windows():
    """A strip of a small map is a small window: it loses the kernel efficiency the fitted
    fixed part of a node's cost holds, as a tile does. The strip model charged only the call's
    dispatch (the fixed part clamped to the calibrated call) and predicted DenseNet-121 @224
    streamed in 4-row strips 40% faster than it ran."""
    from dataclasses import replace

    from tilefx.capture import as_inputs
    from tilefx.plan_model import StaticModel
    from tilefx.stream_plan import stream_cost

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = tilefx.prepare(model, x)
    sm = StaticModel(gm, as_inputs(x), CAL, "macs")
    convs = [n.name for n in gm.graph.nodes if "conv" in n.name]
    costs = {k: replace(c, fixed_s=1e-3) if k in convs else c for k, c in sm.costs.items()}
    slow = StaticModel(gm, as_inputs(x), CAL, "macs", costs=costs)
    a, b = slow.boundaries[0], slow.boundaries[-1]
    fast_s = stream_cost(sm, sm.segment(a, b), 4).extra_time_s
    slow_s = stream_cost(slow, slow.segment(a, b), 4).extra_time_s
    # each convolution runs once per strip it computes rows in (8 at least), less its one
    # whole-map call: at least 7 more of the 1 ms fixed part each
    assert slow_s - fast_s >= 2 * 7 * (1e-3 - CAL.call_s)


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (8, 8)])
def test_a_tile_pays_the_time_measured_at_its_window_size(grid):
    """Windows are timed at 1/2, 1/4 and 1/8 of each extent and a call between two of them
    costs what the line between them says. Fitted through 1/2 and 1/4 of the map (at least 16
    positions a side) and extrapolated, ResNet-50 @224's layer3 on 4x4 windows of a 7x7 grid
    was predicted at 29 ms of convolutions over 49 tiles, measured 52 ms (oneDNN loses more on
    a small window than a line through larger ones says)."""
    from dataclasses import replace

    import numpy as np

    from tilefx.capture import as_inputs
    from tilefx.cost import NodeCost
    from tilefx.plan_model import StaticModel, _body, tile_cost

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = tilefx.prepare(model, x)
    sm = StaticModel(gm, as_inputs(x), CAL, "macs")
    # Small windows lose efficiency: 200 us on 64 positions (8x8), 400 us on 256, 1 ms on 1024,
    # 2 ms on the whole map.
    curve = NodeCost(1e-5, (2e-4 - 1e-5) / 64, full_s=2e-3, full_px=4096.0, knee_px=1024,
                     knots=((64, 2e-4), (256, 4e-4), (1024, 1e-3)))
    costs = {k: curve if "conv" in k else c for k, c in sm.costs.items()}
    priced = StaticModel(gm, as_inputs(x), CAL, "macs", costs=costs)
    a, b = priced.boundaries[0], priced.boundaries[-1]
    seg = priced.segment(a, b)
    body = _body(priced, seg)
    px = np.array([[1.0, 64.0, 100.0, 256.0, 600.0, 1024.0, 2000.0, 4096.0]] * len(seg.nodes))
    want = np.array([[priced.cost(n).time(p) for p in row] for n, row in zip(seg.nodes, px)])
    np.testing.assert_allclose(body.window_time(px), want, rtol=1e-12)
    conv = [i for i, n in enumerate(seg.nodes) if "conv" in n.name]
    # between the measured windows, not on the line through the two smallest
    assert body.window_time(px)[conv[0], 4] == pytest.approx(4e-4 + 6e-4 * (600 - 256) / 768)
    # the line through the two smallest windows, extrapolated, is dearer on larger windows
    line = replace(curve, knots=())
    flat = StaticModel(gm, as_inputs(x), CAL, "macs",
                       costs={k: line if "conv" in k else c for k, c in sm.costs.items()})
    t_knots = tile_cost(priced, seg, grid).extra_time_s
    t_line = tile_cost(flat, flat.segment(a, b), grid).extra_time_s
    if grid == (8, 8):  # 8x8 windows (and halos) lie on the line
        assert t_knots == pytest.approx(t_line, rel=0.2)
    else:
        assert t_knots < 0.8 * t_line
