"""tilefx next to the rest of PyTorch: PassManager, torch.compile, torch.save, other input
shapes, low-precision dtypes, channels_last and CUDA.

Every test compares the transformed module with eager on the same input. The models are tiny
(a few ms per call) so the file runs in well under a minute without torch.compile's inductor,
which costs about 15 s per compile on 2 CPU cores.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import tilefx
from tilefx.passes import TilePass
from tilefx.region import TiledRegion

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Tiny(nn.Module):
    """conv-bn-relu, an optional max pool, a strided conv, then a global-pool head (a barrier)."""

    def __init__(self, maxpool: bool = True):
        super().__init__()
        down = nn.MaxPool2d(3, stride=2, padding=1) if maxpool else nn.Conv2d(8, 8, 3, 2, 1)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  down, nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.stem(x)).flatten(1))


def tiny(maxpool: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Tiny(maxpool).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        bn = m.stem[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m


def regions(gm: nn.Module) -> list[TiledRegion]:
    return [m for m in gm.modules() if isinstance(m, TiledRegion)]


# ----------------------------------------------------------------------------- PassManager


class FuseConvBN(PassBase):
    """Conv-bn fusion (torch.fx.experimental.optimization.fuse) as a PassBase."""

    def call(self, gm):
        from torch.fx.experimental.optimization import fuse

        return PassResult(fuse(gm, inplace=False), True)


def test_tile_pass_alone_returns_pass_result():
    m, x = tiny(), torch.randn(1, 3, 64, 64)
    gm = torch.fx.symbolic_trace(m)
    code_before = gm.code
    result = TilePass(x, merge="pool", tiles=(2, 2))(gm)
    assert isinstance(result, PassResult) and result.modified
    assert result.graph_module is not gm and gm.code == code_before  # input not mutated
    result.graph_module.graph.lint()
    assert len(regions(result.graph_module)) == 1
    torch.testing.assert_close(result.graph_module(x), m(x))
    assert "TilePass(example_inputs=((1, 3, 64, 64))" in repr(TilePass(x, merge="pool"))


def test_tile_pass_in_pass_manager_after_fusion():
    m, x = tiny(), torch.randn(1, 3, 64, 64)
    pm = PassManager([FuseConvBN(), TilePass(x, merge="pool", tiles=(3, 2))], run_checks_after_each_pass=True)
    result = pm(torch.fx.symbolic_trace(m))
    out = result.graph_module
    assert result.modified
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in out.modules())  # fused first
    assert regions(out)[0].grid == (3, 2)
    torch.testing.assert_close(out(x), m(x))


def test_tile_pass_on_plain_module_and_bad_input():
    m, x = tiny(), torch.randn(1, 3, 48, 48)
    result = TilePass(x, merge="pool", tiles=2)(m)
    torch.testing.assert_close(result.graph_module(x), m(x))
    with pytest.raises(tilefx.TilingError):
        TilePass(x, merge="pool", tiles=2)("not a module")


# ----------------------------------------------------------------------------- torch.compile


def _compile_and_check(backend: str, second_shape: bool):
    import torch._dynamo

    m, x = tiny(), torch.randn(1, 3, 64, 64)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x))
        if second_shape:  # a recompile: dynamo specializes on the tile windows of each shape
            x2 = torch.randn(2, 3, 80, 72)
            torch.testing.assert_close(compiled(x2), m(x2))


def test_torch_compile_aot_eager():
    """Dynamo traces through the tile loop (one graph, no graph breaks) and AOTAutograd runs it."""
    _compile_and_check("aot_eager", second_shape=True)


def test_torch_compile_has_no_graph_breaks():
    import torch._dynamo

    m, x = tiny(), torch.randn(1, 3, 64, 64)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(gm)(x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


def _inductor_works() -> bool:
    try:
        import torch._dynamo

        torch._dynamo.reset()
        f = torch.compile(lambda t: t * 2 + 1, backend="inductor")
        return bool(torch.equal(f(torch.ones(3)), torch.full((3,), 3.0)))
    except Exception:  # no C compiler, no triton, ...: reported by the skip reason
        return False


def test_torch_compile_inductor():
    """The default backend: inductor generates C++ on CPU (needs a C compiler)."""
    if not _inductor_works():
        pytest.skip("torch.compile(backend='inductor') fails on this machine for a plain lambda "
                    "(no working C/C++ compiler?); the aot_eager test covers dynamo tracing")
    _compile_and_check("inductor", second_shape=False)


# ----------------------------------------------------------------------------- serialization


def _save_load(gm: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("maxpool", [False, True], ids=["conv_only", "with_maxpool"])
def test_save_load_round_trip(maxpool):
    """torch.load re-traces each GraphModule's code: the tile body's helpers must stay leaves
    (they are marked wrapped), and the RegionSpec must pickle (no F.max_pool2d in it)."""
    m, x = tiny(maxpool), torch.randn(1, 3, 64, 64)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    loaded = _save_load(gm)
    assert len(regions(loaded)) == 1
    torch.testing.assert_close(loaded(x), m(x))
    x2 = torch.randn(1, 3, 40, 56)
    torch.testing.assert_close(loaded(x2), m(x2))
    torch.testing.assert_close(_save_load(loaded)(x), m(x))  # a loaded module saves again


def test_an_untiled_result_survives_save_and_load():
    """A model the planner leaves untiled is returned as captured. torch.export's graph names
    its tracer (_ModuleStackTracer), which torch.load then builds without the argument it needs:
    saving the default transform of MobileNetV2 @224 and loading it raised TypeError
    ("missing 1 required positional argument: 'scope_root'") whenever the choice was untiled."""
    m, x = tiny(True), torch.randn(1, 3, 64, 64)
    gm = tilefx.prepare(m, x)  # what transform returns when the plan is the untiled model
    loaded = _save_load(gm)
    # float32, the same kernels on the same values in the same order: equal
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(_save_load(loaded)(x), m(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def resnet18_two_regions():
    """resnet18 (random weights) at 64x64 with two regions: the stem and layer1 on 2x2 (from
    tilefx.transform), then layer2 on 2x1 (a second tile_rewrite of the result)."""
    from torchvision.models import resnet18

    from tilefx.passes.tile_rewrite import tile_rewrite

    torch.manual_seed(0)
    m = resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = tile_rewrite(tilefx.transform(m, x, merge="layer2", tiles=(2, 2)), "layer3", (2, 1))
    assert [r.grid for r in regions(gm)] == [(2, 2), (2, 1)]
    return m, x, gm


def _assert_close_to_eager(got: torch.Tensor, want: torch.Tensor) -> None:
    # float32 through resnet18's 20 convolutions: a tile's convolution may sum in another order
    # than the whole map's (oneDNN picks its algorithm by window shape), ~1e-6 relative per
    # layer; 1e-4 of the logits' scale bounds the accumulated difference with margin (as in
    # test_zoo), while a wrong window or a misplaced tile moves logits by far more.
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_save_load_resnet18_two_regions(resnet18_two_regions):
    m, x, gm = resnet18_two_regions
    loaded = _save_load(gm)
    assert [r.grid for r in regions(loaded)] == [(2, 2), (2, 1)]
    with torch.no_grad():
        got = loaded(x)
        assert torch.equal(got, gm(x))  # the same kernels on the same windows as before saving
        _assert_close_to_eager(got, m(x))


def test_loaded_resnet18_runs_at_another_shape(resnet18_two_regions):
    m, x, gm = resnet18_two_regions
    with torch.no_grad():
        gm(x)  # fills the schedule cache, which is not saved
    loaded = _save_load(gm)
    assert all(not r._schedules for r in regions(loaded))
    x2 = torch.randn(2, 3, 80, 96)  # a shape neither module has run on
    with torch.no_grad():
        _assert_close_to_eager(loaded(x2), m(x2))


def test_deepcopy():
    m, x = tiny(), torch.randn(1, 3, 64, 64)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    twin = copy.deepcopy(gm)
    torch.testing.assert_close(twin(x), m(x))


# ----------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 64, 64), (1, 3, 97, 53), (3, 3, 128, 40),
                                   (1, 3, 16, 16)])
def test_other_input_shapes(shape):
    m = tiny()
    gm = tilefx.transform(m, torch.randn(1, 3, 64, 64), merge="pool", tiles=(4, 4))
    x = torch.randn(shape)
    torch.testing.assert_close(gm(x), m(x))


def test_input_below_minimum_says_the_minimum():
    m = tiny()
    gm = tilefx.transform(m, torch.randn(1, 3, 64, 64), merge="pool", tiles=(4, 4))
    with pytest.raises(tilefx.TilingError, match="smallest input"):
        gm(torch.randn(1, 3, 8, 8))


# ----------------------------------------------------------------------------- dtypes, layouts

# Tiled and untiled run the same ops on the same values; they can differ by rounding only where
# a backend picks another algorithm for a different tile size. Tolerances: a few units in the
# last place of the dtype at the outputs' scale (float16 eps 9.8e-4, bfloat16 eps 7.8e-3).
TOLERANCE = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision(dtype):
    m = tiny().to(dtype)
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    with torch.no_grad():
        out = gm(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out, m(x), **TOLERANCE[dtype])


def test_channels_last():
    m = tiny().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    torch.testing.assert_close(gm(x), m(x))
    # a contiguous input into the channels_last-planned module, and the other way round
    torch.testing.assert_close(gm(x.contiguous()), m(x.contiguous()))


def test_region_outputs_keep_channels_last():
    m = tiny().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    outs = gm.tiled_region_0(x)
    ref = m.stem(x)
    torch.testing.assert_close(outs[0], ref)
    assert outs[0].is_contiguous(memory_format=torch.channels_last) == \
        ref.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- CUDA


@cuda
def test_cuda_outputs_match():
    m, x = tiny().cuda(), torch.randn(2, 3, 96, 96, device="cuda")
    gm = tilefx.transform(m, x, merge="pool", tiles=(4, 4))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cuda_low_precision_and_channels_last(dtype):
    m = tiny().to("cuda", dtype).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 96, 96, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 3))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), **TOLERANCE[dtype])


@cuda
def test_cuda_torch_compile():
    import torch._dynamo

    m, x = tiny().cuda(), torch.randn(1, 3, 64, 64, device="cuda")
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gm)(x), m(x))


@cuda
def test_cuda_save_load_to_cpu():
    m, x = tiny(maxpool=False).cuda(), torch.randn(1, 3, 64, 64, device="cuda")
    gm = tilefx.transform(m, x, merge="pool", tiles=(2, 2))
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False, map_location="cpu")
    torch.testing.assert_close(loaded(x.cpu()), m.cpu()(x.cpu()))


def test_one_by_one_windows_keep_nchw():
    """A grid as fine as the map gives 1x1 windows, contiguous in both layouts: the region's
    output buffers must stay NCHW for an NCHW network (channels_last there changed oneDNN's
    path downstream and doubled the peak)."""
    m = nn.Sequential(nn.Conv2d(3, 16, 3, stride=8, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.Flatten()).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = tilefx.transform(m, x, merge="3", tiles=(4, 4))  # 4x4 map, 4x4 grid: 1x1 windows
    (region,) = [r for r in gm.modules() if isinstance(r, TiledRegion)]
    (out,) = region(x)
    assert out.is_contiguous() and out.stride(1) == 16
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)  # float32 reorderings
