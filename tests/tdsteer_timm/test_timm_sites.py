"""Every registered timm family: sites resolve, hooks see the declared layout, steering moves the logits."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch import nn

import tdsteer
import tdsteer_timm
from tdsteer.adapter import Adapter, ModelDescription

# name, create_model kwargs, image size, family, expected stage paths (None: don't check)
CASES: list[tuple[str, dict[str, Any], int, str, list[str] | None]] = [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, "vit", ["blocks.0", "blocks.1"]),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, "vit", None),
    ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28, "vit", None),
    (
        "beit_base_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        32,
        "vit",
        None,
    ),
    ("resnet18", {}, 32, "resnet", ["layer1", "layer2", "layer3", "layer4"]),
    ("convnext_atto", {}, 32, "convnext", ["stages.0", "stages.1", "stages.2", "stages.3"]),
    (
        "swin_tiny_patch4_window7_224",
        {"img_size": 56, "depths": (1, 1, 2, 1), "embed_dim": 16, "num_heads": (1, 1, 1, 1)},
        56,
        "swin",
        ["layers.0", "layers.1", "layers.2", "layers.3"],
    ),
    (
        "swinv2_tiny_window8_256",
        {"img_size": 32, "depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1, 1, 1, 1), "window_size": 4},
        32,
        "swin",
        None,
    ),
    ("efficientnet_b0", {}, 32, "efficientnet", ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
    ("mobilenetv3_small_050", {}, 32, "efficientnet", ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]),
    ("regnetx_002", {}, 32, "regnet", ["s1", "s2", "s3", "s4"]),
]
IDS = [case[0] for case in CASES]
_MODELS: dict[str, nn.Module] = {}


def _model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    return _MODELS[name]


def _check_layout(site: tdsteer.Site, channels: int, x: torch.Tensor) -> None:
    assert x.dim() == (3 if site.layout == "NLC" else 4), (site, tuple(x.shape))
    assert x.shape[site.channel_dim] == channels, (site, tuple(x.shape))
    if site.layout == "NLC":
        assert x.shape[1] > site.prefix_tokens
    else:  # a feature map: the two spatial dims are equal for a square input, and not the channel dim
        spatial = x.shape[2:] if site.layout == "NCHW" else x.shape[1:3]
        assert spatial[0] == spatial[1], (site, tuple(x.shape))


@pytest.mark.parametrize(("name", "kwargs", "size", "family", "stages"), CASES, ids=IDS)
def test_family_sites_layout_and_steering(
    name: str, kwargs: dict[str, Any], size: int, family: str, stages: list[str] | None
) -> None:
    model = _model(name, kwargs)
    info = tdsteer_timm.describe(model)
    assert isinstance(info, ModelDescription)
    assert info.architecture == family and info.source == "registry" and not info.guessed
    assert info.adapter == "tdsteer_timm" and info.model_class == type(model).__name__
    assert info.kinds == tdsteer_timm.SITE_KINDS == ("block", "stage") and info.default_kind == "block"
    blocks, stage_records = info.of_kind("block"), info.of_kind("stage")
    if stages is not None:
        assert [s.path for s in stage_records] == stages
    assert tdsteer_timm.num_layers(model, "block") == len(blocks) >= len(stage_records) >= 1
    assert tdsteer_timm.num_layers(model, "stage") == len(stage_records)
    assert [r.index for r in blocks] == list(range(len(blocks)))
    assert [r.index for r in stage_records] == list(range(len(stage_records)))
    assert info.hidden_size == blocks[-1].num_chs

    channels: dict[str, int] = {}
    for record in blocks + stage_records:
        assert record.num_chs is not None and record.num_chs > 0, record
        channels[record.path] = record.num_chs
    all_sites = tdsteer_timm.sites(model) + [
        s for s in tdsteer_timm.sites(model, kind="stage") if s.path not in {b.path for b in blocks}
    ]
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for site in all_sites:
        module = site.module(model)  # every block and stage path resolves
        handles.append(module.register_forward_hook(lambda m, a, out, key=site.key: seen.__setitem__(key, out)))
    x = torch.randn(2, 3, size, size)
    try:
        with torch.no_grad():
            base = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == {s.key for s in all_sites}, "some sites never ran"
    for site in all_sites:
        _check_layout(site, channels[site.path], seen[site.key])
        if site.layout == "NLC":
            assert site.prefix_tokens == model.num_prefix_tokens

    # steering at the middle block and the last stage moves the logits; leaving the context restores them
    for site in (tdsteer_timm.sites(model, len(blocks) // 2)[0], tdsteer_timm.sites(model, -1, "stage")[0]):
        vector = torch.randn(channels[site.path], generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), tdsteer.steer(model, {site: vector}, scale=8.0):
            steered = model(x)
        assert not torch.allclose(steered, base, atol=1e-4), site
        with torch.no_grad():
            assert torch.allclose(model(x), base)


def test_deit_inherits_vit_entry_with_two_prefix_tokens() -> None:
    model = _model(CASES[1][0], CASES[1][1])
    assert type(model).__name__ == "VisionTransformerDistilled"
    assert "VisionTransformerDistilled" not in tdsteer_timm.supported()
    assert {s.prefix_tokens for s in tdsteer_timm.sites(model)} == {2}


def test_channels_per_block_follow_the_stage() -> None:
    model = _model("efficientnet_b0", {})
    info = tdsteer_timm.describe(model)
    by_path = {r.path: r.num_chs for r in info.of_kind("block")}
    assert by_path["blocks.3.0"] == 80 and by_path["blocks.6.0"] == 320  # blocks.3 is not in feature_info
    assert info.of_kind("block")[-1].stage == 6
    resnet = tdsteer_timm.describe(_model("resnet18", {}))
    assert [(r.path, r.num_chs, r.stage) for r in resnet.of_kind("block")[2:4]] == [
        ("layer2.0", 128, 1),
        ("layer2.1", 128, 1),
    ]
    assert resnet.site_sizes()["layer2.0"] == 128 and resnet.site_sizes()["layer4"] == 512


def test_index_rule_matches_take_indices() -> None:
    model = _model("resnet18", {})
    assert [s.path for s in tdsteer_timm.sites(model, [0, -1])] == ["layer1.0", "layer4.1"]
    assert [s.path for s in tdsteer_timm.sites(model, slice(1, 3), kind="stage")] == ["layer2", "layer3"]
    assert [s.path for s in tdsteer_timm.sites(model, 2)] == ["layer2.0"]  # one layer, not timm's "last 2"
    assert [s.path for s in tdsteer_timm.sites(model, slice(-2, None), "stage")] == ["layer3", "layer4"]
    assert [s.path for s in tdsteer_timm.sites(model, [0, slice(-2, None)])] == ["layer1.0", "layer4.0", "layer4.1"]
    assert all(s.layout == "NCHW" and s.prefix_tokens == 0 for s in tdsteer_timm.sites(model))


@pytest.mark.parametrize(("layers", "kind"), [(8, "block"), (-9, "block"), (4, "stage"), ([0, 5], "stage")])
def test_index_out_of_range(layers: Any, kind: str) -> None:
    with pytest.raises(IndexError, match="layer index .* out of range"):
        tdsteer_timm.sites(_model("resnet18", {}), layers, kind=kind)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind 'layer'; use one of block, stage"):
        tdsteer_timm.sites(_model("resnet18", {}), kind="layer")
    with pytest.raises(ValueError, match="kind"):
        tdsteer_timm.num_layers(_model("resnet18", {}), "layer")


def test_module_meets_the_adapter_contract() -> None:
    assert isinstance(tdsteer_timm, Adapter)
    adapter: Adapter = tdsteer_timm  # and for mypy: the signatures match the protocol
    assert adapter.num_layers(_model("resnet18", {})) == 8
    assert tdsteer_timm.DEFAULT_KIND == "block" and tdsteer_timm.DEFAULT_KIND in tdsteer_timm.SITE_KINDS
    assert tdsteer_timm.supported() == sorted(tdsteer_timm.supported())
    assert {"ResNet", "VisionTransformer", "ConvNeXt", "SwinTransformer"} <= set(tdsteer_timm.supported())
    for gone in ("register_arch", "supported_classes", "image_batches", "ArchInfo", "SiteInfo"):
        assert not hasattr(tdsteer_timm, gone), gone
