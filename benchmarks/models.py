"""A catalogue of real-world CNNs from timm, segmentation-models-pytorch, MONAI and diffusers.

Used by ``benchmarks/realworld.py`` (full size, 512) and ``tests/test_realworld_zoo.py``
(small size). Every model is built with random weights (nothing is downloaded), seeded with
``torch.manual_seed(0)`` just before it is built, and put in eval mode.

    >>> from models import catalogue                       # benchmarks/ on sys.path
    >>> build, shape, family = catalogue(64)["timm_resnet50"]
    >>> model = build()                                    # seeded, random weights, .eval()
    >>> shape
    (1, 3, 64, 64)

``catalogue(size)`` maps NAME -> (builder, example input shape, family). Image models take
``(1, 3, S, S)`` with ``S = max(size, MIN_SIZE[name])``; the diffusers VAE decoder takes the
latent ``(1, 4, S/8, S/8)``. The family's package is imported only when a builder runs, so the
catalogue itself needs nothing but torch (see ``FAMILY_PACKAGE`` to skip a missing family).
"""

from __future__ import annotations

from typing import Callable

import torch

#: The package each family needs (for ``pytest.importorskip`` / availability checks).
FAMILY_PACKAGE = {
    "timm": "timm",
    "smp": "segmentation_models_pytorch",
    "monai": "monai",
    "diffusers": "diffusers",
}

#: Smallest image side used at small sizes (default 64, which every model here accepts
#: unless listed): the size a model needs to run eagerly, or to keep a pooling pyramid valid.
DEFAULT_MIN_SIZE = 64
MIN_SIZE: dict[str, int] = {
    # PAN's feature pyramid attention halves the stride-32 map three more times (7x7, 5x5, 3x3
    # convolutions between): below 128 a pooled map is empty and eager PAN fails.
    "smp_pan": 128,
}

Entry = tuple[Callable[[], torch.nn.Module], tuple[int, ...], str]


def _seeded(make: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return make().eval()

    return build


# --------------------------------------------------------------------------------------------
# timm

TIMM = [
    "resnet50", "res2net50_26w_4s", "nfnet_l0", "repvgg_a0", "densenet121", "fastvit_t8",
    "mobileone_s0", "resnetv2_50", "cspresnet50", "tresnet_m", "dpn68", "ghostnet_100",
    "efficientnet_b0", "mobilenetv3_large_100", "regnety_004", "seresnext26d_32x4d",
    "convnext_atto", "vgg16", "resnest14d", "hrnet_w18_small",
]


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return make


# --------------------------------------------------------------------------------------------
# segmentation-models-pytorch (resnet34 encoder, random weights)

SMP = ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "Linknet", "PSPNet", "MAnet", "PAN"]


def _smp(arch: str) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)("resnet34", encoder_weights=None, in_channels=3, classes=2)

    return make


# --------------------------------------------------------------------------------------------
# MONAI, 2-d


def _monai(name: str) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        from monai.networks import nets

        common = dict(spatial_dims=2, in_channels=3, out_channels=2)
        if name == "monai_basicunet":
            return nets.BasicUNet(**common)
        if name == "monai_basicunet_bn":
            return nets.BasicUNet(**common, norm=("batch", {"affine": True}))
        if name == "monai_unet":
            return nets.UNet(**common, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
        if name == "monai_segresnet":
            return nets.SegResNet(spatial_dims=2, in_channels=3, out_channels=2)
        if name == "monai_attentionunet":
            return nets.AttentionUnet(**common, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
        if name == "monai_dynunet":
            return nets.DynUNet(**common, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                                upsample_kernel_size=[2, 2, 2, 2])
        raise KeyError(name)

    return make


MONAI = ["monai_basicunet", "monai_basicunet_bn", "monai_unet", "monai_segresnet",
         "monai_attentionunet", "monai_dynunet"]


# --------------------------------------------------------------------------------------------
# diffusers: the decoder of a small AutoencoderKL (latent 4 channels, 8x upsampling)


def _vae_decoder() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    )
    return vae.decoder


# --------------------------------------------------------------------------------------------


def names() -> list[str]:
    """Every model name, in catalogue order."""
    return ([f"timm_{n}" for n in TIMM] + [f"smp_{a.lower()}" for a in SMP] + MONAI
            + ["diffusers_vae_decoder"])


def catalogue(size: int = 512) -> dict[str, Entry]:
    """NAME -> (builder, example input shape, family) at image side ``size``.

    Each model runs at ``max(size, MIN_SIZE[name])`` (default minimum 64); the VAE decoder's
    latent is that side divided by 8.
    """
    out: dict[str, Entry] = {}

    def side(name: str) -> int:
        return max(size, MIN_SIZE.get(name, DEFAULT_MIN_SIZE))

    for n in TIMM:
        name = f"timm_{n}"
        out[name] = (_seeded(_timm(n)), (1, 3, side(name), side(name)), "timm")
    for a in SMP:
        name = f"smp_{a.lower()}"
        out[name] = (_seeded(_smp(a)), (1, 3, side(name), side(name)), "smp")
    for name in MONAI:
        out[name] = (_seeded(_monai(name)), (1, 3, side(name), side(name)), "monai")
    s = side("diffusers_vae_decoder") // 8
    out["diffusers_vae_decoder"] = (_seeded(_vae_decoder), (1, 4, s, s), "diffusers")
    assert list(out) == names()
    return out
