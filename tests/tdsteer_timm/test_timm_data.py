"""contrastive_batches: the extract batch format for images."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import timm
import torch

import tdsteer
import tdsteer_timm


def test_batches_are_reiterable_and_paired() -> None:
    positive, negative = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    batches = tdsteer_timm.contrastive_batches(positive, negative, batch_size=2)
    assert len(batches) == 3
    first = [b["positive"].shape[0] for b in batches]
    second = list(batches)
    assert first == [2, 2, 1] and len(second) == 3
    assert torch.equal(torch.cat([b["negative"] for b in second]), negative)
    assert set(second[0]) == {"positive", "negative"}


def test_sequence_of_images_is_stacked() -> None:
    images = [torch.randn(3, 8, 8) for _ in range(3)]
    batches = tdsteer_timm.contrastive_batches(images, images, batch_size=4)
    assert [b["positive"].shape for b in batches] == [torch.Size([3, 3, 8, 8])]


@pytest.mark.parametrize(
    ("positive", "negative", "batch_size", "match"),
    [
        (torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8), 2, "same number"),
        (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), 2, "same transform"),
        (torch.randn(2, 8, 8), torch.randn(2, 8, 8), 2, r"\[N, C, H, W\]"),
        (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), 0, "batch_size"),
    ],
)
def test_bad_inputs(positive: torch.Tensor, negative: torch.Tensor, batch_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tdsteer_timm.contrastive_batches(positive, negative, batch_size=batch_size)


def test_the_signature_is_the_contract_of_tdsteer_hf() -> None:
    # docs/adapters.md: one name means one thing in both adapters; batch_size is keyword-only, 16 by default
    tdsteer_hf = pytest.importorskip("tdsteer_hf")
    ours = inspect.signature(tdsteer_timm.contrastive_batches).parameters["batch_size"]
    theirs = inspect.signature(tdsteer_hf.contrastive_batches).parameters["batch_size"]
    assert (ours.kind, ours.default) == (theirs.kind, theirs.default) == (inspect.Parameter.KEYWORD_ONLY, 16)
    images = torch.zeros(40, 3, 4, 4)
    assert [b["positive"].shape[0] for b in tdsteer_timm.contrastive_batches(images, images)] == [16, 16, 8]
    with pytest.raises(TypeError, match="positional"):
        tdsteer_timm.contrastive_batches(images, images, 8)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "kind", "read"),
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, "block", "cls"),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, "block", "patch_mean"),
        ("resnet18", {}, 32, "stage", "spatial_mean"),
        (
            "swin_tiny_patch4_window7_224",
            {"img_size": 56, "depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1, 1, 1, 1)},
            56,
            "block",
            "spatial_mean",
        ),
    ],
    ids=["vit-cls", "vit-patch_mean", "resnet-stage", "swin-nhwc"],
)
def test_extract_then_steer(name: str, kwargs: dict[str, Any], size: int, kind: str, read: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    positive, negative = torch.randn(4, 3, size, size) + 1.0, torch.randn(4, 3, size, size) - 1.0
    batches = tdsteer_timm.contrastive_batches(positive, negative, batch_size=2)
    site = tdsteer_timm.sites(model, -1, kind=kind)[0]
    vector = tdsteer.extract(model, batches, [site], method="mean_diff", read=read, progress=False)
    direction = vector[site.key]
    assert direction.shape == (tdsteer_timm.describe(model).of_kind(kind)[-1].num_chs,)
    assert torch.isfinite(direction).all() and direction.norm() > 0
    assert vector.sites[site.key].layout == site.layout
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        base = model(x)
        with tdsteer.steer(model, vector, scale=4.0):
            steered = model(x)
    assert not torch.allclose(base, steered, atol=1e-4)


TINY_TOKENS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize(
    ("name", "kwargs", "prefix"),
    [
        ("vit_base_patch16_siglip_224", TINY_TOKENS, 0),  # no class token
        ("vit_base_patch16_reg4_gap_256", TINY_TOKENS, 4),  # four registers, no class token
        ("cait_xxs24_224", {**TINY_TOKENS, "depth_token_only": 1}, 0),  # the class token joins after blocks
    ],
    ids=["siglip", "registers", "cait"],
)
def test_read_cls_is_refused_where_token_0_is_no_class_token(name: str, kwargs: dict[str, Any], prefix: int) -> None:
    # docs/timm-models.md: from Python too, read="cls" is refused before any forward pass
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    site = tdsteer_timm.sites(model, -1)[0]
    assert (site.layout, site.prefix_tokens, site.class_token) == ("NLC", prefix, False)
    images = torch.randn(2, 3, 32, 32)
    batches = tdsteer_timm.contrastive_batches(images, -images, batch_size=2)
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="has no class token there") as refused:
            tdsteer.extract(model, batches, [site], read="cls", progress=False)
        assert "read='patch_mean'" in str(refused.value) and "read='mean'" in str(refused.value)
        assert not calls
        # a Site built by hand (class_token unset) is read at its first token as it is
        by_hand = tdsteer.Site(site.path, layout="NLC", prefix_tokens=site.prefix_tokens)
        vector = tdsteer.extract(model, batches, [by_hand], read="cls", progress=False)
    finally:
        hook.remove()
    seen: list[torch.Tensor] = []
    handle = by_hand.module(model).register_forward_hook(lambda m, a, out: seen.append(out[:, 0]))
    with torch.no_grad():
        model(images), model(-images)
    handle.remove()
    torch.testing.assert_close(vector[by_hand.key], (seen[0] - seen[1]).mean(0))
