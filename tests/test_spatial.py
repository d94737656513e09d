"""Unit tests of the rule table (``tilefx.rules``, keyed by ATen op) and the per-axis window maps.

Window maps are checked against PyTorch itself: output lengths against the real op, input
windows by perturbation (changing inputs outside ``in_window`` never changes the output window;
changing the inputs inside it does). Rules and barriers are read off the graph
``tilefx.prepare`` captures with ``torch.export``: an ATen graph whose nodes are found here by
ATen op packet or by the module path in their ``nn_module_stack``, not by their names.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import tilefx
import tilefx.rules
from tilefx import TilingError
from tilefx.capture import capture, module_path
from tilefx.passes.receptive_field import facts
from tilefx.rules import NEG_INF, ZEROS, Barrier, Pointwise, SpatialRule, _conv_maps
from tilefx.windows import IDENTITY, Affine, Interp, Transposed

aten = torch.ops.aten


def _prepare(model: nn.Module, x: torch.Tensor) -> GraphModule:
    """The captured, annotated ATen graph of ``model`` (in eval mode) at ``x``."""
    return tilefx.prepare(model.eval(), x)


def _ops(gm: GraphModule, packet) -> list[Node]:
    """The nodes calling ATen op ``packet`` (any overload), in graph order."""
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet]


def _op(gm: GraphModule, packet) -> Node:
    """The one node calling ATen op ``packet``."""
    (n,) = _ops(gm, packet)
    return n


def _in_module(gm: GraphModule, path: str) -> list[Node]:
    """The call_function nodes module ``path`` created (its ``nn_module_stack``), in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and path in module_path(n)]


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
    (m,) = _conv_maps(k, 1, "same", d, 1)
    x = torch.randn(1, 1, 11, dtype=torch.float64)
    w = torch.randn(1, 1, k, dtype=torch.float64)
    y = F.conv1d(x, w, padding="same", dilation=d)
    assert m.out_len(11) == y.shape[-1] == 11
    manual = F.conv1d(F.pad(x, (m.p, m.pr)), w, dilation=d)
    torch.testing.assert_close(manual, y, rtol=0, atol=0)  # same arithmetic, same order


def test_valid_and_tuple_padding_geometry():
    assert _conv_maps(3, 1, "valid", 1, 2) == (Affine(3), Affine(3))
    assert _conv_maps((3, 5), (1, 2), (1, 2), (1, 2), 2) == (
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
    gm = _prepare(model, torch.randn(1, 2, 16, 16))
    # Each module's first node is the one that reads outside the map: its op, or, for the
    # reflect-padded conv, the aten.pad that torch.export puts before a conv with no padding.
    first = [_in_module(gm, str(i))[0] for i in range(7)]
    assert first[3].target.overloadpacket is aten.pad
    pads = [facts(n).rule.pad for n in first]
    assert pads[0] == ZEROS and pads[1] == NEG_INF and pads[2] == ZEROS
    assert [p.mode for p in pads[3:6]] == ["reflect", "reflect", "replicate"]
    assert pads[6].mode == "constant" and pads[6].value == 3.0
    pad, conv = _in_module(gm, "3")
    assert conv.target.overloadpacket is aten.conv2d
    assert facts(conv).rule.inputs == ((pad.name, (Affine(3), Affine(3))),)  # reads no padding


def test_pointwise_broadcast_operands_pass_through():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 3, 1, 1))

        def forward(self, x):
            return x * self.w + 2.0

    mul = _op(_prepare(M(), torch.randn(1, 3, 8, 8)), aten.mul)
    assert isinstance(facts(mul).rule, SpatialRule)
    assert [n for n, _ in facts(mul).rule.inputs] == ["x"]  # the weight is not cropped


def test_pointwise_spatial_broadcast_is_barrier():
    class M(nn.Module):
        def forward(self, x):
            return x + x[:, :, :1, :]  # broadcasts along a spatial axis

    gm = _prepare(M(), torch.randn(1, 3, 8, 8))
    assert "broadcasts along a spatial axis" in facts(_op(gm, aten.add)).reason
    # x[:, :, :1, :] is one aten.slice per dim; the one along dim 2 cuts the axis.
    (cut,) = [n for n in _ops(gm, aten.slice) if n.args[1] == 2]
    assert "may cut a spatial axis" in facts(cut).reason


# --------------------------------------------------------------------------- barriers


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


@pytest.mark.parametrize("fn,op,reason", [
    pytest.param(lambda y: torch.cumsum(y, dim=-1), aten.cumsum, "not in tilefx's table",
                 id="cumsum"),
    pytest.param(lambda y: torch.flip(y, dims=[-1]), aten.flip, "not in tilefx's table",
                 id="flip"),
    pytest.param(lambda y: F.adaptive_avg_pool2d(y, 2), aten.adaptive_avg_pool2d,
                 "global or adaptive", id="adaptive_avg_pool2d"),
    pytest.param(lambda y: y.mean(dim=(2, 3), keepdim=True), aten.mean,
                 "reduces over a spatial axis", id="mean"),
    pytest.param(lambda y: F.pad(y, (1, 1, 1, 1), mode="circular"), aten.pad, "circular",
                 id="pad-circular"),
    # bicubic is its own ATen op, which the table does not hold
    pytest.param(lambda y: F.interpolate(y, scale_factor=2, mode="bicubic"),
                 aten.upsample_bicubic2d, "not in tilefx's table", id="bicubic"),
    pytest.param(lambda y: y.flatten(1), aten.flatten, "merges or splits spatial axes",
                 id="flatten"),
    pytest.param(lambda y: y.transpose(2, 3), aten.transpose, "moves a spatial", id="transpose"),
    pytest.param(lambda y: torch.cat([y, y], dim=2), aten.cat, "along dim 2, a spatial dim",
                 id="cat"),
    pytest.param(lambda y: F.batch_norm(y, None, None, training=True), aten.batch_norm,
                 "batch statistics", id="batch_norm"),
])
def test_barrier_reasons_functional(fn, op, reason):
    gm = _prepare(_Wrap(fn), torch.randn(1, 3, 8, 8))
    assert isinstance(facts(_op(gm, aten.conv2d)).rule, SpatialRule)
    f = facts(_op(gm, op))
    assert isinstance(f.rule, Barrier)
    assert reason in f.reason, f.reason


def test_functional_dropout_in_training_is_refused_by_capture():
    """``F.dropout(y, 0.5, True)`` makes even an eval model's outputs random, so the capture's
    check against eager refuses the model, naming the dropout, before any rule sees it."""
    with pytest.raises(TilingError, match="dropout.*runs in training mode"):
        capture(_Wrap(lambda y: F.dropout(y, 0.5, True)).eval(), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("module,op,reason", [
    (nn.AdaptiveAvgPool2d(1), aten.adaptive_avg_pool2d, "global or adaptive"),
    (nn.AdaptiveMaxPool2d((2, 3)), aten.adaptive_max_pool2d, "global or adaptive"),
    (nn.GroupNorm(2, 4), aten.group_norm, "statistics that span space"),
    (nn.InstanceNorm2d(4), aten.instance_norm, "statistics that span space"),
    # LRN has no ATen op: export decomposes it into x*x, a pad along the channel axis (of a 5-d
    # view), avg_pool3d and pointwise ops. Tiling stops at that pad (LRN is per position, so
    # this is conservative, never wrong).
    (nn.LocalResponseNorm(2), aten.pad, "touches a non-spatial axis"),
    (nn.CircularPad2d(1), aten.pad, "circular"),
    # padding_mode="circular" is an aten.pad (mode circular) before a conv with no padding.
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), aten.pad, "circular"),
    (nn.MaxPool2d(2, return_indices=True), aten.max_pool2d_with_indices,
     "not in tilefx's table"),
    (nn.ConvTranspose2d(4, 4, 3, padding_mode="zeros"), aten.conv_transpose2d, None),
    (nn.Upsample(scale_factor=2, mode="bicubic"), aten.upsample_bicubic2d,
     "not in tilefx's table"),
    (nn.Flatten(), aten.flatten, "merges or splits spatial axes"),
    (nn.Linear(8, 8), aten.linear, "not in tilefx's table"),
    (nn.Softmax(dim=-1), aten.softmax, "reduces over a spatial axis"),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_barrier_reasons_modules(module, op, reason):
    gm = _prepare(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), module), torch.randn(1, 3, 8, 8))
    nodes = _in_module(gm, "1")
    assert any(getattr(n.target, "overloadpacket", None) is op for n in nodes), nodes
    if reason is None:
        assert all(facts(n).spatial for n in nodes), [facts(n).reason for n in nodes]
    else:
        # The module's first barrier, where tiling stops, is its op, with the reason.
        barrier = next((n for n in nodes if not facts(n).spatial), None)
        assert barrier is not None, nodes
        assert barrier.target.overloadpacket is op, barrier.format_node()
        assert reason in facts(barrier).reason, facts(barrier).reason


@pytest.mark.parametrize("module", [nn.BatchNorm2d(4), nn.Dropout(0.1), nn.Dropout2d(0.1)])
def test_training_mode_is_refused(module):
    """Changed by design: a module in training mode is refused by the capture, before anything
    runs it (it was a barrier); in eval mode it is a per-position op."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), module).train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TilingError, match=rf"module '1' \({type(module).__name__}\) is in training "
                                          r"mode.*model\.eval\(\)"):
        capture(model, x)
    (node,) = _in_module(_prepare(model, x), "1")
    assert facts(node).spatial


def test_batchnorm_without_running_stats_is_barrier():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    gm = _prepare(model, torch.randn(2, 3, 8, 8))
    assert "batch statistics" in facts(_op(gm, aten.batch_norm)).reason


def test_rule_checked_against_traced_shape(monkeypatch):
    """A rule whose predicted size disagrees with the traced op becomes a barrier."""

    class Wrong(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    class LyingEntry(Pointwise):
        """relu's own rule, with a 3-wide valid window that shrinks each axis by 2."""

        def rule(self, ctx):
            r = super().rule(ctx)
            return SpatialRule(r.op, r.kind, tuple((n, (Affine(k=3),) * 2) for n, _ in r.inputs),
                               r.pad, r.attrs)

    x = torch.randn(1, 1, 8, 8)
    with monkeypatch.context() as m:
        m.setitem(tilefx.rules.TABLE, aten.relu, LyingEntry())
        f = facts(_op(_prepare(Wrong(), x), aten.relu))
    assert "predicts spatial size (6, 6) from (8, 8)" in f.reason, f.reason
    assert facts(_op(_prepare(Wrong(), x), aten.relu)).spatial  # the table's own rule
