"""Unregistered models (fallback on and off) and the architecture registry."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import timm
import torch
from torch import nn

import tdsteer
import tdsteer_timm
from tdsteer.errors import UnknownArchitectureError
from tdsteer_timm import arch


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


def test_unknown_class_with_fallback_off_lists_supported_and_how_to_register() -> None:
    with pytest.raises(UnknownArchitectureError) as error:
        tdsteer_timm.sites(_Net(), fallback=False)
    assert isinstance(error.value, ValueError) and error.value.adapter == "tdsteer_timm"
    assert error.value.supported == tdsteer_timm.supported() and "ResNet" in error.value.supported
    message = str(error.value)
    assert "_Net" in message and "ResNet" in message and "VisionTransformer" in message
    assert "tdsteer_timm.register_architecture(_Net, fn)" in message
    assert "@tdsteer_timm.architecture_for(_Net)" in message
    assert "tdsteer.Site('path.to.module', layout='NCHW')" in message and "fallback=False" in message
    for call in (tdsteer_timm.describe, tdsteer_timm.num_layers):
        with pytest.raises(UnknownArchitectureError):
            call(_Net(), fallback=False)


def test_default_fallback_uses_feature_info_with_a_warning() -> None:
    model = _Net()
    with pytest.warns(UserWarning, match="tdsteer_timm: _Net is not a registered architecture") as caught:
        found = tdsteer_timm.sites(model)
    assert [(s.path, s.layout) for s in found] == [("stages.0", "NCHW"), ("stages.1", "NCHW")]
    message = str(caught[0].message)
    assert "model.feature_info" in message and "'stages.0' .. 'stages.1'" in message
    assert "tdsteer_timm.register_architecture(_Net, fn)" in message and "fallback=False" in message
    assert caught[0].filename == __file__, "the warning points at the caller of sites()"
    with pytest.warns(UserWarning, match="not a registered architecture") as caught:
        info = tdsteer_timm.describe(model)
    assert caught[0].filename == __file__, "the warning points at the caller of describe()"
    assert info.guessed and info.source == "feature_info" and info.architecture == "feature_info"
    assert [r.num_chs for r in info.of_kind("stage")] == [6, 8] and info.hidden_size == 8
    assert [(r.kind, r.path) for r in info.of_kind("block")] == [("block", "stages.0"), ("block", "stages.1")]
    with pytest.warns(UserWarning, match="not a registered architecture"):
        assert tdsteer_timm.num_layers(model, "stage") == 2


def test_fallback_without_feature_info_fails_clearly() -> None:
    with pytest.raises(UnknownArchitectureError, match="no usable model.feature_info"):
        tdsteer_timm.describe(nn.Sequential(nn.Linear(2, 2)))


def test_a_non_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tdsteer_timm.sites("resnet18")  # type: ignore[arg-type]


@pytest.fixture
def registry() -> Any:
    """Restore the architecture registry after a test registers its own classes."""
    saved = dict(arch._REGISTRY)
    yield arch._REGISTRY
    arch._REGISTRY.clear()
    arch._REGISTRY.update(saved)


def test_architecture_for_a_custom_class(registry: Any) -> None:
    class MyNet(_Net):
        pass

    @tdsteer_timm.architecture_for(MyNet)
    def _mynet(model: nn.Module) -> tdsteer_timm.ArchSpec:
        return tdsteer_timm.ArchSpec("mynet", r"stages\.\d+\.\d+", r"stages\.\d+", "NCHW")

    model = MyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a registered class resolves silently
        info = tdsteer_timm.describe(model, fallback=False)
    assert "MyNet" in tdsteer_timm.supported()
    assert info.architecture == "mynet" and not info.guessed
    assert [(r.path, r.num_chs, r.stage) for r in info.of_kind("block")] == [
        ("stages.0.0", 6, 0),
        ("stages.0.1", 6, 0),
        ("stages.1.0", 8, 1),
    ]
    assert [s.path for s in tdsteer_timm.sites(model, -1, kind="stage")] == ["stages.1"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), tdsteer.steer(model, {tdsteer_timm.sites(model, 0)[0]: torch.ones(6)}, scale=3.0):
        steered = model(x)
    assert not torch.allclose(steered, model(x))


def test_register_architecture_function_and_overwrite(registry: Any) -> None:
    class NetA(_Net):
        pass

    class NetB(_Net):
        pass

    spec = tdsteer_timm.ArchSpec("ab", r"stages\.\d+\.\d+", r"stages\.\d+", "NCHW")
    tdsteer_timm.register_architecture((NetA, NetB), lambda model: spec)
    assert tdsteer_timm.describe(NetB()).architecture == "ab"
    with pytest.raises(ValueError, match="NetA is already registered; pass overwrite=True"):
        tdsteer_timm.register_architecture(NetA, spec)
    with pytest.raises(ValueError, match="already registered"):
        tdsteer_timm.architecture_for(NetB)(lambda model: spec)
    other = tdsteer_timm.ArchSpec("other", r"stages\.\d+", r"stages\.\d+", "NHWC")
    tdsteer_timm.register_architecture(NetA, other, overwrite=True)  # an ArchSpec serves every instance
    assert tdsteer_timm.describe(NetA()).architecture == "other"
    assert tdsteer_timm.sites(NetA(), -1)[0].layout == "NHWC"

    class NetC(_Net):
        pass

    class NetD(_Net):
        pass

    tdsteer_timm.register_architecture(
        NetD, family="d", block_pattern=r"stages\.\d+\.\d+", stage_pattern=r"stages\.\d+", layout="NCHW"
    )
    assert [s.path for s in tdsteer_timm.sites(NetD(), -1)] == ["stages.1.0"]
    with pytest.raises(TypeError, match="spec function, an ArchSpec, or ArchSpec fields"):
        tdsteer_timm.register_architecture(NetC, spec, family="c")
    with pytest.raises(TypeError, match="spec function, an ArchSpec, or ArchSpec fields"):
        tdsteer_timm.register_architecture(NetC)

    with pytest.raises(ValueError, match="already registered"):  # all or nothing
        tdsteer_timm.register_architecture((NetC, NetA), spec)
    assert "NetC" not in tdsteer_timm.supported()
    with pytest.raises(TypeError, match="model classes"):
        tdsteer_timm.register_architecture("NetC", spec)  # type: ignore[arg-type]


def test_built_in_classes_are_registered_once(registry: Any) -> None:
    from timm.models.resnet import ResNet

    with pytest.raises(ValueError, match="ResNet is already registered"):
        tdsteer_timm.register_architecture(ResNet, tdsteer_timm.ArchSpec("r", r"layer\d+", r"layer\d+", "NCHW"))
    tdsteer_timm.register_architecture(
        ResNet, tdsteer_timm.ArchSpec("r", r"layer\d+", r"layer\d+", "NCHW"), overwrite=True
    )
    assert tdsteer_timm.num_layers(timm.create_model("resnet18", pretrained=False)) == 4  # blocks are now the stages


def test_register_architecture_bad_pattern_is_reported(registry: Any) -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(2, 2)

    tdsteer_timm.register_architecture(
        Other, lambda m: tdsteer_timm.ArchSpec("other", r"blocks\.\d+", r"blocks", "NCHW")
    )
    with pytest.raises(ValueError, match="no module path matches"):
        tdsteer_timm.describe(Other())
