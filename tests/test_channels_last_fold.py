"""passes.channels_last: channels-last per-position chains fold into one pointwise call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilefx
from tilefx.passes.channels_last import ChannelsLastBlock, fold_channels_last
from tilefx.passes.memory import simulate
from tilefx.passes.receptive_field import annotate, facts
from tilefx.measure import peak_memory
from tilefx.region import TiledRegion
from tilefx.capture import capture


class Block(nn.Module):
    """A ConvNeXt-style block: depthwise conv, then LayerNorm + MLP in NHWC, residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.b1, self.b2 = Block(), Block()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.b2(self.b1(self.stem(x)))
        return self.head(y.mean((2, 3)))


def test_fold_keeps_outputs_and_makes_blocks_pointwise():
    m, x = Net().eval(), torch.randn(2, 3, 64, 48)
    gm = capture(m, x)
    folded = fold_channels_last(gm)
    assert sum(isinstance(k, ChannelsLastBlock) for k in folded.modules()) == 2
    assert sum(isinstance(k, ChannelsLastBlock) for k in gm.modules()) == 0  # input untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=0, atol=0)  # same ops, same order
    annotate(folded, x)
    blocks = [n for n in folded.graph.nodes if n.op == "call_module" and "channels_last" in n.target]
    assert blocks and all(facts(n).rule.kind == "pointwise" for n in blocks)


def test_chain_with_a_spatial_op_is_not_folded():
    class Mixed(nn.Module):
        def forward(self, x):  # a softmax over W inside the NHWC chain is not per-position
            return F.softmax(x.permute(0, 2, 3, 1), dim=2).permute(0, 3, 1, 2)

    folded = fold_channels_last(capture(Mixed(), torch.randn(1, 3, 8, 8)))
    assert not any(isinstance(k, ChannelsLastBlock) for k in folded.modules())


def test_layernorm_over_space_is_not_folded():
    class NormHW(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm([8, 8])

        def forward(self, x):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    folded = fold_channels_last(capture(NormHW().eval(), torch.randn(1, 8, 8, 8)))
    assert not any(isinstance(k, ChannelsLastBlock) for k in folded.modules())


def test_transform_tiles_through_folded_blocks():
    m, x = Net().eval(), torch.randn(1, 3, 128, 128)
    gm = tilefx.transform(m, x, merge="mean", tiles=(2, 2))
    (region,) = [r for r in gm.modules() if isinstance(r, TiledRegion)]
    assert len(region.spec.nodes) >= 4  # the stem and both blocks are in the region
    with torch.no_grad():
        # float32: tiles change the depthwise convolutions' summation order (~1e-6 relative).
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


def test_memory_model_counts_the_hidden_mlp():
    m, x = Net().eval(), torch.randn(1, 3, 128, 128)
    gm = tilefx.prepare(m, x)
    predicted, measured = simulate(gm, x).peak_bytes, peak_memory(gm, x)
    # the 4C hidden activation dominates; without it the prediction would be ~4x low
    assert predicted == pytest.approx(measured, rel=0.25)


def test_fold_keeps_in_place_ops_whose_results_are_unused():
    """The fold must not drop side effects: MViT writes into tensors with in-place ops whose
    return values nobody reads (a dead-code pass removed them and changed the output)."""

    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)  # result unused: the effect is the write into y
            return y

    x = torch.randn(1, 3, 4, 4)
    gm = capture(InPlace(), x)
    folded = fold_channels_last(gm)
    torch.testing.assert_close(folded(x), x * 2 + 1, rtol=0, atol=0)
