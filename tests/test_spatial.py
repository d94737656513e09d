"""Unit tests of the spatial rule table and the per-axis window maps.

Window maps are checked against PyTorch itself: output lengths against the real op, input
windows by perturbation (changing inputs outside ``in_window`` never changes the output window;
changing the inputs inside it does).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tilefx.passes.receptive_field import annotate, facts
from tilefx.spatial import ZEROS, NEG_INF, Barrier, SpatialRule, _conv_geometry
from tilefx.trace import trace
from tilefx.windows import IDENTITY, Affine, Interp, Transposed


def _facts(model: nn.Module, x: torch.Tensor) -> dict:
    gm = annotate(trace(model.eval()), x)
    return {n.name: facts(n) for n in gm.graph.nodes}


# --------------------------------------------------------------------------- Affine.out_len


def test_affine_out_len_matches_conv_and_pool():
    """Every (n, k, s, p, d) in a small box: the map's length equals the real op's."""
    for n, k, s, p, d in itertools.product(range(1, 14), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2),
                                           (1, 2)):
        x = torch.zeros(1, 1, n)
        span = n + 2 * p - d * (k - 1)
        if span < 1:
            continue
        want = F.conv1d(x, torch.zeros(1, 1, k), stride=s, padding=p, dilation=d).shape[-1]
        assert Affine(k, s, p, p, d).out_len(n) == want, (n, k, s, p, d)
        if p <= k // 2:  # PyTorch's pooling bound on padding
            for ceil_mode in (False, True):
                want = F.max_pool1d(x, k, s, p, d, ceil_mode=ceil_mode).shape[-1]
                got = Affine(k, s, p, p, d, ceil_mode).out_len(n)
                assert got == want, (n, k, s, p, d, ceil_mode)
                if d == 1:
                    want = F.avg_pool1d(x, k, s, p, ceil_mode=ceil_mode).shape[-1]
                    assert got == want, ("avg", n, k, s, p, ceil_mode)


@pytest.mark.parametrize("k,d", [(1, 1), (2, 1), (3, 1), (4, 1), (4, 2), (5, 3), (2, 3)])
def test_same_padding_geometry(k, d):
    """padding='same' (even kernels pad more on the right, like PyTorch)."""
    (m,) = _conv_geometry(k, 1, "same", d, None, 1)
    x = torch.randn(1, 1, 11, dtype=torch.float64)
    w = torch.randn(1, 1, k, dtype=torch.float64)
    y = F.conv1d(x, w, padding="same", dilation=d)
    assert m.out_len(11) == y.shape[-1] == 11
    manual = F.conv1d(F.pad(x, (m.p, m.pr)), w, dilation=d)
    torch.testing.assert_close(manual, y, rtol=0, atol=0)  # same arithmetic, same order


def test_valid_and_tuple_padding_geometry():
    assert _conv_geometry(3, 1, "valid", 1, None, 2) == (Affine(3), Affine(3))
    assert _conv_geometry((3, 5), (1, 2), (1, 2), (1, 2), None, 2) == (
        Affine(3, 1, 1, 1, 1), Affine(5, 2, 2, 2, 2))


# --------------------------------------------------------------------------- in_window by perturbation


def _deps(op, x: torch.Tensor, a: int, b: int) -> tuple[int, int] | None:
    """The hull of the input rows output ``[a, b)`` truly reads, found by perturbing one row
    at a time (not autograd: ATen's nearest-exact backward picks other rows than its forward
    at some sizes), or None when it reads none."""
    y = op(x)[..., a:b]
    rows = []
    for i in range(x.shape[-1]):
        x1 = x.clone()
        x1[..., i] += 3.0
        if not torch.equal(op(x1)[..., a:b], y):
            rows.append(i)
    return (min(rows), max(rows) + 1) if rows else None


def _check_window(op, n_in: int, window, a: int, b: int, *, tight: bool = True,
                  dtype=torch.float64):
    """Perturb inputs outside ``window(a, b)``: output [a, b) must not move; perturb the rows
    it truly reads: it must. With ``tight``, the window is exactly the hull of those rows
    (clipped to the map)."""
    x = torch.randn(1, 1, n_in, dtype=dtype)
    y = op(x)[..., a:b]
    lo, hi = window(a, b)
    lo_c, hi_c = max(lo, 0), min(hi, n_in)
    outside = torch.ones(n_in, dtype=torch.bool)
    outside[lo_c:hi_c] = False
    x2 = x.clone()
    x2[..., outside] += torch.randn(int(outside.sum()), dtype=dtype) * 10
    assert torch.equal(op(x2)[..., a:b], y), (a, b, lo, hi)
    deps = _deps(op, x, a, b)
    if deps is not None:
        assert lo_c <= deps[0] and deps[1] <= hi_c, (a, b, (lo, hi), deps)
        x3 = x.clone()
        x3[..., deps[0]:deps[1]] += 1 + torch.rand(deps[1] - deps[0], dtype=dtype)
        assert not torch.equal(op(x3)[..., a:b], y), (a, b, lo, hi)
        if tight:
            assert deps == (lo_c, hi_c), (a, b, (lo, hi), deps)


def _windows(n_out: int):
    return [(a, b) for a in range(n_out) for b in range(a + 1, n_out + 1) if b - a <= 4 or b == n_out]


@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 3, 4, 2), (2, 2, 0, 1),
                                     (4, 1, 0, 3)])
def test_affine_in_window_conv(k, s, p, d):
    w = torch.rand(1, 1, k, dtype=torch.float64) + 0.5
    m = Affine(k, s, p, p, d)
    op = lambda x: F.conv1d(x, w, stride=s, padding=p, dilation=d)  # noqa: E731
    n = 17
    for a, b in _windows(m.out_len(n)):
        lo, hi = m.in_window(a, b, n, m.out_len(n))
        # A window reaching into the padding is only tight on the side inside the map.
        _check_window(op, n, lambda a_, b_: m.in_window(a_, b_, n, 0), a, b,
                      tight=lo >= 0 and hi <= n)


@pytest.mark.parametrize("k,s,p,op_ceil", [(3, 2, 1, True), (2, 2, 0, True), (3, 3, 1, False)])
def test_affine_in_window_maxpool_ceil(k, s, p, op_ceil):
    m = Affine(k, s, p, p, 1, op_ceil)
    op = lambda x: F.max_pool1d(x, k, s, p, ceil_mode=op_ceil)  # noqa: E731
    n = 14
    for a, b in _windows(m.out_len(n)):
        _check_window(op, n, lambda a_, b_: m.in_window(a_, b_, n, 0), a, b, tight=False)


@pytest.mark.parametrize("k,s,p,d,op", [(3, 2, 1, 1, 1), (4, 2, 1, 1, 0), (3, 1, 0, 2, 0),
                                        (5, 3, 2, 1, 2), (2, 3, 0, 1, 0), (3, 2, 3, 1, 0)])
def test_transposed_in_window(k, s, p, d, op):
    m = Transposed(k, s, p, d, op)
    w = torch.rand(1, 1, k, dtype=torch.float64) + 0.5
    f = lambda x: F.conv_transpose1d(x, w, stride=s, padding=p, output_padding=op, dilation=d)  # noqa: E731
    n = 9
    n_out = m.out_len(n)
    assert n_out == f(torch.zeros(1, 1, n, dtype=torch.float64)).shape[-1]
    for a, b in _windows(n_out):
        # Exactly the hull of the true reads when stride and dilation leave no gaps
        # (outputs that only output padding reaches read nothing: the window has one row).
        tight = s == 1 and d == 1
        _check_window(f, n, lambda a_, b_: m.in_window(a_, b_, n, n_out), a, b, tight=tight)


@pytest.mark.parametrize("mode,align,scale,size", [
    ("nearest", False, 2.0, None), ("nearest", False, 1.5, None), ("nearest", False, 0.5, None),
    ("nearest", False, 1.3, None), ("nearest-exact", False, 1.5, None),
    ("nearest-exact", False, 2.3, None), ("linear", False, 2.0, None), ("linear", True, 2.0, None),
    ("linear", False, 1.5, None), ("linear", True, 1.5, None), ("linear", False, 0.6, None),
    ("linear", False, None, 23), ("nearest", False, None, 23), ("linear", True, None, 7),
])
@pytest.mark.parametrize("n", [5, 11, 34])
def test_interp_in_window(mode, align, scale, size, n):
    m = Interp(mode, align, scale, size)
    fmode = "linear" if mode == "linear" else mode
    kw = dict(scale_factor=scale) if scale is not None else dict(size=size)
    if fmode == "linear":
        kw["align_corners"] = align
    f = lambda x: F.interpolate(x, mode=fmode, **kw)  # noqa: E731
    n_out = m.out_len(n)
    assert n_out == f(torch.zeros(1, 1, n, dtype=torch.float64)).shape[-1]
    for a, b in _windows(n_out):
        # Not tight: nearest windows are widened by one row for ATen's float32 rounding, and
        # a linear window keeps the second row of a blend whose weight is 0.
        _check_window(f, n, lambda a_, b_: m.in_window(a_, b_, n, n_out), a, b, tight=False)
        if mode != "linear":
            # ATen rounds nearest indices in float32: the widened window must hold them. (Its
            # float32 linear index may add a neighbour with weight ~1e-7: rounding, not tested.)
            _check_window(f, n, lambda a_, b_: m.in_window(a_, b_, n, n_out), a, b, tight=False,
                          dtype=torch.float32)


def test_identity_and_pad_maps():
    assert IDENTITY.out_len(7) == 7 and IDENTITY.in_window(2, 5, 7, 7) == (2, 5)
    pad = Affine(p=2, pr=3)
    assert pad.out_len(7) == 12 and pad.in_window(0, 12, 7, 12) == (-2, 10)


# --------------------------------------------------------------------------- rules and pad semantics


def test_rule_pad_semantics():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2),
                          nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
                          nn.ReflectionPad2d(1), nn.ReplicationPad2d(1), nn.ConstantPad2d(1, 3.0))
    f = _facts(model, torch.randn(1, 2, 16, 16))
    pads = [f[f"_{i}"].rule.pad for i in range(7)]
    assert pads[0] == ZEROS and pads[1] == NEG_INF and pads[2] == ZEROS
    assert [p.mode for p in pads[3:6]] == ["reflect", "reflect", "replicate"]
    assert pads[6].mode == "constant" and pads[6].value == 3.0


def test_pointwise_broadcast_operands_pass_through():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 3, 1, 1))

        def forward(self, x):
            return x * self.w + 2.0

    f = _facts(M(), torch.randn(1, 3, 8, 8))
    assert isinstance(f["mul"].rule, SpatialRule)
    assert [n for n, _ in f["mul"].rule.inputs] == ["x"]  # the weight is not cropped


def test_pointwise_spatial_broadcast_is_barrier():
    class M(nn.Module):
        def forward(self, x):
            return x + x[:, :, :1, :]  # broadcasts along a spatial axis

    f = _facts(M(), torch.randn(1, 3, 8, 8))
    assert "broadcasts along a spatial axis" in f["add"].reason
    assert f["getitem"].reason is not None


# --------------------------------------------------------------------------- barriers


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


@pytest.mark.parametrize("fn,node,reason", [
    (lambda y: torch.cumsum(y, dim=-1), "cumsum", "not in tilefx's table"),
    (lambda y: torch.flip(y, dims=[-1]), "flip", "not in tilefx's table"),
    (lambda y: F.adaptive_avg_pool2d(y, 2), "adaptive_avg_pool2d", "global or adaptive"),
    (lambda y: y.mean(dim=(2, 3), keepdim=True), "mean", "global or adaptive"),
    (lambda y: F.pad(y, (1, 1, 1, 1), mode="circular"), "pad", "circular"),
    (lambda y: F.interpolate(y, scale_factor=2, mode="bicubic"), "interpolate", "bicubic"),
    (lambda y: y.flatten(1), "flatten", "merges or splits spatial axes"),
    (lambda y: y.transpose(2, 3), "transpose", "moves a spatial"),
    (lambda y: torch.cat([y, y], dim=2), "cat", "not a channel dim"),
    (lambda y: F.dropout(y, 0.5, True), "dropout", "training mode"),
    (lambda y: F.batch_norm(y, None, None, training=True), "batch_norm", "batch statistics"),
])
def test_barrier_reasons_functional(fn, node, reason):
    f = _facts(_Wrap(fn), torch.randn(1, 3, 8, 8))
    assert isinstance(f["conv"].rule, SpatialRule)
    assert isinstance(f[node].rule, Barrier)
    assert reason in f[node].reason, f[node].reason


@pytest.mark.parametrize("module,reason", [
    (nn.AdaptiveAvgPool2d(1), "global or adaptive"),
    (nn.AdaptiveMaxPool2d((2, 3)), "global or adaptive"),
    (nn.GroupNorm(2, 4), "statistics that span space"),
    (nn.InstanceNorm2d(4), "statistics that span space"),
    (nn.LocalResponseNorm(2), "statistics that span space"),
    (nn.CircularPad2d(1), "circular"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), "circular"),
    (nn.MaxPool2d(2, return_indices=True), "return_indices"),
    (nn.ConvTranspose2d(4, 4, 3, padding_mode="zeros"), None),
    (nn.Upsample(scale_factor=2, mode="bicubic"), "bicubic"),
    (nn.Flatten(), "not in tilefx's table"),
    (nn.Linear(8, 8), "not in tilefx's table"),
    (nn.Softmax(dim=-1), "not in tilefx's table"),
])
def test_barrier_reasons_modules(module, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), module)
    f = _facts(model, torch.randn(1, 3, 8, 8))
    if reason is None:
        assert isinstance(f["_1"].rule, SpatialRule)
    else:
        assert isinstance(f["_1"].rule, Barrier), f["_1"].rule
        assert reason in f["_1"].reason, f["_1"].reason


@pytest.mark.parametrize("module", [nn.BatchNorm2d(4), nn.Dropout(0.1), nn.Dropout2d(0.1)])
def test_training_mode_is_barrier(module):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), module).train()
    gm = annotate(trace(model), torch.randn(2, 3, 8, 8))
    node = next(n for n in gm.graph.nodes if n.name == "_1")
    assert "training mode" in facts(node).reason
    model.eval()
    gm = annotate(trace(model), torch.randn(2, 3, 8, 8))
    node = next(n for n in gm.graph.nodes if n.name == "_1")
    assert facts(node).spatial


def test_batchnorm_without_running_stats_is_barrier():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    f = _facts(model, torch.randn(2, 3, 8, 8))
    assert "batch statistics" in f["_1"].reason


def test_rule_checked_against_traced_shape():
    """A rule whose predicted size disagrees with the traced op becomes a barrier."""
    import tilefx.spatial as spatial

    class Wrong(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    orig = spatial.RULES[torch.relu]

    def lying(ctx):
        r = orig(ctx)
        return SpatialRule(r.op, r.lowering, tuple((n, (Affine(k=3),) * 2) for n, _ in r.inputs))

    spatial.RULES[torch.relu] = lying
    try:
        f = _facts(Wrong(), torch.randn(1, 1, 8, 8))
    finally:
        spatial.RULES[torch.relu] = orig
    assert "predicts spatial size" in f["relu"].reason
