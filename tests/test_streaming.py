"""Streaming regions: strips along the first spatial axis, every row once, row buffers sized
from the schedule (tilefx.streaming, tilefx.stream_region, passes.stream_rewrite).

Every streamed output is compared with eager: float64 at ``TIGHT`` (strips run the same kernels
on the same rows; only a convolution's summation order may change with the window's shape), and
float32 with the stated tolerances. The row-buffer sizes of small graphs are pinned to numbers
derived by hand in the comments.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefx
from tilefx.errors import TilingError
from tilefx.measure import peak_memory
from tilefx.passes.memory import simulate
from tilefx.passes.stream_rewrite import stream_rewrite
from tilefx.stream_kernels import NEW_SUFFIX
from tilefx.stream_region import StreamRegion
from tilefx.streaming import strip_rows
from tilefx.tiling import propagate_axis
from conftest import FLOAT32, TIGHT, assert_same_outputs
from test_rewrite import CASES, Head


def streamed(gm, merge="output", strip=4, **kw):
    return stream_rewrite(gm, merge, strip, **kw)


def region_of(gm) -> StreamRegion:
    (r,) = [m for m in gm.modules() if isinstance(m, StreamRegion)]
    return r


def schedule(gm, shape):
    r = region_of(gm)
    return r.schedule_for({r.spec.region.inputs[0]: tuple(shape[2:])})


def assert_every_row_once(gm, shape):
    """Each node computes contiguous, disjoint rows whose union is exactly what the whole
    region needs of it (the untiled rows its outputs read: trailing rows no reader needs, as
    behind a stride-3 convolution, are not computed at all)."""
    r = region_of(gm)
    rows = schedule(gm, shape).rows
    h0 = {k: v[0] for k, v in rows.sizes.items()}
    need = propagate_axis(r.spec.nodes, {o: (0, h0[o]) for o in r.spec.outputs}, h0, 0).need
    for rn in r.spec.nodes:
        spans = [new[rn.name] for new in rows.new if rn.name in new]
        assert all(a < b for a, b in spans)
        assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)), rn.name
        assert (spans[0][0], spans[-1][1]) == need[rn.name], rn.name


def rows_computed_at_run_time(gm, x) -> Counter:
    """Run the region's stage bodies through an fx Interpreter and add up, per original node,
    the rows along the stream axis of every value its op produced."""
    r = region_of(gm)
    sched = r.schedule_for(r.input_sizes((x,)))
    nsp = r.spec.nsp
    names = {rn.name for rn in r.spec.nodes}
    count: Counter = Counter()

    class Watch(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor):
                count[n.name] += out.shape[out.dim() - nsp]
            return out

    state = {r.spec.region.inputs[0]: x}
    with torch.no_grad():
        for strip in sched.strips:
            for k in strip.stages:
                Watch(r.stages[k]).run(x, state, strip)
    return count


# --------------------------------------------------------------------------- the op table

#: A slice of test_rewrite's cases covering each kind of op the rule table emits: convolutions
#: (1-3d, stride, dilation, groups, same/valid, reflect/replicate), pooling (ceil mode,
#: dilation, average divisors), transposed convolution, pads, resampling, pixel shuffle.
STREAM_CASES = ["conv1d_stride_dilation_same_valid_groups", "conv2d_stride_dilation_groups",
                "conv2d_reflect", "conv2d_replicate", "conv3d", "maxpool_ceil_dilation",
                "functional_pools", "convtranspose2d", "pad_modules", "nearest_1_5",
                "bilinear_align_true", "bilinear_1_5", "pixel_shuffle"]


@pytest.mark.parametrize("case", STREAM_CASES)
def test_op_cases_exact_in_float64(case):
    factory, shape, _ = CASES[case]
    model = factory().eval().double()
    x = torch.randn(shape, dtype=torch.float64)
    gm = tilefx.prepare(model, x)
    want = model(x)
    for strip in (1, 3):
        s = streamed(gm, strip=strip)
        with torch.no_grad():
            torch.testing.assert_close(s(x), want, **TIGHT)
        assert_every_row_once(s, shape)


def test_avg_pool_divisors_exact():
    model = Head(nn.Conv2d(2, 3, 3, padding=1),
                 nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                 nn.AvgPool2d(3, 1, 1, divisor_override=4), nn.AvgPool2d(2)).eval().double()
    x = torch.randn(1, 2, 23, 18, dtype=torch.float64)
    s = streamed(tilefx.prepare(model, x), strip=2)
    torch.testing.assert_close(s(x), model(x), **TIGHT)


# --------------------------------------------------------------------------- row buffers


def chain(*layers):
    return Head(*layers).eval().double()


def test_conv_chain_keeps_k_minus_s_rows():
    """Three 3x3 convolutions, strips of h=4 rows: after strip j the output has e = 4(j+1)
    rows and the second conv e+1; the next strip reads it from row e-1, so 2 rows are stored
    (k - s = 2) and its ring holds those 2 and the 2 stored by the next strip, whatever the
    strip height (the rest of a strip's new rows are read from its value, in the strip)."""
    model = chain(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                  nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 3, 32, 16, dtype=torch.float64)
    s = streamed(tilefx.prepare(model, x), strip=4)
    torch.testing.assert_close(s(x), model(x), **TIGHT)
    rows = schedule(s, x.shape).rows
    inner = [n for n in region_of(s).spec.stored if n not in region_of(s).spec.outputs]
    assert len(inner) == 2
    assert [rows.carried[n] for n in inner] == [2, 2]
    assert [rows.capacity[n] for n in inner] == [4, 4]
    assert_every_row_once(s, x.shape)
    assert rows_computed_at_run_time(s, x) == Counter({rn.name: 32 for rn in region_of(s).spec.nodes})


def test_strided_and_dilated_buffers():
    """A 3x3 stride-2 convolution reads input rows [2a-1, 2b) for output rows [a, b): the next
    strip starts at 2b-1, one row back (k - s = 1). A 3x3 convolution with dilation 2 reads
    [a-2, b+2): 4 rows carried ((k - s) * d)."""
    model = chain(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                  nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    x = torch.randn(1, 3, 64, 8, dtype=torch.float64)
    s = streamed(tilefx.prepare(model, x), strip=2, min_rows=1)  # every map: 1 or 2 rows a strip
    torch.testing.assert_close(s(x), model(x), **TIGHT)
    spec = region_of(s).spec
    rows = schedule(s, x.shape).rows
    first, strided = spec.stored[0], spec.stored[1]
    assert rows.carried[first] == 1 and rows.carried[strided] == 4
    assert_every_row_once(s, x.shape)


class TwoLevelUNet(nn.Module):
    """e0 = conv(x) at full resolution; e1 = conv(maxpool(e0)) at half; the decoder
    upsamples e1 (nearest) and reads cat(e0, up) through a 3x3 convolution."""

    def __init__(self, up: str = "nearest"):
        super().__init__()
        self.e0 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.e1 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.up = (nn.Upsample(scale_factor=2) if up == "nearest" else
                   nn.ConvTranspose2d(4, 4, 2, stride=2))
        self.d0 = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        e0 = self.e0(x)
        return self.d0(torch.cat([e0, self.up(self.e1(e0))], 1))


def test_two_level_unet_skip_fifo_by_hand():
    """Strips of h=4 output rows; after strip j the output has e = 4(j+1) rows.
    d0 (3x3) needs cat rows [0, e+1), so the cat reads e0 rows [e-3, e+1) in strip j.
    The nearest x2 upsampling of e1 reads e1 rows up to floor(e/2)+1, plus one row each side
    for ATen's rounding: e1 needs [0, e/2+2); its 3x3 conv needs pool rows [0, e/2+3); the
    2x2 max pool needs e0 rows [0, e+6). So e0 runs 5 rows ahead of the cat's next read
    (e+6 vs e+1): the skip FIFO carries 5 rows from strip to strip; every new row is stored
    (the cat reads it in a later strip), so its ring holds 5 + 4 rows (of 48)."""
    model = TwoLevelUNet().eval().double()
    x = torch.randn(1, 3, 48, 12, dtype=torch.float64)
    s = streamed(tilefx.prepare(model, x), strip=4, min_rows=1)  # e1 advances 2 rows a strip
    torch.testing.assert_close(s(x), model(x), **TIGHT)
    spec = region_of(s).spec
    rows = schedule(s, x.shape).rows
    e0 = next(n for n in spec.stored if rows.sizes[n][0] == 48 and n not in spec.outputs
              and any(c.name.startswith("cat") for c in spec.nodes
                      if n in c.sources))
    assert rows.carried[e0] == 5
    assert rows.capacity[e0] == 9
    assert_every_row_once(s, x.shape)


def test_small_maps_compute_min_rows_per_call():
    """With strips of 2 rows of the full map, a map at a quarter of its height advances half a
    row per strip: with min_rows=4 its stage runs every 8 strips, 4 rows at a time (16 calls
    down to 5)."""
    model = chain(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                  nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 3, 64, 8, dtype=torch.float64)
    gm = tilefx.prepare(model, x)
    calls = {}
    for q in (1, 4):
        s = streamed(gm, strip=2, min_rows=q)
        torch.testing.assert_close(s(x), model(x), **TIGHT)
        rows = schedule(s, x.shape).rows
        last = region_of(s).spec.outputs[0]
        sizes = [b - a for new in rows.new for n, (a, b) in new.items() if n == last]
        calls[q] = len(sizes)
        assert sum(sizes) == 16 and max(sizes) == max(q, 1)
    assert calls[1] == 16 and calls[4] <= 5  # the first call computes the lead of one row


@pytest.mark.parametrize("up", ["nearest", "transposed"])
@pytest.mark.parametrize("strip", [2, 5, 32])
def test_two_level_unet_exact(up, strip):
    model = TwoLevelUNet(up).eval().double()
    x = torch.randn(2, 3, 32, 20, dtype=torch.float64)
    s = streamed(tilefx.prepare(model, x), strip=strip)
    torch.testing.assert_close(s(x), model(x), **TIGHT)
    assert rows_computed_at_run_time(s, x) == Counter(schedule(s, x.shape).computed())
    assert_every_row_once(s, x.shape)


class ThreeLevelUNet(nn.Module):
    def __init__(self):
        super().__init__()
        c = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.e0, self.e1, self.e2 = c(3, 4), c(4, 8), c(8, 8)
        self.u1 = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.d1 = c(16, 4)
        self.d0 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.e0(x)
        b = self.e1(F.max_pool2d(a, 2))
        c = self.e2(F.max_pool2d(b, 2))
        b2 = self.d1(torch.cat([b, self.u1(c)], 1))
        up = F.interpolate(b2, scale_factor=2, mode="bilinear", align_corners=False)
        return self.d0(torch.cat([a, up], 1))


def _bn_stats(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("strip", [2, 7])
def test_three_level_unet_bn_bilinear_transposed(strip):
    model = _bn_stats(ThreeLevelUNet()).eval().double()
    x = torch.randn(1, 3, 64, 24, dtype=torch.float64)
    s = streamed(tilefx.prepare(model, x), strip=strip)
    torch.testing.assert_close(s(x), model(x), **TIGHT)
    assert_every_row_once(s, x.shape)
    rows = schedule(s, x.shape).rows
    spec = region_of(s).spec
    # The FIFOs are far smaller than the maps they buffer: rows in flight, not whole tensors.
    full_res = [n for n in spec.stored if n not in spec.outputs and rows.sizes[n][0] == 64]
    assert full_res and all(rows.capacity[n] < 64 for n in full_res)


# --------------------------------------------------------------------------- real networks


def test_resnet18_trunk_float32():
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 128, 64)
    gm = tilefx.prepare(model, x)
    s = streamed(gm, merge="avgpool", strip=1)
    # float32 through 20 convolutions: conftest's zoo tolerance (rtol 1e-4 of the logits' scale)
    assert_same_outputs(s, model, x)
    x2 = torch.randn(2, 3, 64, 96)  # another shape: a new schedule, same module
    assert_same_outputs(s, model, x2)
    rows = schedule(s, x.shape).rows
    # No FIFO in a ResNet (residuals are two convolutions long): a 3x3's 2 rows, or a block
    # input held for its two convolutions, plus a call of min_rows=4 rows on the small maps.
    assert max(rows.carried.values()) <= 2 + 4


def test_monai_basic_unet_batch_norm():
    monai = pytest.importorskip("monai")
    model = _bn_stats(monai.networks.nets.BasicUNet(
        spatial_dims=2, in_channels=3, out_channels=2, norm="batch")).eval()
    x = torch.randn(1, 3, 48, 32)
    gm = tilefx.prepare(model, x)
    s = streamed(gm, strip=8)
    assert_same_outputs(s, model, x)
    spec = region_of(s).spec
    assert len(spec.nodes) == sum(1 for n in gm.graph.nodes
                                  if n.op == "call_function" and n.meta["tilefx"].spatial)
    assert_every_row_once(s, x.shape)


def test_smp_unet_resnet34():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("resnet34", encoder_weights=None, classes=2).eval()
    x = torch.randn(1, 3, 64, 64)
    s = streamed(tilefx.prepare(model, x), strip=16)
    assert_same_outputs(s, model, x)


# --------------------------------------------------------------------------- interop


def tiny_unet(dtype=torch.float32):
    torch.manual_seed(0)
    return TwoLevelUNet("transposed").eval().to(dtype)


def test_other_input_shapes():
    model = tiny_unet()
    x = torch.randn(1, 3, 32, 24)
    s = streamed(tilefx.prepare(model, x), strip=3)
    for shape in [(1, 3, 32, 24), (2, 3, 20, 40), (1, 3, 66, 10)]:
        y = torch.randn(shape)
        torch.testing.assert_close(s(y), model(y), **FLOAT32)
    assert len(region_of(s)._schedules) == 3


def test_save_load_keeps_kernels_leaves_and_drops_schedules():
    model = tiny_unet()
    x = torch.randn(1, 3, 32, 24)
    s = streamed(tilefx.prepare(model, x), strip=3)
    s(x)
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert region_of(loaded)._schedules == {}
    torch.testing.assert_close(loaded(x), model(x), **FLOAT32)
    y = torch.randn(2, 3, 24, 40)
    torch.testing.assert_close(loaded(y), model(y), **FLOAT32)


def test_torch_compile_aot_eager():
    import torch._dynamo

    model = chain(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(4, 4, 3, padding=1)).float()
    x = torch.randn(1, 3, 16, 12)
    s = streamed(tilefx.prepare(model, x), strip=4)
    torch._dynamo.reset()
    compiled = torch.compile(s, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **FLOAT32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(s)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


# float16/bfloat16: the same rounding as test_interop's tiles (a window's convolution may sum in
# another order than the whole map's; one or two units in the last place at the outputs' scale).
LOW = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision(dtype):
    model = tiny_unet(dtype)
    x = torch.randn(1, 3, 32, 24, dtype=dtype)
    s = streamed(tilefx.prepare(model, x), strip=4)
    torch.testing.assert_close(s(x), model(x), **LOW[dtype])


def test_channels_last_stays_channels_last():
    model = tiny_unet().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 24).contiguous(memory_format=torch.channels_last)
    s = streamed(tilefx.prepare(model, x), strip=4)
    y, want = s(x), model(x)
    torch.testing.assert_close(y, want, **FLOAT32)
    assert y.is_contiguous(memory_format=torch.channels_last) == \
        want.is_contiguous(memory_format=torch.channels_last)


def test_weights_shared_and_input_graph_untouched():
    model = tiny_unet()
    x = torch.randn(1, 3, 32, 24)
    gm = tilefx.prepare(model, x)
    code = gm.code
    s = streamed(gm, strip=4)
    assert gm.code == code
    s.graph.lint()
    params = {p.data_ptr() for p in model.parameters()}
    body_params = {p.data_ptr() for p in region_of(s).parameters()}
    assert body_params and body_params <= params


def test_row_buffers_allocated_once_and_no_cat_per_strip():
    """Each stored node's storage is created at its first write and reused by every later
    strip; reads and writes never concatenate; the new rows kept for a strip's readers are
    dropped within the strip."""
    model = chain(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                  nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 3, 40, 12, dtype=torch.float64)
    s = streamed(tilefx.prepare(model, x), strip=2)
    r = region_of(s)
    sched = r.schedule_for(r.input_sizes((x,)))

    class Recording(dict):
        sets: Counter = Counter()

        def __setitem__(self, k, v):
            self.sets[k] += 1
            super().__setitem__(k, v)

    state = Recording({r.spec.region.inputs[0]: x})
    from torch.profiler import profile
    with torch.no_grad(), profile() as prof:
        for strip in sched.strips:
            for k in strip.stages:
                r.stages[k](x, state, strip)
    assert len(sched.strips) > 10
    stored = {k: v for k, v in state.sets.items() if not k.endswith(NEW_SUFFIX)}
    assert set(stored) == set(r.spec.stored) and set(stored.values()) == {1}
    # a strip's new rows are kept for its readers only, and dropped by the last of them
    assert not any(k.endswith(NEW_SUFFIX) for k in state)
    for n in r.spec.stored:
        assert state[n].shape[2] == sched.capacity[n]
    assert not any(e.name == "aten::cat" for e in prof.events())
    torch.testing.assert_close(state[r.spec.outputs[0]], model(x), **TIGHT)


# --------------------------------------------------------------------------- refusals


def test_channel_split_is_refused_naming_the_node():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.out = nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x):
            a, b = self.conv(x).chunk(2, dim=1)
            return self.out(a * torch.sigmoid(b))

    x = torch.randn(1, 3, 16, 16)
    gm = tilefx.prepare(Split().eval(), x)
    with pytest.raises(TilingError, match="cannot stream node .*getitem"):
        streamed(gm)


@pytest.mark.parametrize("strip", [0, -2, 1.5, True])
def test_bad_strip_height(strip):
    model = chain(nn.Conv2d(3, 4, 3, padding=1)).float()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TilingError, match="strip height"):
        streamed(tilefx.prepare(model, x), strip=strip)


def test_norm_over_space_is_not_streamed():
    """A group norm is a barrier to a (single-pass) region: streaming ends before it, and the
    planner offers no streaming option for the multi-pass region through it."""
    model = Head(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    gm = tilefx.prepare(model, x)
    s = streamed(gm, strip=4)
    assert not any("group_norm" in rn.name for rn in region_of(s).spec.nodes)
    torch.testing.assert_close(s(x), model(x), **FLOAT32)


# --------------------------------------------------------------------------- memory model


def test_simulate_and_static_model_predict_measured_peak():
    from tilefx.capture import as_inputs
    from tilefx.cost import calibrate
    from tilefx.plan_model import StaticModel
    from tilefx.stream_plan import stream_cost

    model = _bn_stats(ThreeLevelUNet()).eval()
    x = torch.randn(1, 3, 128, 64)
    gm = tilefx.prepare(model, x)
    sm = StaticModel(gm, as_inputs(x), calibrate(), "macs")
    a, b = sm.boundaries[0], sm.boundaries[-1]  # the whole network is one region
    assert b.position == len(sm.nodes) - 1
    seg = sm.segment(a, b)
    rest, at, _ = sm.span_peaks(seg, a, b)
    for strip in (4, 32):
        s = streamed(gm, strip=strip)
        measured = peak_memory(s, x)
        simulated = simulate(s, x).peak_bytes
        static = max(rest, at + stream_cost(sm, seg, strip).peak_bytes)
        assert abs(simulated - measured) <= 0.10 * measured, (strip, simulated, measured)
        assert abs(static - measured) <= 0.10 * measured, (strip, static, measured)


def test_strip_time_uses_the_in_cache_rate_as_a_tile_does():
    """A strip's call is priced on the same per-node curve as a tile's (``NodeCost``): below the
    knee a position costs the in-cache rate, and the whole map's measured call is slower per
    position. The old model charged every row at the untiled rate (extra time never below
    zero), so it predicted streamed ResNet-50 and VGG-16 at 1024 slower than untiled where they
    ran 0.64x and 0.80x."""
    from tilefx.capture import as_inputs
    from tilefx.cost import NodeCost, calibrate
    from tilefx.plan_model import StaticModel
    from tilefx.stream_plan import stream_cost

    model = chain(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    gm = tilefx.prepare(model, x)
    px = 64 * 64
    linear = {n.name: NodeCost(1e-5, 1e-8) for n in gm.graph.nodes}
    # The same nodes where the whole map costs twice the in-cache rate per position.
    slow_map = {k: NodeCost(c.fixed_s, c.per_pixel_s, full_s=c.fixed_s + 2 * c.per_pixel_s * px,
                            full_px=px, knee_px=px / 8) for k, c in linear.items()}
    extra = {}
    for name, costs in (("linear", linear), ("slow_map", slow_map)):
        sm = StaticModel(gm, as_inputs(x), calibrate(), "macs", costs=costs)
        seg = sm.segment(sm.boundaries[0], sm.boundaries[-1])
        extra[name] = stream_cost(sm, seg, 8).extra_time_s
    spatial = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    # Each strip of 8 rows (512 positions, under the knee) saves about the per-position
    # difference: at least a third of the map's extra cost per spatial node.
    assert extra["slow_map"] < extra["linear"] - spatial * 1e-8 * px / 3, extra
    assert extra["linear"] > 0  # on a linear curve strips only add calls


def test_simulate_before_any_run_with_nearest_upsampling():
    """simulate() fake-runs the bodies; nearest interpolation's indices are read from a real
    index ramp (kernels._aten_nearest), which failed inside the fake mode when no real run had
    filled its cache yet (tiles and strips alike)."""
    from tilefx.kernels import _NEAREST_CACHE
    from tilefx.passes.tile_rewrite import tile_rewrite

    model = chain(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(scale_factor=2),
                  nn.Conv2d(4, 4, 3, padding=1)).float()
    x = torch.randn(1, 3, 37, 29)
    gm = tilefx.prepare(model, x)
    for rewritten in (tile_rewrite(gm, "output", 2), streamed(gm, strip=4)):
        _NEAREST_CACHE.clear()
        predicted = simulate(rewritten, x).peak_bytes
        assert abs(predicted - peak_memory(rewritten, x)) <= 0.10 * predicted


# --------------------------------------------------------------------------- planner, explain


def test_planner_offers_streaming_and_transform_applies_it():
    from tilefx.planner import frontier

    model = _bn_stats(ThreeLevelUNet()).eval()
    x = torch.randn(1, 3, 96, 48)
    gm = tilefx.prepare(model, x)
    front = frontier(gm, x, timing="macs")
    streams = [p for p in front if any(r.stream for r in p.regions)]
    assert streams, [str(p) for p in front]
    p = streams[-1]
    out = tilefx.transform(model, x, plan=p)
    assert any(isinstance(m, StreamRegion) for m in out.modules())
    torch.testing.assert_close(out(x), model(x), **FLOAT32)
    assert "streamed in strips of" in str(p)


def test_explain_shows_strip_height_and_buffers():
    model = _bn_stats(ThreeLevelUNet()).eval()
    x = torch.randn(1, 3, 64, 32)
    s = streamed(tilefx.prepare(model, x), strip=4)
    s.meta["tilefx_example_shape"] = tuple(x.shape)
    text = tilefx.explain(s, file=None)
    assert "strips of 4 rows" in text and "row buffers" in text
    rows = schedule(s, x.shape).rows
    biggest = max((n for n in rows.capacity if n not in region_of(s).spec.outputs),
                  key=rows.capacity.get)
    assert f"{biggest}: {rows.capacity[biggest]} rows of 64" in text


def test_a_mac_limit_reaches_plans_off_the_peak_time_frontier():
    """A U-Net whose skip is computed again streams to a low peak in less time than the plans
    that compute every MAC once, so those are off the peak/time frontier. The planner used to
    keep only that frontier, and ``max_extra_compute`` chose among what was left (BasicUNet-BN
    @1024 at 0.03: 55.9 MiB, where the strips of 8 rows reach 37.9)."""
    model = _bn_stats(ThreeLevelUNet()).eval()
    x = torch.randn(1, 3, 128, 128)
    gm = tilefx.prepare(model, x)
    front = tilefx.planner.frontier(gm, x, timing="macs")
    on_frontier = min(p.peak_bytes for p in front if p.extra_compute <= 0.03)
    chosen = front.choose(max_overhead=100.0, max_extra_compute=0.03)
    assert chosen.extra_compute <= 0.03
    assert chosen.peak_bytes < 0.5 * on_frontier, (chosen.peak_bytes, on_frontier)
    assert chosen.rewrite not in {p.rewrite for p in front}
    out = tilefx.apply(gm, chosen)
    torch.testing.assert_close(out(x), model(x), **FLOAT32)
