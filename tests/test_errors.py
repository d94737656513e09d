"""Bad input gives a TilingError (a ValueError) that names the node and says the way out.

The model is captured with ``torch.export``: nodes are ATen nodes (``%conv2d_1``, ``%linear``),
named in messages by their formatted node, which shows the module's parameters they read
(``%body_weight``); merge points can still be given as module paths (``"body"``).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefx
from tilefx import TilingError
from tilefx.capture import capture


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.body = nn.Conv2d(8, 8, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.body(self.drop(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture
def x():
    return torch.randn(1, 3, 32, 32)


def test_is_value_error():
    assert issubclass(TilingError, ValueError)


def test_merge_that_does_not_exist(x):
    with pytest.raises(TilingError, match=r"merge='layer9' is neither a node nor a module") as e:
        tilefx.transform(Net().eval(), x, merge="layer9", tiles=2)
    assert "qualified name such as" in str(e.value) and "'stem'" in str(e.value)


@pytest.mark.parametrize("merge,node", [
    ("fc", r"%linear : .*aten\.linear\.default\]\(args = \(%flatten, %fc_weight"),  # module fc
])
def test_merge_reading_no_spatial_tensor(x, merge, node):
    """fc reads flatten's output, flatten the global pool's: no spatial tensor. (A merge at
    flatten itself is a region that ends by reducing into the pool: tests/test_statistics.)"""
    with pytest.raises(TilingError, match="reads no spatial tensor") as e:
        tilefx.transform(Net().eval(), x, merge=merge, tiles=2)
    msg = str(e.value)
    assert re.search(node, msg), msg  # the ATen node, formatted
    assert "choose a node earlier" in msg


def test_merge_on_graph_input(x):
    # stem's conv reads the graph input x directly.
    with pytest.raises(TilingError, match=r"%conv2d : .*aten\.conv2d\.default\]\(args = "
                                          r"\(%x, %stem_weight, .*reads no spatial tensor"):
        tilefx.transform(Net().eval(), x, merge="stem", tiles=2)


def test_merge_at_global_pool_is_fine(x):
    """A barrier as the merge node is the normal case: it reads the full-size map."""
    model = Net().eval()
    gm = tilefx.transform(model, x, merge="pool", tiles=2)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)  # float32 reorderings


def test_grid_too_fine_says_minimum(x):
    with pytest.raises(TilingError, match="too fine") as e:
        tilefx.transform(Net().eval(), x, merge="pool", tiles=(16, 3))
    msg = str(e.value)
    # the region output it does not fit: body's conv
    assert re.search(r"%conv2d_1 : .*aten\.conv2d\.default\]\(args = \(%dropout, %body_weight",
                     msg), msg
    assert "at most (8, 3) tiles" in msg
    assert "at least (" in msg


@pytest.mark.parametrize("tiles", [1, (1, 1)])
def test_one_tile_is_said_plainly(x, tiles):
    """``tiles=1`` was refused with "no merge node has a region whose outputs are at least that
    many positions per axis ... use fewer tiles": one tile cannot be too many."""
    with pytest.raises(TilingError, match="one tile is the whole map, which does not lower peak"):
        tilefx.transform(Net().eval(), x, tiles=tiles)
    model = Net().eval()  # with a merge node, one tile is what the user asked for: it runs
    gm = tilefx.transform(model, x, merge="pool", tiles=tiles)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)  # float32 reorderings


@pytest.mark.parametrize("tiles", [0, (2, 2, 2), (2, -1)])
def test_bad_tile_counts(x, tiles):
    with pytest.raises(TilingError, match="one positive count or one per spatial axis"):
        tilefx.transform(Net().eval(), x, merge="pool", tiles=tiles)


# Changed by design: training mode is refused by the capture, before anything runs, and the
# message names the module (there is no node yet).


def test_batchnorm_training_mode(x):
    with pytest.raises(TilingError, match=r"module 'bn' \(BatchNorm2d\) is in training mode.*"
                                          r"model\.eval\(\)"):
        tilefx.transform(Net().train(), x, merge="pool", tiles=2)


def test_dropout_training_mode(x):
    model = Net().eval()
    model.drop.train()
    with pytest.raises(TilingError, match=r"module 'drop' \(Dropout\) is in training mode.*"
                                          r"model\.eval\(\)"):
        tilefx.transform(model, x, merge="pool", tiles=2)


class ConvHead(nn.Module):
    """A convolution then a 1x1 head; tests override ``forward`` with the construct under test."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 3, 1)


def test_functional_dropout_training_mode(x):
    class M(ConvHead):
        def forward(self, x):
            return self.head(F.dropout(self.conv(x), 0.5, self.training))

    # No module is in training mode, but the functional dropout makes the outputs random: the
    # capture's check against eager refuses the model and names the dropout node.
    with pytest.raises(TilingError, match=r"%dropout .*runs in training mode.*model\.eval\(\)"):
        tilefx.transform(M().train(), x, merge="head", tiles=2)
    model = M().eval()
    gm = tilefx.transform(model, x, merge="head", tiles=2)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)  # float32 reorderings


def test_training_mode_does_not_touch_running_stats(x):
    model = Net().train()
    before = model.bn.running_mean.clone()
    with pytest.raises(TilingError):
        tilefx.transform(model, x, merge="pool", tiles=2)
    assert torch.equal(model.bn.running_mean, before)


def test_untraceable_data_dependent_control_flow(x):
    class M(ConvHead):
        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:
                y = y * 2
            return self.head(y)

    # torch.export refuses it; the message names the user's line.
    with pytest.raises(TilingError, match=r"M has control flow that depends on tensor values at "
                                          r".*test_errors\.py:\d+: if y\.sum\(\) > 0") as e:
        tilefx.transform(M().eval(), x, merge="head", tiles=2)
    assert isinstance(e.value.__cause__, Exception)  # torch.export's own error is kept


def test_data_dependent_submodule_is_refused_with_its_line(x):
    class Gate(nn.Module):
        def forward(self, y):
            return y * 2 if y.sum() > 0 else y

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.gate = Gate()
            self.head = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.head(self.gate(self.conv(x)))

    model = M().eval()
    # Changed by design: there is no opaque leaf any more. torch.export refuses the whole
    # model, and the error names the submodule's line, whichever merge is asked for.
    for merge in ("gate", "head"):
        with pytest.raises(TilingError, match=r"depends on tensor values at .*test_errors\.py:"
                                              r"\d+: return y \* 2 if y\.sum\(\) > 0 else y"):
            tilefx.transform(model, x, merge=merge, tiles=2)


@pytest.mark.parametrize("shape,msg", [
    # An image whose rank does not match the first convolution is refused before anything runs
    # (an unbatched (C, H, W) image would otherwise be read as N=C with one spatial axis).
    ((3, 32, 32), r"example input has shape \(3, 32, 32\) but Net's first convolution expects "
                  r"4-d input \(N, C, \*spatial\); add the batch axis"),
    ((1, 3, 4, 32, 32), r"example input has shape \(1, 3, 4, 32, 32\) but Net's first "
                        r"convolution expects 4-d input"),
    # No image-like input at all: refused before the model runs.
    ((32, 32), r"tilefx needs an input of shape \(N, C, \*spatial\) with 1 to 3 spatial axes; "
               r"got tensors of shapes \[\(32, 32\)\]\. Add a batch axis"),
])
def test_input_of_wrong_rank(shape, msg):
    with pytest.raises(TilingError, match=msg):
        tilefx.transform(Net().eval(), torch.randn(shape), merge="pool", tiles=2)


def test_unbatched_input_on_a_conv_only_model_is_refused():
    """A model with no BatchNorm runs on an unbatched image; it used to be tiled along one
    'spatial' axis (N=3, C=32), a meaningless tiling."""
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1)).eval()
    with pytest.raises(TilingError, match="expects 4-d input"):
        tilefx.transform(m, torch.randn(3, 32, 32), merge="2", tiles=2)


def test_run_on_input_smaller_than_minimum(x):
    model = Net().eval()
    gm = tilefx.transform(model, x, merge="pool", tiles=(4, 4))
    gm(torch.randn(1, 3, 25, 27))  # still fits: the region output is 7x7
    with pytest.raises(TilingError, match=r"smallest input this tile grid \(4, 4\) fits is spatial "
                                          r"extent \(13, 13\); got \(12, 40\)"):
        gm(torch.randn(1, 3, 12, 40))


def test_run_with_wrong_rank_after_transform(x):
    gm = tilefx.transform(Net().eval(), x, merge="pool", tiles=2)
    # The capture's input guards refuse it before the graph runs.
    with pytest.raises(TilingError, match=r"input shapes \(\(3, 32, 32\)\) do not satisfy "
                                          r"x\.dim\(\) == 4: the model was captured for "
                                          r"\(1, 3, 32, 32\).*Call tilefx\.transform again"):
        gm(torch.randn(3, 32, 32))


def test_fixed_size_interpolation_refuses_other_shapes():
    class M(ConvHead):
        def forward(self, x):
            return self.head(F.interpolate(self.conv(x), size=(40, 40)))

    model = M().eval()
    x = torch.randn(1, 3, 20, 20)
    gm = tilefx.transform(model, x, merge="head", tiles=2)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)  # float32 reorderings
    # The graph is captured with dynamic spatial dims, so the input guards let 24x24 through;
    # the interpolation's map, fixed to the captured extent, refuses it.
    with pytest.raises(TilingError, match=r"output size 40 fixed at trace time for input length "
                                          r"20, and this input gives 24; call tilefx\.transform "
                                          r"again"):
        gm(torch.randn(1, 3, 24, 24))


def test_annotate_required_before_rewrite(x):
    from tilefx.passes.tile_rewrite import tile_rewrite

    with pytest.raises(TilingError, match="no receptive-field facts; run .*annotate"):
        tile_rewrite(capture(Net().eval(), x), "pool", 2)  # captured, never annotated
