"""Test helpers: one tiny random instance per registered timm class, and checks against timm's own
intermediates. Nothing is downloaded (``pretrained=False``); every model has a few thousand to a few
million parameters and runs on a few dozen pixels."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import timm
import torch
from timm.models import FeatureDictNet
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv
from timm.models.mlp_mixer import MlpMixer
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from torch import Tensor, nn

import tdsteer
import tdsteer_timm
from tdsteer.adapter import ModelDescription, SiteInfo

CLASSES = 5
VIT = {"img_size": 32, "patch_size": 8, "depth": 2}
SMALL_VIT = {**VIT, "embed_dim": 32, "num_heads": 2}
ONES = (1, 1, 1, 1)


def _mixer() -> nn.Module:
    # mixer_* names fix num_blocks and embed_dim in timm's registry: build the class directly
    return MlpMixer(num_classes=CLASSES, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)


def _caformer() -> nn.Module:
    # caformer_* names fix their depths and widths: build a two-conv-stage, two-attention-stage one directly
    return MetaFormer(
        num_classes=CLASSES,
        depths=ONES,
        dims=(16, 16, 32, 32),
        token_mixers=[SepConv, SepConv, Attention, Attention],
        norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2,
    )


def _mvitv2() -> nn.Module:
    # mvitv2_* names fix their config: build a one-block-per-stage one directly
    return MultiScaleVit(
        MultiScaleVitCfg(depths=ONES, embed_dim=16, num_heads=1), img_size=(64, 64), num_classes=CLASSES
    )


# registered class name -> (timm model name or builder, create_model keyword arguments, image size)
TINY: dict[str, tuple[str | Callable[[], nn.Module], dict[str, Any], int]] = {
    "VisionTransformer": ("vit_tiny_patch16_224", VIT, 32),
    "VisionTransformerDistilled": ("deit_tiny_distilled_patch16_224", SMALL_VIT, 32),
    "Eva": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28),
    "Beit": ("beit_base_patch16_224", SMALL_VIT, 32),
    "Cait": ("cait_xxs24_224", {**SMALL_VIT, "depth_token_only": 1}, 32),
    "Xcit": ("xcit_nano_12_p16_224", {"img_size": 32, "depth": 2}, 32),
    "CrossVit": ("crossvit_tiny_240", {"img_size": 120, "depth": [[1, 1, 0]] * 2}, 120),
    "MlpMixer": (_mixer, {}, 32),
    "Hiera": ("hiera_tiny_224", {"img_size": 64, "embed_dim": 16, "stages": ONES}, 64),
    "Levit": (
        "levit_128s",
        {"img_size": 64, "distilled": False, "embed_dim": (32, 48, 64), "depth": (1, 1, 1), "num_heads": (1, 1, 1)},
        64,
    ),
    "LevitDistilled": (
        "levit_conv_128s",
        {"img_size": 64, "embed_dim": (32, 48, 64), "depth": (1, 1, 1), "num_heads": (1, 1, 1), "key_dim": 8},
        64,
    ),
    "SwinTransformer": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 56, "depths": (1, 1, 2, 1), "embed_dim": 16, "num_heads": ONES},
        56,
    ),
    "SwinTransformerV2": (
        "swinv2_tiny_window8_256",
        {"img_size": 32, "depths": ONES, "embed_dim": 16, "num_heads": ONES, "window_size": 4},
        32,
    ),
    "SwinTransformerV2Cr": (
        "swinv2_cr_tiny_224",
        {"img_size": 64, "depths": ONES, "embed_dim": 16, "num_heads": ONES, "window_size": 2},
        64,
    ),
    "MaxxVit": ("coatnet_pico_rw_224", {"img_size": 64}, 64),
    "MetaFormer": (_caformer, {}, 32),
    "MultiScaleVit": (_mvitv2, {}, 64),
    "ByobNet": ("mobilevit_xxs", {}, 64),
    "FastVit": ("fastvit_t8", {"layers": ONES}, 32),
    "EdgeNeXt": ("edgenext_xx_small", {"depths": ONES}, 32),
    "EfficientVit": ("efficientvit_b0", {"depths": (1, 1, 1, 1, 1)}, 32),
    "EfficientVitLarge": (
        "efficientvit_l1",
        {"widths": (8, 16, 32, 32, 64), "depths": (1, 1, 1, 1, 1), "head_dim": 8, "head_widths": (32, 32)},
        32,
    ),
    "EfficientVitMsra": ("efficientvit_m0", {"img_size": 64}, 64),
    "PyramidVisionTransformerV2": ("pvt_v2_b0", {"depths": ONES}, 32),
    "Twins": (
        "twins_svt_small",
        {"img_size": 64, "depths": (1, 2, 1, 1), "embed_dims": (16, 32, 64, 64), "num_heads": ONES},
        64,
    ),
    "DaVit": ("davit_tiny", {"depths": ONES, "embed_dims": (16, 32, 64, 64), "num_heads": ONES}, 32),
    "ResNet": ("resnet10t", {}, 32),
    "ResNetV2": ("resnetv2_50", {"layers": ONES}, 32),
    "TResNet": ("tresnet_m", {"layers": ONES}, 64),
    "ConvNeXt": ("convnext_atto", {"depths": (1, 1, 2, 1), "dims": (8, 16, 32, 32)}, 32),
    "RegNet": ("regnetx_002", {}, 32),
    "EfficientNet": ("efficientnet_b0", {}, 32),
    "EfficientNetFeatures": ("efficientnet_b0", {"features_only": True}, 32),
    "MobileNetV3": ("mobilenetv3_small_050", {}, 32),
    "MobileNetV3Features": ("mobilenetv4_conv_small_035", {"features_only": True}, 32),
    "GhostNet": ("ghostnet_050", {}, 32),
    "DenseNet": ("densenet121", {"block_config": ONES, "growth_rate": 8}, 32),
    "VGG": ("vgg11", {"mlp_ratio": 0.0625}, 32),
    "InceptionV3": ("inception_v3", {}, 75),
    "InceptionV4": ("inception_v4", {}, 75),
    "InceptionResnetV2": ("inception_resnet_v2", {}, 75),
    "HighResolutionNet": ("hrnet_w18_small", {}, 64),
    "HighResolutionNetFeatures": ("hrnet_w18_small", {"features_only": True, "feature_location": ""}, 64),
}

# classes whose token sequences are not in raster order (Hiera keeps mask-unit order): compared as sets
UNROLLED = {"Hiera"}


def build(name: str | Callable[[], nn.Module], **kwargs: Any) -> nn.Module:
    """A tiny random model in eval mode, with five classes unless it is ``features_only``.

    A classifier that timm initialises to zeros (MLP-Mixer, GhostNet) gets random weights, so that
    the logits depend on the input.
    """
    torch.manual_seed(0)
    if callable(name):
        model = name()
    else:
        if not kwargs.get("features_only"):
            kwargs.setdefault("num_classes", CLASSES)
        model = timm.create_model(name, pretrained=False, **kwargs)
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) and not kwargs.get("features_only") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and not weight.any():
        with torch.no_grad():
            weight.normal_(0, 0.1)
    return model.eval()


def tiny(class_name: str, cache: dict[str, nn.Module]) -> tuple[nn.Module, Tensor]:
    """The tiny instance of a registered class (built once into ``cache``) and a batch of two images."""
    name, kwargs, size = TINY[class_name]
    if class_name not in cache:
        cache[class_name] = build(name, **dict(kwargs))
    return cache[class_name], torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@contextmanager
def capturing(model: nn.Module, sites: Sequence[tdsteer.Site]) -> Iterator[dict[str, Tensor]]:
    """Record each site's tensor (a copy, taken when its module returns) while the block runs."""
    seen: dict[str, Tensor] = {}
    handles = []
    for site in sites:

        def hook(module: nn.Module, args: Any, output: Any, site: tdsteer.Site = site) -> None:
            seen.setdefault(site.key, site.select(output).detach().clone())

        handles.append(site.module(model).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def as_map(activation: Tensor, site: tdsteer.Site, reference: Tensor) -> Tensor:
    """A site's activation as timm's ``NCHW`` intermediate (prefix tokens dropped)."""
    if site.layout == "NCHW":
        return activation
    if site.layout == "NHWC":
        return activation.permute(0, 3, 1, 2)
    patches = activation[:, site.prefix_tokens :]
    if reference.ndim == 3:
        return patches
    batch, channels, height, width = reference.shape
    return patches.transpose(1, 2).reshape(batch, channels, height, width)


def assert_is_intermediate(activation: Tensor, record: SiteInfo, reference: Tensor, *, unrolled: bool = False) -> None:
    """The site's activation is timm's intermediate of the same index, under the site's layout."""
    site = record.site
    assert reference.shape[1] == record.num_chs, (record, tuple(reference.shape))
    if unrolled:  # the same tokens, in another order
        tokens = reference.flatten(2).transpose(1, 2)
        assert activation[:, site.prefix_tokens :].shape == tokens.shape, (record, tuple(activation.shape))
        torch.testing.assert_close(activation[:, site.prefix_tokens :].sort(1).values, tokens.sort(1).values)
        return
    assert activation.shape[0] == reference.shape[0], (record, tuple(activation.shape))
    torch.testing.assert_close(as_map(activation, site, reference), reference, msg=lambda m: f"{record}: {m}")


def assert_layout(activation: Tensor, record: SiteInfo) -> None:
    """A block's tensor has the declared layout: channels at the channel dim, tokens after the prefix."""
    site = record.site
    assert activation.dim() == (3 if site.layout == "NLC" else 4), (record, tuple(activation.shape))
    assert activation.shape[site.channel_dim] == record.num_chs, (record, tuple(activation.shape))
    if site.layout == "NLC":
        assert activation.shape[1] > site.prefix_tokens, (record, tuple(activation.shape))
    else:  # a square input gives square maps: the spatial dims are the two that are not channels
        spatial = activation.shape[2:] if site.layout == "NCHW" else activation.shape[1:3]
        assert spatial[0] == spatial[1], (record, tuple(activation.shape))


def channel_shift(vector: Tensor, site: tdsteer.Site, like: Tensor) -> Tensor:
    """``vector`` broadcast along the channel dimension of an activation shaped like ``like``."""
    shape = [1] * like.dim()
    shape[site.channel_dim] = vector.shape[0]
    return vector.reshape(shape).expand_as(like)


def logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return torch.cat([o.flatten(1) for o in out], 1) if isinstance(out, (list, tuple)) else out


def check_steering(model: nn.Module, x: Tensor, record: SiteInfo, base: Tensor, activation: Tensor) -> None:
    site = record.site
    assert record.num_chs is not None
    vector = torch.randn(record.num_chs, generator=torch.Generator().manual_seed(record.index))
    scale = 3.0
    with torch.no_grad(), tdsteer.steer(model, {site: vector}, scale=scale):
        with capturing(model, [site]) as seen:  # hooked after the steering hook: sees the steered tensor
            steered = logits(model, x)
    shift = seen[site.key] - activation
    atol = 1e-5 * max(1.0, float(activation.abs().max()))  # (a + d) - a rounds at the scale of a
    torch.testing.assert_close(shift, scale * channel_shift(vector, site, shift), atol=atol, rtol=1e-4)
    assert not torch.equal(steered, base), f"steering {site.key} did not move the output"
    with torch.no_grad():
        assert torch.equal(logits(model, x), base), "the output did not come back after the context"
    if site.layout == "NLC" and site.prefix_tokens:  # patch tokens only: the prefix tokens stay as they are
        with torch.no_grad(), tdsteer.steer(model, {site: vector}, scale=scale, positions=site.prefix_tokens):
            with capturing(model, [site]) as seen:
                model(x)
        shift = seen[site.key] - activation
        assert shift[:, : site.prefix_tokens].abs().max() == 0
        expected = scale * channel_shift(vector, site, shift[:, site.prefix_tokens :])
        torch.testing.assert_close(shift[:, site.prefix_tokens :], expected, atol=atol, rtol=1e-4)


def check_against_timm(
    model: nn.Module, x: Tensor, *, unrolled: bool = False, fallback: bool = False
) -> ModelDescription:
    """The whole check of one model: stage sites are timm's intermediates, blocks have their layouts,
    steering a middle block and the last stage adds exactly ``scale * v`` and moves the output only
    inside the context. Returns the model's description (the fallback's for ``fallback=True``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if fallback else "error")
        info = tdsteer_timm.describe(model, fallback=fallback)
    blocks, stages = info.of_kind("block"), info.of_kind("stage")
    assert [r.index for r in stages] == [r.stage for r in stages] == list(range(len(stages)))
    assert [r.index for r in blocks] == list(range(len(blocks))) and info.hidden_size == blocks[-1].num_chs
    assert all(r.stage is None or 0 <= r.stage < len(stages) for r in blocks)

    # every stage site is timm's intermediate of the same index
    intermediates_of = getattr(model, "forward_intermediates", None)
    with torch.no_grad(), capturing(model, [r.site for r in stages]) as seen:
        if callable(intermediates_of):
            references = dict(enumerate(intermediates_of(x, intermediates_only=True)))
            assert len(references) == len(stages), [r.path for r in stages]
        else:  # a features_only model: its forward returns the features at out_indices, in timm's numbering
            indices = list(model.feature_info.out_indices)  # type: ignore[union-attr]
            out = model(x)
            references = dict(zip(indices, out.values() if isinstance(out, dict) else out))
            assert max(indices) == len(stages) - 1, [r.path for r in stages]
    for index, reference in references.items():
        record = stages[index]
        if isinstance(model, FeatureDictNet):  # these wrappers return each module's tensor as it is
            torch.testing.assert_close(seen[record.site.key], reference)
        else:
            assert_is_intermediate(seen[record.site.key], record, reference, unrolled=unrolled)

    # every block has its declared layout; steering a block and a stage adds exactly scale * v there
    with torch.no_grad(), capturing(model, [r.site for r in blocks]) as seen:
        base = logits(model, x)
    assert set(seen) == {r.site.key for r in blocks}, "some blocks never ran in a forward pass"
    for record in blocks:
        assert_layout(seen[record.site.key], record)
    block = blocks[len(blocks) // 2]
    check_steering(model, x, block, base, seen[block.site.key])
    with torch.no_grad(), capturing(model, [stages[-1].site]) as seen:
        model(x)
    check_steering(model, x, stages[-1], base, seen[stages[-1].site.key])
    return info
