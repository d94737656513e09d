"""Convolution and linear primitives: facts (tilefx.primitives) and emission (passes.primitives).

Every emitted primitive is compared with the eager model. Tolerances: float32 outputs here are
O(1) sums of at most a few thousand products, and the primitives differ from eager (oneDNN)
only in summation order, so they agree to ~1e-6; rtol=atol=1e-5 leaves room for that and
catches a wrong window or weight layout (errors of O(1)). float64 (native, matmul): 1e-10.
bfloat16/float16: both sides round every product sum to 8 (11) significant bits, in different
orders, so they may differ by a few units in the last place of the output's scale:
atol = rtol = 4 * eps * (max |output|), with bf16 eps 2^-8 and fp16 eps 2^-11.

The models are tiny (a few ms per call), so the file runs in well under a minute; inductor
(about a minute to compile here) is in the slow tier.
"""

from __future__ import annotations

import gc
import io
import weakref

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager
from torch.profiler import profile

import tilefx
from tilefx import primitives as P
from tilefx.measure import peak_memory
from tilefx.passes.memory import simulate
from tilefx.passes.primitives import PrimitivePass, apply_primitives, primitive_nodes

F32 = dict(rtol=1e-5, atol=1e-5)


def _convs(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and P.op_params(n, gm)]


def _emitted(gm) -> list[str]:
    """Primitive names whose emitted call appears in gm's code or a submodule's."""
    code = "".join(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
    marks = {"onednn": ("tilefx.onednn_convolution",),
             "native": ("aten._slow_conv2d_forward", "aten.slow_conv", "conv1d_native("),
             "matmul": ("conv1x1_matmul(", "linear_matmul(")}
    return [k for k, v in marks.items() if any(s in code for s in v)]


# ----------------------------------------------------------------------------- the variants

VARIANTS = {
    "3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (1, 8, 20, 20)),
    "3x3 stride 2 no bias": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                             (1, 8, 21, 21)),
    "5x3 asymmetric padding": (lambda: nn.Conv2d(8, 8, (5, 3), padding=(2, 0)), (1, 8, 16, 16)),
    "dilated": (lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2), (1, 8, 24, 24)),
    "grouped": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4), (1, 8, 16, 16)),
    "depthwise": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (1, 16, 16, 16)),
    "1x1": (lambda: nn.Conv2d(16, 24, 1), (1, 16, 12, 12)),
    "1x1 stride 2": (lambda: nn.Conv2d(16, 24, 1, stride=2), (1, 16, 13, 13)),
    "1x1 padded": (lambda: nn.Conv2d(16, 8, 1, padding=1), (1, 16, 8, 8)),
    "same": (lambda: nn.Conv2d(8, 8, 3, padding="same"), (1, 8, 16, 16)),
    "1-d": (lambda: nn.Conv1d(8, 8, 3, padding=1), (1, 8, 40)),
    "1-d dilated strided": (lambda: nn.Conv1d(8, 8, 3, stride=2, padding=2, dilation=2),
                            (1, 8, 41)),
    "3-d": (lambda: nn.Conv3d(4, 8, 3, padding=1), (1, 4, 8, 8, 8)),
    "3-d dilated": (lambda: nn.Conv3d(4, 4, 3, padding=2, dilation=2), (1, 4, 9, 9, 9)),
    "3-d 1x1": (lambda: nn.Conv3d(4, 8, 1), (1, 4, 6, 6, 6)),
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), (2, 3, 4, 4)),
    "batch 3": (lambda: nn.Conv2d(8, 8, 3, padding=1), (3, 8, 12, 12)),
}
EXPECTED = {  # what each primitive can compute, and nothing else
    "grouped": ("onednn",), "depthwise": ("onednn",), "1x1 padded": ("onednn", "native"),
    "1x1": ("onednn", "native", "matmul"), "1x1 stride 2": ("onednn", "native", "matmul"),
    "3-d 1x1": ("onednn", "native", "matmul"), "linear": ("matmul",),
}


def _prepared(name):
    make, shape = VARIANTS[name]
    m = make().eval()
    x = torch.randn(shape)
    return m, x, tilefx.prepare(m, x)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_candidate_is_exact_in_the_outer_graph(name):
    m, x, gm = _prepared(name)
    (node,) = _convs(gm)
    cands = P.candidates(next(n for n in gm.graph.nodes if n.name == node))
    assert cands == EXPECTED.get(name, ("onednn", "native"))
    code = gm.code
    for prim in cands:
        out = apply_primitives(gm, {node: prim})
        out.graph.lint()
        assert _emitted(out) == [prim], out.code
        with torch.no_grad():
            torch.testing.assert_close(out(x), m(x), **F32)
    assert gm.code == code  # never mutated


@pytest.mark.parametrize("prim", ["native", "matmul"])
def test_float64_is_exact(prim):
    m = nn.Conv2d(8, 8, 1, stride=2).double().eval()
    x = torch.randn(1, 8, 15, 15, dtype=torch.float64)
    gm = apply_primitives(tilefx.prepare(m, x), {"conv2d": prim})
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prim", ["onednn", "native", "matmul"])
def test_low_precision(dtype, prim):
    m = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()).to(dtype).eval()
    x = torch.randn(1, 8, 12, 12, dtype=dtype)
    gm = tilefx.prepare(m, x)
    if prim == "onednn" and prim not in P.candidates(next(
            n for n in gm.graph.nodes if n.name == "conv2d")):
        pytest.skip(f"oneDNN has no {dtype} convolution on this machine")
    out = apply_primitives(gm, {"conv2d": prim})
    with torch.no_grad():
        ref = m(x)
        eps = torch.finfo(dtype).eps
        tol = 4 * eps * ref.abs().max().item()
        torch.testing.assert_close(out(x), ref, rtol=4 * eps, atol=tol)


def test_onednn_in_float64_is_refused_naming_the_node():
    m = nn.Conv2d(4, 4, 3).double().eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(tilefx.TilingError, match=r"node %conv2d.*float64.*native"):
        apply_primitives(tilefx.prepare(m, x), {"conv2d": "onednn"})


def test_channels_last_input_stays_channels_last():
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1)).eval()
    m = m.to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 16, 16).to(memory_format=torch.channels_last)
    gm = tilefx.prepare(m, x)
    for choice in ({"conv2d": "native", "conv2d_1": "matmul"}, {"conv2d": "onednn"}):
        out = apply_primitives(gm, choice)
        with torch.no_grad():
            y = out(x)
            torch.testing.assert_close(y, m(x), **F32)
        assert y.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- in a tiled region


@pytest.fixture(scope="module")
def tiled_resnet():
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    return m, x, tilefx.transform(m, x, merge="layer2", tiles=2)


def _mixed(gm) -> dict[str, str]:
    body = gm.tiled_region_0.body
    inner = _convs(body)
    outer = _convs(gm)
    one_by_one = next(n for n in outer if "matmul" in P.candidates(
        next(m for m in gm.graph.nodes if m.name == n)))
    return {inner[0]: "native", inner[1]: "native", inner[2]: "onednn", outer[0]: "native",
            one_by_one: "matmul", "linear": "matmul"}


def test_inside_a_tiled_region(tiled_resnet):
    m, x, gm = tiled_resnet
    code, body_code = gm.code, gm.tiled_region_0.body.code
    choices = _mixed(gm)
    out = apply_primitives(gm, choices)
    out.graph.lint()
    assert primitive_nodes(out) == choices
    body = out.tiled_region_0.body.code
    assert "_slow_conv2d_forward" in body and "tilefx.onednn_convolution" in body
    assert "conv1x1_matmul" in out.code and "linear_matmul" in out.code
    with torch.no_grad():
        torch.testing.assert_close(out(x), m(x), **F32)
        x2 = torch.randn(2, 3, 80, 72)  # another shape: windows recomputed, primitives kept
        torch.testing.assert_close(out(x2), m(x2), **F32)
    assert gm.code == code and gm.tiled_region_0.body.code == body_code  # input not mutated
    assert out.tiled_region_0 is not gm.tiled_region_0
    assert {id(p) for p in out.parameters()} == {id(p) for p in gm.parameters()}  # shared


def test_save_load_keeps_the_primitives(tiled_resnet):
    m, x, gm = tiled_resnet
    out = apply_primitives(gm, _mixed(gm))
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    # re-tracing renames nodes; the primitives themselves are kept, each where it was
    def kept(g):
        return sorted((path, P.emitted_primitive(n.target)) for path, mod in g.named_modules()
                      if isinstance(mod, torch.fx.GraphModule) for n in mod.graph.nodes
                      if n.op == "call_function" and P.emitted_primitive(n.target))
    assert kept(loaded) == kept(out) and {p for _, p in kept(out)} == set(_mixed(gm).values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), **F32)


def _small_tiled():
    """A tiled stem (3x3, 1x1 stride 2, dilated) before a pooled linear head."""
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1, stride=2),
                      nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = tilefx.transform(m, x, merge="4", tiles=2)
    choices = {"conv2d": "onednn", "conv2d_1": "matmul", "conv2d_2": "native", "linear": "matmul"}
    return m, x, apply_primitives(gm, choices)


def test_torch_compile_aot_eager():
    import torch._dynamo

    m, x, out = _small_tiled()
    assert "tiled_region_0" in out.code and len(primitive_nodes(out)) == 4
    torch._dynamo.reset()
    compiled = torch.compile(out, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), **F32)


@pytest.mark.slow
def test_torch_compile_inductor():
    import torch._dynamo

    m, x, out = _small_tiled()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(out, backend="inductor")(x), m(x), **F32)


def test_multipass_region_bodies_get_the_choice_in_every_pass():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = tilefx.passes.tile_rewrite.tile_rewrite(tilefx.prepare(m, x), "adaptive_avg_pool2d", 2,
                                                 multipass=True)
    out = apply_primitives(gm, {"conv2d": "native"})
    bodies = [mod.body.code for mod in out.modules() if isinstance(mod, tilefx.TiledRegion)]
    assert len(bodies) >= 2 and all("_slow_conv2d_forward" in b for b in bodies)
    with torch.no_grad():
        torch.testing.assert_close(out(x), m(x), **F32)


class _Block(nn.Module):
    """ConvNeXt's block: a depthwise 7x7 convolution, then per-position layer norm and MLP in
    channels-last (folded into a ChannelsLastBlock by tilefx.prepare), then a residual."""

    def __init__(self, c=16):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def test_linears_inside_channels_last_blocks_tiled_or_not():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _Block(), nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(1, 3, 24, 24)
    gm = tilefx.prepare(m, x)
    tiled = tilefx.transform(m, x, merge="2", tiles=2)
    for g in (gm, tiled):
        out = apply_primitives(g, {"linear": "matmul", "linear_1": "matmul", "conv2d_1": "onednn"})
        assert primitive_nodes(out) == {"linear": "matmul", "linear_1": "matmul",
                                        "conv2d_1": "onednn"}
        with torch.no_grad():
            torch.testing.assert_close(out(x), m(x), **F32)
            measured, predicted = peak_memory(out, x), simulate(out, x).peak_bytes
        assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_candidates_and_emission():
    m, x, gm = _prepared("1x1 stride 2")
    m, x = m.cuda(), x.cuda()
    gm = tilefx.prepare(m, x)
    node = next(n for n in gm.graph.nodes if n.name == "conv2d")
    assert P.candidates(node) == ("matmul", "cudnn")
    for prim in ("matmul", "cudnn"):
        with torch.no_grad():
            torch.testing.assert_close(apply_primitives(gm, {"conv2d": prim})(x), m(x), **F32)


def test_pass_manager():
    m, x, gm = _prepared("1x1")
    result = PassManager([PrimitivePass({"conv2d": "matmul"})])(gm)
    assert result.modified and "conv1x1_matmul" in result.graph_module.code
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), m(x), **F32)


# ----------------------------------------------------------------------------- refusals


def test_refusals_are_tiling_errors_that_say_what_is_valid():
    m, x, gm = _prepared("grouped")
    with pytest.raises(tilefx.TilingError, match=r"unknown primitive 'fast'.*onednn.*native"):
        apply_primitives(gm, {"conv2d": "fast"})
    with pytest.raises(tilefx.TilingError,
                       match=r"no convolution or linear node named 'conv9'.*conv2d"):
        apply_primitives(gm, {"conv9": "native"})
    with pytest.raises(tilefx.TilingError,
                       match=r"'native' cannot compute node %conv2d.*groups=4.*\['onednn'\]"):
        apply_primitives(gm, {"conv2d": "native"})
    m, x, gm = _prepared("3x3")
    with pytest.raises(tilefx.TilingError, match=r"'matmul' cannot compute node %conv2d.*1x1"):
        apply_primitives(gm, {"conv2d": "matmul"})
    with pytest.raises(tilefx.TilingError, match=r"node %relu.*not a convolution or linear"):
        apply_primitives(tilefx.prepare(nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU()), x),
                         {"relu": "native"})
    up = tilefx.prepare(nn.ConvTranspose2d(8, 8, 2, stride=2).eval(), x)
    (name,) = [n.name for n in up.graph.nodes if n.op == "call_function"]
    with pytest.raises(tilefx.TilingError, match=r"not a convolution or linear.*transposed"):
        apply_primitives(up, {name: "native"})
    relu = next(n for n in tilefx.prepare(nn.ReLU(), x).graph.nodes if n.op == "call_function")
    with pytest.raises(tilefx.TilingError, match="not a convolution or linear"):
        P.options(relu)


# ----------------------------------------------------------------------------- facts


@pytest.fixture(params=[1, 2], ids=lambda t: f"{t} thread{'s' if t > 1 else ''}")
def threads(request):
    """oneDNN picks other kernels, and ATen another dispatch, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# (weight shape, stride, padding, dilation, groups, input shape, channels_last): the shapes of
# the table, strided 1x1s (an even and an odd map), a dilated, a grouped and
# channels-last convolutions
CALIBRATION = [
    ((512, 512, 3, 3), 1, 1, 1, 1, (1, 512, 7, 7), False),
    ((1024, 1024, 1, 1), 1, 0, 1, 1, (1, 1024, 14, 14), False),
    ((64, 64, 3, 3), 1, 1, 1, 1, (1, 64, 56, 56), False),
    ((512, 256, 1, 1), 2, 0, 1, 1, (1, 256, 28, 28), False),
    ((512, 256, 1, 1), 2, 0, 1, 1, (1, 256, 27, 27), False),  # odd: no strided gather
    ((128, 64, 3, 3), 1, 2, 2, 1, (2, 64, 20, 20), False),
    ((64, 16, 3, 3), 1, 1, 1, 4, (1, 64, 28, 28), False),
    ((768, 384, 2, 2), 2, 0, 1, 1, (1, 384, 14, 14), True),
    ((256, 256, 3, 3), 1, 1, 1, 1, (1, 256, 14, 14), True),
]


@pytest.mark.parametrize("case", CALIBRATION, ids=lambda c: f"{c[0]}@{c[5]}{' cl' if c[6] else ''}")
def test_workspace_formulas_match_the_profiler(case, threads):
    """The formulas are what the planner predicts tiles with; a change in torch's allocator
    or dispatch shows here first. Tolerance: 1% + 160 KiB (oneDNN's channels-last scratchpad
    varies from 12 KiB to ~140 KiB with the shape; the modelled bytes are MiB)."""
    w, s, pad, d, g, shape, cl = case
    p = P.OpParams("conv", w, (s, s), (pad, pad), (d, d), g, True)
    for prim in P.candidates_for(p):
        formula = P.workspace_bytes(prim, p, shape, cl)
        measured = P.measure_workspace(prim, p, shape, cl)
        assert abs(formula - measured) <= 0.01 * measured + 160 * 1024, (prim, formula, measured)


def _aten_backend(p: P.OpParams, shape) -> str:
    x, w, b = P._operands(p, shape, False)
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
          3: torch.nn.functional.conv3d}[p.nsp]
    with profile() as prof:
        fn(x, w, b, p.stride, p.padding, p.dilation, p.groups)
    keys = [e.key for e in prof.key_averages()]
    return "onednn" if "aten::mkldnn_convolution" in keys else "native"


@pytest.mark.parametrize("w,shape", [
    ((64, 64, 3, 3), (1, 64, 56, 56)), ((64, 64, 3, 3), (1, 64, 16, 16)),
    ((256, 256, 1, 1), (1, 256, 14, 14)), ((64, 64, 1, 1), (16, 64, 4, 4)),
    ((64, 64, 3, 3), (2, 64, 8, 8)), ((16, 16, 5, 5), (1, 16, 8, 8)),
    ((16, 4, 3, 3), (1, 16, 8, 8)), ((64, 64, 3), (1, 64, 300)), ((64, 64, 3), (1, 64, 400)),
    ((16, 16, 3, 3, 3), (1, 16, 16, 16, 16)), ((16, 16, 3, 3, 3), (2, 16, 8, 8, 8)),
])
def test_default_primitive_is_atens_dispatch(w, shape, threads):
    nsp = len(w) - 2
    groups = shape[1] // w[1]
    pad = (w[-1] // 2,) * nsp
    p = P.OpParams("conv", w, (1,) * nsp, pad, (1,) * nsp, groups, False)
    assert P.default_primitive(p, shape) == _aten_backend(p, shape)


def test_timings_are_cached_and_hold_no_tensors():
    p = P.OpParams("conv", (16, 16, 1, 1), (1, 1), (0, 0), (1, 1), 1, True)
    t = P.time_primitives(p, (1, 16, 16, 16), ["onednn", "matmul"], rounds=3)
    assert set(t) == {"onednn", "matmul"} and all(v > 0 for v in t.values())
    assert P.time_primitives(p, (1, 16, 16, 16), ["matmul"]) == {"matmul": t["matmul"]}  # cached
    for key, value in P._TIMES.items():
        assert isinstance(value, float)
        assert not any(isinstance(v, (torch.Tensor, nn.Module)) for v in key)


def test_options_never_run_a_primitive_whose_workspace_is_too_large():
    m, x, gm = _prepared("1x1")
    node = next(n for n in gm.graph.nodes if n.name == "conv2d")
    opts = {o.name: o for o in P.options(node, (1, 16, 12, 12), max_workspace_bytes=0)}
    assert opts["onednn"].workspace_bytes > 0 and opts["onednn"].time_s != opts["onednn"].time_s
    assert opts["native"].workspace_bytes == 0 < opts["native"].time_s  # stride 1: no columns
    assert opts["matmul"].workspace_bytes == 0 < opts["matmul"].time_s


def test_options_keep_nothing_alive():
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 12, 12)
    gm = tilefx.prepare(m, x)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    opts = P.options(node, (1, 8, 6, 6), tile=True)
    assert [o.name for o in opts] == ["onednn", "native"]
    assert all(o.time_s > 0 and o.workspace_bytes >= 0 for o in opts)
    assert [o.default for o in opts] == [False, True]  # a 6x6 window runs native by default
    refs = [weakref.ref(m), weakref.ref(m[0].weight)]
    del m, gm, node
    gc.collect()
    assert all(r() is None for r in refs)


# ----------------------------------------------------------------------------- memory model


def test_simulate_predicts_a_model_with_mixed_primitives(tiled_resnet):
    """A tiled ResNet-18 with native, oneDNN and matmul convolutions inside and outside its
    region."""
    m, x, gm = tiled_resnet
    out = apply_primitives(gm, _mixed(gm))
    with torch.no_grad():
        out(x)
    measured, predicted = peak_memory(out, x), simulate(out, x).peak_bytes
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_native_lowers_the_weight_reorder_floor():
    """Two 512-channel 3x3 convolutions at 7x7 (ResNet's last stage): oneDNN reorders their
    9 MiB of weights on every call, which sets the peak; native holds 0.86 MiB of columns."""
    m = nn.Sequential(nn.Conv2d(64, 512, 1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1),
                      nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1)).eval()
    x = torch.randn(1, 64, 7, 7)
    gm = tilefx.prepare(m, x)
    peaks = {}
    for choice in ({}, {"conv2d_1": "native", "conv2d_2": "native"},
                   {"conv2d": "matmul", "conv2d_1": "native", "conv2d_2": "onednn"}):
        out = apply_primitives(gm, choice)
        measured, predicted = peak_memory(out, x), simulate(out, x).peak_bytes
        assert abs(predicted - measured) <= 0.05 * measured, (choice, predicted, measured)
        peaks[len(choice)] = measured
    assert peaks[0] > 9 * 2**20 > 2 * 2**20 > peaks[2]


# ----------------------------------------------------------------------------- streaming regions


def _last_stage(c=512, size=32):
    """ResNet's last stage in miniature: two 512-channel 3x3 convolutions whose 9 MiB of weights
    oneDNN reorders on every strip's call, where ATen's native path holds a strip's columns."""
    m = nn.Sequential(nn.Conv2d(64, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(c, c, 3, padding=1), nn.ReLU()).eval()
    return m, torch.randn(1, 64, size, size)


def test_inside_a_streaming_region():
    """A choice reaches a convolution inside a streaming region's stage bodies, where it runs on
    every strip's window (the rewriter used to skip StreamRegion and refused the node)."""
    from tilefx.passes.stream_rewrite import stream_rewrite

    m, x = _last_stage()
    streamed = stream_rewrite(tilefx.prepare(m, x), "output", strip=4)
    choices = {"conv2d_1": "native", "conv2d_2": "native"}
    out = apply_primitives(streamed, choices)
    out.graph.lint()
    assert primitive_nodes(out) == choices
    code = "".join(s.code for s in out.stream_region_0.stages)
    assert code.count("_slow_conv2d_forward") == 2
    assert "_slow_conv2d_forward" not in "".join(s.code for s in streamed.stream_region_0.stages)
    with torch.no_grad():
        torch.testing.assert_close(out(x), m(x), **F32)
        x2 = torch.randn(1, 64, 40, 24)  # another shape: a new strip schedule, same primitives
        torch.testing.assert_close(out(x2), m(x2), **F32)
    peaks = {}
    for name, g in (("default", streamed), ("native", out)):
        measured, predicted = peak_memory(g, x), simulate(g, x).peak_bytes
        assert abs(predicted - measured) <= 0.10 * measured, (name, predicted, measured)
        peaks[name] = measured
    # oneDNN's 9 MiB reorder beside every strip against 4 rows of native columns (2.3 MiB)
    assert peaks["native"] < peaks["default"] - 4 * 2**20, peaks
    assert "conv2d_1 native, conv2d_2 native" in tilefx.explain(out, file=None)


@pytest.mark.parametrize("strip", [4, 8])
def test_the_strip_model_prices_a_leaner_primitive(strip):
    """The planner's strip model offers the region again with its convolutions on the primitive
    of least scratch at their strip windows, and predicts that option's peak as measured."""
    from tilefx.capture import as_inputs
    from tilefx.cost import calibrate
    from tilefx.passes.stream_rewrite import stream_rewrite
    from tilefx.plan_model import StaticModel
    from tilefx.stream_plan import stream_costs

    m, x = _last_stage()
    gm = tilefx.prepare(m, x)
    sm = StaticModel(gm, as_inputs(x), calibrate(), "macs")
    a, b = sm.boundaries[0], sm.boundaries[-1]
    seg = sm.segment(a, b)
    rest, at, _ = sm.span_peaks(seg, a, b)
    default, lean = stream_costs(sm, seg, strip)
    assert default.primitives == ()
    assert dict(lean.primitives) == {"conv2d_1": "native", "conv2d_2": "native"}
    assert lean.peak_bytes < default.peak_bytes - 3 * 2**20
    assert lean.extra_time_s > default.extra_time_s  # MACS_TIME_FACTOR: native is slower
    streamed = stream_rewrite(gm, "output", strip)
    for cost, g in ((default, streamed), (lean, apply_primitives(streamed, dict(lean.primitives)))):
        measured = peak_memory(g, x)
        predicted = max(rest, at + cost.peak_bytes)
        assert abs(predicted - measured) <= 0.10 * measured, (cost.primitives, predicted, measured)


def test_the_planner_streams_on_leaner_primitives():
    """The frontier streams the last stage with native convolutions, at a lower peak than any
    stream on oneDNN; the plan's region carries the choice, ``apply`` emits it inside the
    region, and the result is exact against eager."""
    m, x = _last_stage()
    gm = tilefx.prepare(m, x)
    front = tilefx.planner.frontier(gm, x, timing="macs")
    streams = [p for p in front if len(p.regions) == 1 and p.regions[0].stream]
    plan = min(streams, key=lambda p: p.peak_bytes)
    region, = plan.regions
    assert dict(region.primitives) == {"conv2d_1": "native", "conv2d_2": "native"}
    assert all(p.peak_bytes > plan.peak_bytes + 2**20 for p in streams if not p.regions[0].primitives)
    assert plan.every_primitive == dict(region.primitives)
    assert "2 layer(s) on another primitive" in plan.label
    out = tilefx.apply(gm, plan)
    assert primitive_nodes(out) == dict(region.primitives)
    with torch.no_grad():
        torch.testing.assert_close(out(x), m(x), **F32)
    measured = peak_memory(out, x)
    assert abs(plan.peak_bytes - measured) <= 0.10 * measured, (plan.peak_bytes, measured)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_1x1_convolution_as_matmul_copies_nothing_with_a_parameter_weight(batch, channels_last):
    """torch.matmul does not fold the positions into one product when the weight requires grad
    (a module's parameter does, under no_grad too) and copied the whole input: RegNetY-400MF
    @1024 measured 6.5 MiB (26.0 MiB) over its plan's predicted and simulated 19.6 MiB
    where a 104-channel 1x1 convolution ran as matmul. The workspace formula (0 for stride 1)
    was measured with plain tensors and missed it."""
    conv = nn.Conv2d(104, 104, 1, bias=False)
    x = torch.randn(batch, 104, 64, 64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    from tilefx import kernels

    with torch.no_grad():
        want = conv(x)
        got = kernels.conv1x1_matmul(x, conv.weight, None, (1, 1))
    torch.testing.assert_close(got, want, **F32)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    peak = peak_memory(lambda t: kernels.conv1x1_matmul(t, conv.weight, None, (1, 1)), x)
    assert peak == want.numel() * 4
    # the probe the workspace formulas are checked against uses parameters too
    p = P.OpParams("conv", (104, 104, 1, 1), (1, 1), (0, 0), (1, 1), 1, False)
    assert P.measure_workspace("matmul", p, tuple(x.shape), channels_last) == 0
    # and the kernel stays differentiable
    y = kernels.conv1x1_matmul(x, conv.weight, None, (1, 1))
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
