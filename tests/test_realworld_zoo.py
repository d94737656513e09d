"""Real-world CNNs (timm, segmentation-models-pytorch, MONAI, diffusers) through tilefx.

The catalogue is ``benchmarks/models.py`` (random weights, seed 0, eval mode), run here at a
small input side (``SIZE``, or a model's own minimum from ``models.MIN_SIZE``). Two checks:

* ``test_realworld_default``: for every model, ``tilefx.transform(model, x)`` with no options
  succeeds (no refusal, no crash) and the result's outputs equal eager's.
* ``test_realworld_tiles``: for the models in ``EXPECT_TILED``, a forced 2x2 grid
  (``transform(model, x, tiles=2)``) succeeds, the result contains a ``TiledRegion`` and its
  outputs equal eager's. The grid is forced because at a small input the planner's default
  rightly keeps most models whole (tiling a 64x64 map does not pay for its overhead), so the
  default result says nothing about whether the model can be tiled.

Every test is ``@pytest.mark.slow`` (run with ``-m slow`` or ``RUN_SLOW=1``); a family whose
package is missing is skipped. The full-size numbers come from ``benchmarks/realworld.py``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402

import tilefx  # noqa: E402
import tilefx.measure  # noqa: E402
from tilefx import planner, plans  # noqa: E402
from models import FAMILY_PACKAGE, catalogue, names  # noqa: E402

from conftest import assert_same_outputs  # noqa: E402

#: Input side of the test (each model runs at max(SIZE, models.MIN_SIZE[name])).
SIZE = 64

CATALOGUE = catalogue(SIZE)

#: Models whose layers up to the first global operation (the classifier's global pool, or a
#: segmentation decoder's upsampling) are only convolutions, pooling, eval batch norm and
#: pointwise ops (activations, adds, channel concatenation and splits): a region of them can
#: always be tiled exactly, so tilefx must find one. Left out: squeeze-excitation and other
#: global attention mid-network (efficientnet, mobilenetv3, ghostnet, regnety, seresnext,
#: resnest, nfnet), instance/group/layer norm (MONAI's default-norm nets, SegResNet, the VAE
#: decoder, convnext), space-to-depth and blur pooling (tresnet), multi-resolution fusion
#: (hrnet), and smp decoders built around global pooling (DeepLabV3+, PSPNet, MAnet, PAN).
EXPECT_TILED = {
    "timm_resnet50",
    "timm_res2net50_26w_4s",
    "timm_repvgg_a0",
    "timm_densenet121",
    "timm_mobileone_s0",
    "timm_resnetv2_50",
    "timm_cspresnet50",
    "timm_dpn68",
    "timm_vgg16",
    "smp_unet",
    "smp_unetplusplus",
    "smp_fpn",
    "smp_linknet",
    "monai_basicunet_bn",
    "monai_attentionunet",
}


def _setup(name: str):
    build, shape, family = CATALOGUE[name]
    pytest.importorskip(FAMILY_PACKAGE[family])
    model = build()
    torch.manual_seed(0)
    return model, torch.randn(shape)


def _regions(gm) -> int:
    return sum(isinstance(m, tilefx.TiledRegion) for m in gm.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", names())
def test_realworld_default(name):
    model, x = _setup(name)
    gm = tilefx.transform(model, x)
    assert_same_outputs(gm, model, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECT_TILED))
def test_realworld_tiles(name):
    model, x = _setup(name)
    gm = tilefx.transform(model, x, tiles=2)
    assert _regions(gm) > 0, f"{name}: no TiledRegion in the result of transform(tiles=2)"
    assert_same_outputs(gm, model, x)


@pytest.mark.slow
def test_expect_tiled_names_exist():
    assert EXPECT_TILED <= set(CATALOGUE)


#: Models with squeeze-and-excitation, GroupNorm or InstanceNorm that no benchmark row, test
#: above or planner constant was tuned on (the statistics benchmark uses torchvision's
#: EfficientNet-B0, MobileNetV3-Large and RegNetY, MONAI's BasicUNet and the diffusers VAE),
#: each at an input side where lowering the peak pays within the default time bound (+15%):
#: at 256 the default rightly keeps most of them whole. Left out: SegResNet (GroupNorm), whose
#: best plans at 1024 measure 1.06x to 1.4x the untiled time, at the bound, so the measured
#: default is tiled in one run and whole in the next. DynUNet at 512 once failed to apply
#: ("nothing to stream before merge node conv2d_14": a region's closure depended on node
#: addresses, fixed in passes/regions.py).
#: The test plans with the time model on MACs (``timing="macs"``), so its plan is the same run
#: after run: the measured default (``tune=True``) puts these models near the bound, where it is
#: tiled in one run and whole in the next with the machine's load (it failed the slow tier so for
#: DynUNet, SE-ResNeXt and GhostNet in turn); ``benchmarks/realworld.py`` reports what it measures.
UNSEEN_STATISTICS = {"timm_ghostnet_100": 512, "timm_seresnext26d_32x4d": 512, "monai_unet": 512,
                     "monai_dynunet": 512}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(UNSEEN_STATISTICS))
def test_unseen_statistics_models_get_a_tiled_plan_within_the_bound_with_a_lower_measured_peak(name):
    """The planner's choice within the default time bound tiles them, through their statistics
    (multi-pass regions, streaming); the applied plan's outputs equal eager's and its measured
    peak is lower than eager's."""
    build, shape, family = catalogue(UNSEEN_STATISTICS[name])[name]
    pytest.importorskip(FAMILY_PACKAGE[family])
    model = build()
    torch.manual_seed(0)
    x = torch.randn(shape)
    plan = planner.plan(tilefx.prepare(model, x), x, timing="macs")
    assert plan.regions, f"{name}: {plan.label}"
    assert plan.overhead <= plans.DEFAULT_MAX_OVERHEAD, (name, plan.label, plan.overhead)
    gm = tilefx.transform(model, x, plan=plan)
    assert_same_outputs(gm, model, x)
    tiled, eager = tilefx.measure.peak_memory(gm, x), tilefx.measure.peak_memory(model, x)
    assert tiled < eager, (name, plan.label, tiled, eager)
