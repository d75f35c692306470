"""contrastive_batches: the extract batch format for images."""

from __future__ import annotations

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
        tdsteer_timm.contrastive_batches(positive, negative, batch_size)


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
