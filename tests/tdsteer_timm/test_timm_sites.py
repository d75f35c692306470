"""Sites by index: the adapter contract's index rule, timm's stage numbering, channels and kinds."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from timm.models._features import feature_take_indices
from timm_tiny import capturing
from torch import nn

import tdsteer_timm
from tdsteer.adapter import Adapter

_MODELS: dict[str, nn.Module] = {}


def _model(name: str, **kwargs: Any) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    return _MODELS[name]


def test_stage_numbering_is_timms() -> None:
    model = _model("resnet18")
    stages = tdsteer_timm.describe(model).of_kind("stage")
    assert [r.path for r in stages] == [e["module"] for e in model.feature_info]  # the stem is stage 0
    assert [(r.index, r.stage, r.num_chs) for r in stages] == [
        (i, i, e["num_chs"]) for i, e in enumerate(model.feature_info)
    ]
    x = torch.randn(1, 3, 32, 32)
    for index in (0, 1, 4):
        site = tdsteer_timm.sites(model, index, kind="stage")[0]
        with torch.no_grad(), capturing(model, [site]) as seen:
            (timm_out,) = model.forward_intermediates(x, indices=[index], intermediates_only=True)
        torch.testing.assert_close(seen[site.key], timm_out)
    # an int is one index in tdsteer, "the last n" in timm
    assert list(feature_take_indices(5, 2)[0]) == [3, 4]
    assert [s.path for s in tdsteer_timm.sites(model, 2, kind="stage")] == ["layer2"]
    assert [s.path for s in tdsteer_timm.sites(model, slice(-2, None), kind="stage")] == ["layer3", "layer4"]


def test_blocks_record_the_stage_that_holds_them() -> None:
    resnet = tdsteer_timm.describe(_model("resnet18"))
    assert [(r.path, r.num_chs, r.stage) for r in resnet.of_kind("block")[2:4]] == [
        ("layer2.0", 128, 2),
        ("layer2.1", 128, 2),
    ]
    assert resnet.site_sizes()["layer2.0"] == 128 and resnet.site_sizes()["layer4"] == 512
    info = tdsteer_timm.describe(_model("efficientnet_b0"))
    by_path = {r.path: (r.num_chs, r.stage) for r in info.of_kind("block")}
    assert by_path["blocks.3.0"] == (80, 3)  # blocks.3 is no feature stage: it belongs to the next, blocks.4
    assert by_path["blocks.6.0"] == (320, 4)


def test_deit_inherits_vit_entry_with_two_prefix_tokens() -> None:
    model = _model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2)
    assert type(model).__name__ == "VisionTransformerDistilled"
    assert {s.prefix_tokens for s in tdsteer_timm.sites(model)} == {2}
    assert {s.prefix_tokens for s in tdsteer_timm.sites(model, kind="stage")} == {2}


def test_index_rule_matches_take_indices() -> None:
    model = _model("resnet18")
    assert [s.path for s in tdsteer_timm.sites(model, [0, -1])] == ["layer1.0", "layer4.1"]
    assert [s.path for s in tdsteer_timm.sites(model, slice(1, 3), kind="stage")] == ["layer1", "layer2"]
    assert [s.path for s in tdsteer_timm.sites(model, 2)] == ["layer2.0"]  # one layer, not timm's "last 2"
    assert [s.path for s in tdsteer_timm.sites(model, [0, slice(-2, None)])] == ["layer1.0", "layer4.0", "layer4.1"]
    assert all(s.layout == "NCHW" and s.prefix_tokens == 0 for s in tdsteer_timm.sites(model))


@pytest.mark.parametrize(("layers", "kind"), [(8, "block"), (-9, "block"), (5, "stage"), ([0, 6], "stage")])
def test_index_out_of_range(layers: Any, kind: str) -> None:
    with pytest.raises(IndexError, match="layer index .* out of range"):
        tdsteer_timm.sites(_model("resnet18"), layers, kind=kind)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind 'layer'; use one of block, stage"):
        tdsteer_timm.sites(_model("resnet18"), kind="layer")
    with pytest.raises(ValueError, match="kind"):
        tdsteer_timm.num_layers(_model("resnet18"), "layer")


def test_module_meets_the_adapter_contract() -> None:
    assert isinstance(tdsteer_timm, Adapter)
    adapter: Adapter = tdsteer_timm  # and for mypy: the signatures match the protocol
    assert adapter.num_layers(_model("resnet18")) == 8
    assert tdsteer_timm.DEFAULT_KIND == "block" and tdsteer_timm.DEFAULT_KIND in tdsteer_timm.SITE_KINDS
    assert tdsteer_timm.supported() == sorted(tdsteer_timm.supported())
    assert {"ResNet", "VisionTransformer", "ConvNeXt", "SwinTransformer", "Hiera"} <= set(tdsteer_timm.supported())
    for gone in ("register_arch", "supported_classes", "image_batches", "ArchInfo", "SiteInfo"):
        assert not hasattr(tdsteer_timm, gone), gone
