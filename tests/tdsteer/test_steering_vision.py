"""positions="patches" and "prefix": per-site masks from each site's prefix tokens (issue 12, item 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tdsteer
from tdsteer import Site


class ToyViT(nn.Module):
    """Two token blocks (one with a class token, one with a class and two register tokens) and a conv stage."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 5, 4]
        x = self.blocks[1](self.blocks[0](x))
        return self.conv(x[:, 1:].transpose(1, 2).reshape(x.shape[0], 4, 2, 2))


SITES = [
    Site("blocks.0", prefix_tokens=1),
    Site("blocks.1", prefix_tokens=3),
    Site("conv", layout="NCHW"),
]


def _outputs(model: ToyViT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(site.path).register_forward_hook(
            lambda m, a, out, key=site.key: seen.__setitem__(key, out.detach().clone())
        )
        for site in SITES
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _steered_positions(policy: str) -> dict[str, list[bool]]:
    """Which positions of each site change under ``policy`` (each site steered on its own)."""
    torch.manual_seed(0)
    model = ToyViT().eval()
    x = torch.randn(2, 5, 4)
    changed = {}
    for site in SITES:
        plain = _outputs(model, x)[site.key]
        # a zero vector on the first block gives every context a site with prefix tokens ("prefix" needs one)
        vectors = {site: torch.ones(4)} if site == SITES[0] else {site: torch.ones(4), SITES[0]: torch.zeros(4)}
        with tdsteer.steer(model, vectors, positions=policy):
            steered = _outputs(model, x)[site.key]
        delta = (steered - plain).abs()
        per_position = delta.sum(1).flatten(1) if site.layout == "NCHW" else delta.sum(-1)
        changed[site.key] = (per_position > 0).all(0).tolist()
    return changed


def test_patches_steers_from_each_sites_own_prefix_tokens() -> None:
    assert _steered_positions("patches") == {
        "blocks.0": [False, True, True, True, True],
        "blocks.1": [False, False, False, True, True],
        "conv": [True, True, True, True],  # a feature map: every position
    }


def test_prefix_steers_the_class_and_register_tokens_only() -> None:
    assert _steered_positions("prefix") == {
        "blocks.0": [True, False, False, False, False],
        "blocks.1": [True, True, True, False, False],
        "conv": [False, False, False, False],  # a feature map has no prefix tokens
    }


def test_prefix_needs_a_site_with_prefix_tokens() -> None:
    model = ToyViT()
    with pytest.raises(ValueError, match="no site has any"):
        tdsteer.steer(
            model, {Site("conv", layout="NCHW"): torch.ones(4), "blocks.0": torch.ones(4)}, positions="prefix"
        )
    handle = tdsteer.steer(model, {"blocks.0": torch.ones(4)})
    with pytest.raises(ValueError, match="no site has any"):
        handle.set(positions="prefix")
    handle.set(positions="patches")  # with no prefix tokens, every position: fine, and needs no tracking


def test_patches_and_prefix_switch_while_open_without_tracking() -> None:
    torch.manual_seed(0)
    model = ToyViT().eval()
    x = torch.randn(1, 5, 4)
    site = SITES[1]
    plain = _outputs(model, x)[site.key]
    handle = tdsteer.steer(model, {site: torch.ones(4)}, positions="prefix")
    with handle:
        prefix = _outputs(model, x)[site.key] - plain
        handle.set(positions="patches")
        patches = _outputs(model, x)[site.key] - plain
        assert not any(m._forward_pre_hooks for m in model.modules())  # no position tracking was installed
    torch.testing.assert_close(prefix + patches, torch.ones_like(plain), rtol=0, atol=1e-6)


def test_timm_vit_patches_and_prefix() -> None:
    timm = pytest.importorskip("timm")
    tdsteer_timm = pytest.importorskip("tdsteer_timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()
    (site,) = tdsteer_timm.sites(model, -1)
    assert site.prefix_tokens == 1
    images = torch.randn(2, 3, 32, 32)
    block = model.get_submodule(site.path)
    seen: list[torch.Tensor] = []
    hook = block.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(images)
            for policy in ("patches", "prefix", "all"):
                with tdsteer.steer(model, {site: torch.ones(192)}, scale=2.0, positions=policy):
                    model(images)
    finally:
        hook.remove()
    plain, patches, prefix, every = (out - seen[0] for out in seen)
    assert patches.shape[1] == 17  # a class token and 16 patches
    torch.testing.assert_close(patches[:, 1:], torch.full_like(patches[:, 1:], 2.0), rtol=0, atol=1e-5)
    assert patches[:, 0].abs().max() == 0
    torch.testing.assert_close(prefix[:, :1], torch.full_like(prefix[:, :1], 2.0), rtol=0, atol=1e-5)
    assert prefix[:, 1:].abs().max() == 0
    torch.testing.assert_close(patches + prefix, every, rtol=0, atol=1e-5)
    assert plain.abs().max() == 0
