"""Capture with torch.export: inputs as export takes them, dynamic shapes and guards,
refusals of data-dependent control flow, and the fallback to a model's children."""

from __future__ import annotations

import io
import signal
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefx
from tilefx import TilingError
from tilefx.capture import InputGuards, capture
from tilefx.region import TiledRegion

#: float32 through a few convolutions: tiles sum in another order (~1e-6 relative).
FLOAT32 = dict(rtol=1e-5, atol=1e-5)


def regions(gm):
    return [m for m in gm.modules() if isinstance(m, TiledRegion)]


class TwoInputs(nn.Module):
    """An image and a mask tiled together, a timestep and a half-scale map passed through."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.t = nn.Linear(1, 8)
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.m = nn.Conv2d(1, 8, 1)

    def forward(self, x, mask, t=None, small=None):
        y = self.a(x) + self.b(mask)
        if t is not None:
            y = y + self.t(t[:, None])[:, :, None, None]
        y = F.relu(self.c(y))
        if small is not None:
            y = y * torch.sigmoid(self.m(small))
        return y.mean((2, 3))


def test_positional_and_keyword_inputs_are_tiled_together():
    m = TwoInputs().eval()
    x, mask = torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64)
    kw = dict(t=torch.randn(1), small=torch.randn(1, 1, 32, 32))
    gm = tilefx.transform(m, (x, mask), kw, tiles=2)
    (region,) = regions(gm)
    assert set(region.spec.inputs) >= {"x", "mask"}  # both images enter the tile loop
    torch.testing.assert_close(gm(x, mask, **kw), m(x, mask, **kw), **FLOAT32)
    # dynamic batch and spatial dims: another batch and extent run without a new capture
    x2, mask2 = torch.randn(2, 3, 96, 80), torch.randn(2, 1, 96, 80)
    kw2 = dict(t=torch.randn(2), small=torch.randn(2, 1, 48, 40))
    torch.testing.assert_close(gm(x2, mask2, **kw2), m(x2, mask2, **kw2), **FLOAT32)


def test_data_dependent_branch_is_refused_with_its_line():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = self.conv(x)
            if y.mean() > 0:  # the line the error names
                return y * 2
            return y

    with pytest.raises(TilingError, match=r"depends on tensor values at .*test_capture\.py:\d+: "
                                          r"if y\.mean\(\) > 0"):
        tilefx.transform(M().eval(), torch.randn(1, 3, 32, 32))


def test_python_float_of_a_tensor_is_refused():
    class M(nn.Module):
        def forward(self, x):
            return x * float(x.max())

    with pytest.raises(TilingError, match=r"depends on tensor values.*float\(x\.max\(\)\)"):
        capture(M(), torch.randn(1, 3, 8, 8))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, f):
        y = self.fc(f.mean((2, 3)))
        if y.max() > 0:  # data-dependent Python, as in a detection head
            return y * 2
        return y


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = Head()

    def forward(self, x):
        return self.head(self.backbone(x))


def test_backbone_is_tiled_when_only_the_head_cannot_be_captured():
    m, x = Detector().eval(), torch.randn(1, 3, 256, 256)
    gm = tilefx.transform(m, x, max_overhead=5.0)  # options reach every part
    assert gm.meta["tilefx_parts"]["backbone"] == "tiled"
    assert gm.meta["tilefx_parts"]["head"].startswith("left as it is: Head has control flow")
    assert regions(gm.get_submodule("backbone"))
    torch.testing.assert_close(gm(x), m(x), **FLOAT32)
    text = tilefx.explain(gm, file=None)
    assert "captured in parts" in text and "head: left as it is" in text


def test_parts_need_the_whole_graph_for_a_fixed_merge():
    with pytest.raises(TilingError, match="depends on tensor values"):
        tilefx.transform(Detector().eval(), torch.randn(1, 3, 64, 64), merge="head", tiles=2)


def test_static_capture_refuses_other_shapes_clearly():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y.reshape(1, 4, 32, 32)  # sizes written in: the capture holds at 32x32 only

    m, x = Fixed().eval(), torch.randn(1, 3, 32, 32)
    gm = capture(m, x)
    assert gm.meta["tilefx_dynamic"] is False
    torch.testing.assert_close(gm(x), m(x))
    with pytest.raises(TilingError, match=r"do not satisfy .*captured for .*transform again"):
        gm(torch.randn(1, 3, 40, 40))


class SlowToReason(nn.Module):
    """Stands in for MaxViT, whose dynamic-shape export ran past 20 minutes of sympy: this one
    stalls whenever its sizes are symbolic, and runs at once at concrete sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if not isinstance(x.shape[-1], int):
            time.sleep(30)
        return self.conv(x)


def test_a_dynamic_export_that_runs_too_long_falls_back_to_the_example_shape(monkeypatch):
    monkeypatch.setenv("TILEFX_DYNAMIC_EXPORT_S", "0.5")
    m, x = SlowToReason().eval(), torch.randn(1, 3, 32, 32)
    handler = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    gm = capture(m, x)
    assert time.perf_counter() - t0 < 20, "the time limit did not stop the dynamic attempt"
    assert gm.meta["tilefx_dynamic"] is False
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is handler
    torch.testing.assert_close(gm(x), m(x))
    with pytest.raises(TilingError, match=r"do not satisfy .*captured for .*transform again"):
        gm(torch.randn(1, 3, 40, 40))


def test_shape_guards_of_the_model_are_kept():
    """A branch on a shape is captured for the shapes it holds for; other shapes are refused,
    never run down the captured branch."""

    class Pad32(nn.Module):
        def forward(self, x):
            if x.shape[-1] % 32 != 0:
                x = F.pad(x, (0, 32 - x.shape[-1] % 32))
            return x.relu()

    m = Pad32()
    gm = capture(m, torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 96, 128)
    torch.testing.assert_close(gm(x), m(x))
    with pytest.raises(TilingError, match=r"% 32"):
        gm(torch.randn(1, 3, 64, 50))



def test_a_guard_that_says_batch_is_not_one_admits_the_example_batch(monkeypatch):
    """Export specialises sizes 0 and 1, so a dynamic batch starts at 2 and some guards say
    ``s0 != 1`` inside a product of sizes (mvit_v2_s: ``5376*s0*K//448 != 5376*K//448``). The
    capture is checked against eager at the example's own batch (1), so such a guard must not
    refuse it: prepare() refused the very example it had captured."""
    import tilefx.capture as capture_mod

    real = capture_mod._export

    def export_with_batch_guard(model, inputs):
        ep, dynamic = real(model, inputs)
        ep._guards_code = list(getattr(ep, "_guards_code", None) or []) + [
            "(3*L['x'].size()[0]*L['x'].size()[2]) != (3*L['x'].size()[2])"]
        return ep, dynamic

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).relu()

    monkeypatch.setattr(capture_mod, "_export", export_with_batch_guard)
    m = Net().eval()
    gm = capture(m, torch.randn(1, 3, 32, 32))
    assert gm.meta["tilefx_dynamic"]
    for x in (torch.randn(1, 3, 40, 48), torch.randn(2, 3, 32, 32)):
        with torch.no_grad():
            # float32, one convolution on the same values in the same order: rounding only
            torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)
    guards = next(k for k in gm.modules() if isinstance(k, InputGuards))
    assert any("or x.shape[0] == 1" in shown for _, shown in guards.checks)

def test_a_sequential_is_captured_with_dynamic_shapes():
    """nn.Sequential's forward takes ``input``, a builtin's name, so export names its
    placeholder ``input_1`` while its guards still say ``L['input']``: the guards were read as
    unwritable and every Sequential was held to the example's shape."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    gm = capture(m, torch.randn(1, 3, 64, 64))
    assert gm.meta["tilefx_dynamic"]
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        # float32, two convolutions on the same values in the same order: rounding only
        torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TilingError, match=r"input_1\.shape\[2\] >= 3"):  # export's own guard
        gm(torch.randn(1, 3, 2, 2))


def test_guards_survive_save_and_load():
    m = TwoInputs().eval()
    x, mask = torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32)
    gm = tilefx.transform(m, (x, mask), tiles=2)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert any(isinstance(k, InputGuards) for k in loaded.modules())
    torch.testing.assert_close(loaded(x, mask), m(x, mask), **FLOAT32)
    with pytest.raises(TilingError, match="do not satisfy"):
        loaded(x, torch.randn(1, 2, 32, 32))  # a mask with two channels: not what was captured


def test_capture_of_a_user_graph_module():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    traced = torch.fx.symbolic_trace(m)
    x = torch.randn(1, 3, 16, 16)
    gm = capture(traced, x)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert ops == {"aten.conv2d.default", "aten.relu.default"}
    torch.testing.assert_close(gm(x), m(x))
