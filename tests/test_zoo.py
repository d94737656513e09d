"""Model coverage over torchvision's zoos: every model tiled on a 2x2 (2x2x2) grid equals eager.

For each model the test picks the deepest merge it can (:func:`pick_merge`: the barrier or
output node whose region is largest while every region output still fits the grid), tiles it
and compares with eager. Models tilefx refuses are listed in :data:`EXPECTED_REFUSALS` with
the reason tilefx gives; a listed model that starts to tile, or an unlisted one that is
refused, fails the test. The default run covers a representative subset; the whole zoo is
``@pytest.mark.slow`` (``-m slow`` or ``RUN_SLOW=1``). Models are captured with torch.export.
"""

from __future__ import annotations


import pytest
import torch
from torchvision import models

import tilefx
from tilefx import TilingError
from tilefx.passes.receptive_field import facts
from tilefx.passes.regions import find_region
from tilefx.passes.tile_rewrite import tile_rewrite
from tilefx.region import TiledRegion

from conftest import assert_same_outputs

CLASSIFICATION = models.list_models(module=models)
SEGMENTATION = models.list_models(module=models.segmentation)
VIDEO = models.list_models(module=models.video)

#: A representative subset for the fast tier (residuals, SE and hardswish, the channels-last fold,
#: channel shuffle, ceil-mode pooling, a segmentation head, 3-d convolutions); the rest of the
#: zoo is the slow tier.
DEFAULT = [
    "resnet18", "mobilenet_v3_small", "convnext_tiny", "shufflenet_v2_x0_5", "squeezenet1_0",
    "lraspp_mobilenet_v3_large", "r3d_18",
]

#: Input shapes other than the default (1, 3, 64, 64) / (1, 3, 8, 64, 64): the models' own
#: minimum sizes (fixed image sizes of ViTs, window sizes of MaxViT and MViT, inception's 75px).
INPUT_SHAPES = {
    "inception_v3": (1, 3, 80, 80),
    "maxvit_t": (1, 3, 224, 224),
    **{n: (1, 3, 224, 224) for n in CLASSIFICATION if n.startswith("vit_")},
    "vit_h_14": (1, 3, 224, 224),
    "mvit_v1_b": (1, 3, 16, 224, 224),
    "mvit_v2_s": (1, 3, 16, 224, 224),
    # S3D ends in AvgPool3d((2, 7, 7)) at strides (8, 32, 32): eager needs at least 14x209x209.
    "s3d": (1, 3, 16, 224, 224),
}

#: Models tilefx refuses to tile, and why (the reason tilefx gives).
EXPECTED_REFUSALS: dict[str, str] = {}


def build(name: str) -> torch.nn.Module:
    kw = {}
    if name in ("googlenet", "inception_v3"):
        kw = dict(aux_logits=False, init_weights=False)
    if name in SEGMENTATION:
        kw = dict(weights_backbone=None, aux_loss=False)
    torch.manual_seed(0)
    return models.get_model(name, weights=None, **kw).eval()


def example(name: str) -> torch.Tensor:
    shape = INPUT_SHAPES.get(name, (1, 3, 8, 64, 64) if name in VIDEO else (1, 3, 64, 64))
    return torch.randn(shape)


def pick_merge(gm: torch.fx.GraphModule, grid: tuple[int, ...]) -> tuple[str, int]:
    """The deepest merge for ``grid``: the node whose region (the spatial ancestors of its
    inputs) is largest while every region output still fits the grid.

    Returns (merge node name, region size); raises TilingError when no node qualifies.
    """
    best = None
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        reads = [u for u in n.all_input_nodes if facts(u).spatial]
        if not reads or any(L < t for u in reads for L, t in zip(facts(u).sizes, grid)):
            continue
        region, outputs = find_region(gm, [n])[:2]
        if region and all(all(L >= t for L, t in zip(facts(o).sizes, grid)) for o in outputs):
            if best is None or len(region) > best[1]:
                best = (n.name, len(region))
    if best is None:
        raise TilingError(f"no merge node has a region whose outputs fit the grid {grid}")
    return best


def check_model(name: str) -> None:
    model = build(name)
    x = example(name)
    grid = (2,) * (x.dim() - 2)
    try:
        gm0 = tilefx.prepare(model, x)
        merge, size = pick_merge(gm0, grid)
        # the rewrite transform(model, x, merge=merge, tiles=grid) applies, without capturing
        # the model a second time
        gm = tile_rewrite(gm0, merge, grid)
    except TilingError as e:
        if name in EXPECTED_REFUSALS:
            assert EXPECTED_REFUSALS[name] in str(e), str(e)
            return
        raise
    assert name not in EXPECTED_REFUSALS, f"{name} now tiles: remove it from EXPECTED_REFUSALS"
    region = next(m for m in gm.modules() if isinstance(m, TiledRegion))
    assert len(region.spec.nodes) == size
    assert_same_outputs(gm, model, x)


@pytest.mark.parametrize("name", DEFAULT)
def test_zoo_default(name):
    check_model(name)


ALL = sorted(set(CLASSIFICATION + SEGMENTATION + VIDEO) - set(DEFAULT))


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_zoo_full(name):
    check_model(name)


def test_subset_names_exist():
    assert set(DEFAULT) <= set(CLASSIFICATION + SEGMENTATION + VIDEO)
    assert set(EXPECTED_REFUSALS) <= set(CLASSIFICATION + SEGMENTATION + VIDEO)
