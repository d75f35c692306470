"""Every registered timm class, checked against timm itself: each stage site's activation is timm's
``forward_intermediates`` output of the same index, each block's tensor has the declared layout, and
steering adds exactly ``scale * v`` along the channel dimension, moving the logits only inside the context."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from timm.models.metaformer import MetaFormer
from timm_tiny import SMALL_VIT, TINY, UNROLLED, VIT, build, check_against_timm, tiny
from torch import nn

import tdsteer_timm
from tdsteer_timm.description import resolve


@pytest.fixture(scope="module")
def cache() -> Iterator[dict[str, nn.Module]]:
    """The tiny models of this module, each built once."""
    built: dict[str, nn.Module] = {}
    yield built
    built.clear()


def test_every_registered_class_has_a_tiny_case() -> None:
    assert sorted(TINY) == tdsteer_timm.supported()
    assert len(TINY) >= 35


@pytest.mark.parametrize("class_name", sorted(TINY))
def test_registered_class_matches_timm(class_name: str, cache: dict[str, nn.Module]) -> None:
    model, x = tiny(class_name, cache)
    assert type(model).__name__ == class_name
    info = check_against_timm(model, x, unrolled=class_name in UNROLLED)
    assert info.source == "registry" and not info.guessed and info.model_class == class_name


def _poolformer() -> nn.Module:
    # poolformer_* names fix their depths and widths: the default MetaFormer token mixer is pooling
    return MetaFormer(num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 16, 32))


# model, create_model keyword arguments, image size, prefix tokens at the blocks, class token first
VARIANTS: list[tuple[str | Callable[[], nn.Module], dict[str, Any], int, int, bool]] = [
    ("deit3_small_patch16_224", SMALL_VIT, 32, 1, True),
    ("flexivit_small", SMALL_VIT, 32, 1, True),
    ("vit_base_patch16_siglip_224", SMALL_VIT, 32, 0, False),
    ("vit_base_patch16_reg4_gap_256", SMALL_VIT, 32, 4, False),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 32, "num_heads": 2}, 28, 5, True),
    ("vit_tiny_r_s16_p8_224", {"img_size": 64, "depth": 2}, 64, 1, True),
    ("convnextv2_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 32)}, 32, 0, False),
    ("mobilenetv4_conv_small_035", {}, 32, 0, False),
    ("maxvit_pico_rw_256", {"img_size": 64}, 64, 0, False),
    (_poolformer, {}, 32, 0, False),
    ("mobilevitv2_050", {}, 64, 0, False),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "prefix", "class_token"),
    VARIANTS,
    ids=[name if isinstance(name, str) else name.__name__.strip("_") for name, *_ in VARIANTS],
)
def test_variants_match_timm(name: Any, kwargs: dict[str, Any], size: int, prefix: int, class_token: bool) -> None:
    model = build(name, **dict(kwargs))
    info = check_against_timm(model, torch.randn(2, 3, size, size))
    assert {r.site.prefix_tokens for r in info.sites} == {prefix}
    assert resolve(model, False).class_token is class_token


# features_only=True: model name, create_model keyword arguments, image size, wrapper class, first stage path
FEATURES: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("resnet10t", {}, 32, "FeatureListNet", "act1"),
    ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 32)}, 32, "FeatureListNet", "stages_0"),
    ("swin_tiny_patch4_window7_224", TINY["SwinTransformer"][1], 56, "FeatureListNet", "layers_0"),
    ("densenet121", TINY["DenseNet"][1], 32, "FeatureListNet", "features_norm0"),
    ("mobilevit_xxs", {"out_indices": (1, 2)}, 64, "FeatureListNet", "stages_0"),
    ("vit_tiny_patch16_224", {**VIT, "depth": 3, "out_indices": (1,)}, 32, "FeatureGetterNet", "model.blocks.0"),
    ("twins_svt_small", TINY["Twins"][1], 64, "FeatureGetterNet", "model.pos_block.0"),
    ("crossvit_tiny_240", TINY["CrossVit"][1], 120, "FeatureGetterNet", "model.blocks.0"),
]


@pytest.mark.parametrize(("name", "kwargs", "size", "wrapper", "first"), FEATURES, ids=[f[0] for f in FEATURES])
def test_features_only_models_match_timm(
    name: str, kwargs: dict[str, Any], size: int, wrapper: str, first: str
) -> None:
    model = build(name, features_only=True, **dict(kwargs))
    assert type(model).__name__ == wrapper
    info = check_against_timm(model, torch.randn(2, 3, size, size))
    assert info.source == "registry" and info.model_class == wrapper and info.of_kind("stage")[0].path == first
    full = build(name, **{k: v for k, v in kwargs.items() if k != "out_indices"})
    whole = tdsteer_timm.describe(full)
    assert info.architecture == whole.architecture
    # the same numbering as the full model, up to the wrapper's last output
    count = info.num_layers("stage")
    assert [r.num_chs for r in info.of_kind("stage")] == [r.num_chs for r in whole.of_kind("stage")[:count]]
    assert [r.site.layout for r in info.sites] == [r.site.layout for r in whole.sites if r.kind == "block"][
        : info.num_layers("block")
    ] + [r.site.layout for r in whole.of_kind("stage")[:count]]
