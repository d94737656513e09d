"""Skips computed again instead of stored (passes.recompute), and the plans that use them.

Every test compares with the eager model: float64 within 1e-10 (the same kernels on the same
values; a norm's moments are the same sums in another order), float32 within 1e-4 (a norm
divides by a standard deviation, so rounding grows by its gain over ~10 layers).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilefx
from tilefx import planner
from tilefx.errors import TilingError
from tilefx.measure import peak_memory
from tilefx.passes.recompute import recompute_skips, why_not_again

CAL = planner.Calibration(mac_rate=50e9, call_s=30e-6, pointwise_call_s=5e-6, reorder_s_per_byte=1e-10)
TIMING = dict(calibration=CAL, timing="macs")
TIGHT = dict(rtol=1e-10, atol=1e-10)
FLOAT32 = dict(rtol=1e-4, atol=1e-4)


def two_conv(cin: int, cout: int) -> nn.Sequential:
    """MONAI BasicUNet's block: (conv, instance norm, in-place LeakyReLU) twice."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True),
        nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(cout, cout, 3, padding=1),
        nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.1, inplace=True))


class INUNet(nn.Module):
    """Three levels of InstanceNorm blocks; the full-resolution skip is the largest tensor."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.e0, self.e1, self.e2 = two_conv(3, c), two_conv(c, c), two_conv(c, 2 * c)
        self.up2, self.up1 = nn.ConvTranspose2d(2 * c, c, 2, 2), nn.ConvTranspose2d(c, c, 2, 2)
        self.d1, self.d0 = two_conv(2 * c, c), two_conv(2 * c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x0 = self.e0(x)
        x1 = self.e1(nn.functional.max_pool2d(x0, 2))
        x2 = self.e2(nn.functional.max_pool2d(x1, 2))
        u1 = self.d1(torch.cat([x1, self.up2(x2)], 1))
        return self.head(self.d0(torch.cat([x0, self.up1(u1)], 1)))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = INUNet().eval().to(dtype)
    with torch.no_grad():  # norms with a non-trivial affine, so a wrong statistic shows
        for mod in m.modules():
            if isinstance(mod, nn.InstanceNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


def _skip(gm) -> str:
    """The full-resolution skip: the last op of e0."""
    return [n for n in gm.graph.nodes if any(p.startswith("e0") for p in
            (v[0] for v in (n.meta.get("nn_module_stack") or {}).values()))][-1].name


def test_a_skip_computed_again_equals_the_model():
    m, x = _model(torch.float64), torch.randn(1, 3, 32, 32, dtype=torch.float64)
    gm = tilefx.prepare(m, x)
    again = recompute_skips(gm, [_skip(gm)])
    roles = [n.meta["tilefx_origin"][1] for n in again.graph.nodes if "tilefx_origin" in n.meta]
    # e0: two norms split into moments and application, and its six ops computed again
    assert roles.count("moments") == 2 and roles.count("again") == 6
    assert gm.code != again.code and _skip(gm) in {n.name for n in gm.graph.nodes}  # input kept
    torch.testing.assert_close(again(x), m(x), **TIGHT)


def test_refusals_name_the_reason():
    m, x = _model(), torch.randn(1, 3, 32, 32)
    gm = tilefx.prepare(m, x)
    with pytest.raises(TilingError, match="'nope' is not a node"):
        recompute_skips(gm, ["nope"])
    head = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    with pytest.raises(TilingError, match="one reader"):
        recompute_skips(gm, [head.args[0].name])


def test_an_in_place_write_to_what_it_does_not_compute_is_refused():
    class WritesInput(nn.Module):
        def forward(self, x):
            y = x.relu_()  # writes the graph's input: computing it twice would see it written
            return y + y.mean()

    g = torch.fx.symbolic_trace(WritesInput())
    relu = next(n for n in g.graph.nodes if n.op == "call_method")
    relu.target, relu.op = torch.ops.aten.relu_.default, "call_function"
    assert "writes x in place" in why_not_again(relu)


def test_the_planner_computes_the_full_resolution_skip_again():
    """Storing the full-resolution skip across the whole U-Net bounds every plan that keeps it;
    the variant that computes it again in the decoder's last region goes lower, exactly, and
    its prediction holds."""
    m, x = _model(), torch.randn(1, 3, 128, 128)
    gm = tilefx.prepare(m, x)
    front = planner.frontier(gm, x, **TIMING)
    kept = [p for p in front if not p.recompute]
    again = [p for p in front if p.recompute]
    assert again and again[-1].peak_bytes < min(p.peak_bytes for p in kept)
    p = again[-1]
    tiled = tilefx.apply(gm, p)
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), m(x), **FLOAT32)
    measured = peak_memory(tiled, x)
    assert abs(p.peak_bytes - measured) <= 0.10 * measured
    assert "again" in str(p)
