"""Every registered timm family: sites resolve, hooks see the declared layout, steering moves the logits."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import timm
import torch
from torch import nn

import tdsteer
import tdsteer_timm
from tdsteer_timm import arch

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
    assert info.family == family and not info.generic
    if stages is not None:
        assert [s.path for s in info.stages] == stages
    assert tdsteer_timm.num_layers(model, "block") == len(info.blocks) >= len(info.stages) >= 1

    records = {**{r.path: r for r in info.blocks}, **{r.path: r for r in info.stages}}
    all_sites = tdsteer_timm.sites(model) + [
        s for s in tdsteer_timm.sites(model, level="stage") if s.path not in {b.path for b in info.blocks}
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
        _check_layout(site, records[site.path].num_chs, seen[site.key])
        if site.layout == "NLC":
            assert site.prefix_tokens == model.num_prefix_tokens

    # steering at the middle block and the last stage moves the logits; leaving the context restores them
    for site in (tdsteer_timm.sites(model, len(info.blocks) // 2)[0], tdsteer_timm.sites(model, -1, "stage")[0]):
        vector = torch.randn(records[site.path].num_chs, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), tdsteer.steer(model, {site: vector}, scale=8.0):
            steered = model(x)
        assert not torch.allclose(steered, base, atol=1e-4), site
        with torch.no_grad():
            assert torch.allclose(model(x), base)


def test_deit_inherits_vit_entry_with_two_prefix_tokens() -> None:
    model = _model(CASES[1][0], CASES[1][1])
    assert type(model).__name__ == "VisionTransformerDistilled"
    assert "VisionTransformerDistilled" not in tdsteer_timm.supported_classes()
    assert {s.prefix_tokens for s in tdsteer_timm.sites(model)} == {2}


def test_channels_per_block_follow_the_stage() -> None:
    model = _model("efficientnet_b0", {})
    info = tdsteer_timm.describe(model)
    by_path = {r.path: r.num_chs for r in info.blocks}
    assert by_path["blocks.3.0"] == 80 and by_path["blocks.6.0"] == 320  # blocks.3 is not in feature_info
    assert info.blocks[-1].stage == 6
    resnet = tdsteer_timm.describe(_model("resnet18", {}))
    assert [(r.path, r.num_chs, r.stage) for r in resnet.blocks[2:4]] == [("layer2.0", 128, 1), ("layer2.1", 128, 1)]


def test_index_rule_matches_take_indices() -> None:
    model = _model("resnet18", {})
    assert [s.path for s in tdsteer_timm.sites(model, [0, -1])] == ["layer1.0", "layer4.1"]
    assert [s.path for s in tdsteer_timm.sites(model, slice(1, 3), level="stage")] == ["layer2", "layer3"]
    assert [s.path for s in tdsteer_timm.sites(model, 2)] == ["layer2.0"]
    assert all(s.layout == "NCHW" and s.prefix_tokens == 0 for s in tdsteer_timm.sites(model))


@pytest.mark.parametrize(("layers", "level"), [(8, "block"), (-9, "block"), (4, "stage"), ([0, 5], "stage")])
def test_index_out_of_range(layers: Any, level: Any) -> None:
    with pytest.raises(IndexError, match="out of range"):
        tdsteer_timm.sites(_model("resnet18", {}), layers, level=level)


def test_unknown_level() -> None:
    with pytest.raises(ValueError, match="level"):
        tdsteer_timm.sites(_model("resnet18", {}), level="layer")  # type: ignore[arg-type]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)),
            nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1)),
        )
        self.head = nn.Linear(8, 3)
        self.feature_info = [
            {"module": "stages.0", "num_chs": 6, "reduction": 1},
            {"module": "stages.1", "num_chs": 8, "reduction": 2},
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_unknown_class_error_lists_supported_and_how_to_register() -> None:
    with pytest.raises(TypeError) as error:
        tdsteer_timm.sites(_Net())
    message = str(error.value)
    assert "_Net" in message and "ResNet" in message and "VisionTransformer" in message
    assert "register_arch" in message and "fallback=True" in message


def test_fallback_uses_feature_info_with_a_warning() -> None:
    model = _Net()
    with pytest.warns(UserWarning, match="not a registered architecture"):
        found = tdsteer_timm.sites(model, fallback=True)
    assert [(s.path, s.layout) for s in found] == [("stages.0", "NCHW"), ("stages.1", "NCHW")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = tdsteer_timm.describe(model, fallback=True)
    assert info.generic and [r.num_chs for r in info.stages] == [6, 8]


def test_fallback_without_feature_info_fails_clearly() -> None:
    with pytest.raises(TypeError, match="feature_info"):
        tdsteer_timm.describe(nn.Sequential(nn.Linear(2, 2)), fallback=True)


@pytest.fixture
def registry() -> Any:
    """Restore the architecture registry after a test registers its own classes."""
    saved = dict(arch._REGISTRY)
    yield arch._REGISTRY
    arch._REGISTRY.clear()
    arch._REGISTRY.update(saved)


def test_register_arch_for_a_custom_class(registry: Any) -> None:
    class MyNet(_Net):
        pass

    @tdsteer_timm.register_arch(MyNet)
    def _mynet(model: nn.Module) -> tdsteer_timm.ArchSpec:
        return tdsteer_timm.ArchSpec("mynet", r"stages\.\d+\.\d+", r"stages\.\d+", "NCHW")

    model = MyNet()
    info = tdsteer_timm.describe(model)
    assert [(r.path, r.num_chs, r.stage) for r in info.blocks] == [
        ("stages.0.0", 6, 0),
        ("stages.0.1", 6, 0),
        ("stages.1.0", 8, 1),
    ]
    assert [s.path for s in tdsteer_timm.sites(model, -1, level="stage")] == ["stages.1"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), tdsteer.steer(model, {tdsteer_timm.sites(model, 0)[0]: torch.ones(6)}, scale=3.0):
        steered = model(x)
    assert not torch.allclose(steered, model(x))


def test_register_arch_bad_pattern_is_reported(registry: Any) -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(2, 2)

    tdsteer_timm.register_arch(Other)(lambda m: tdsteer_timm.ArchSpec("other", r"blocks\.\d+", r"blocks", "NCHW"))
    with pytest.raises(ValueError, match="no module path matches"):
        tdsteer_timm.describe(Other())
