"""The fallback for unregistered classes: its guess from feature_info is checked by one
forward_intermediates call, which measures layouts and prefix tokens, and refused when unconfirmed.

The traps of the issue are checked by taking registered classes out of the registry for a test."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from timm_tiny import TINY, build, capturing, check_against_timm
from torch import nn

import tdsteer_timm
from tdsteer.errors import UnknownArchitectureError
from tdsteer_timm import arch


@pytest.fixture
def unregistered() -> Iterator[set[str]]:
    """Class names to take out of the registry for one test (restored afterwards)."""
    saved = dict(arch._REGISTRY)
    names: set[str] = set()
    yield names
    arch._REGISTRY.clear()
    arch._REGISTRY.update(saved)


def _unregistered_tiny(class_name: str, names: set[str]) -> tuple[nn.Module, torch.Tensor]:
    name, kwargs, size = TINY[class_name]
    model = build(name, **dict(kwargs))
    for cls in type(model).__mro__:
        arch._REGISTRY.pop(cls, None)
    names.add(class_name)
    assert tdsteer_timm.arch.lookup(model) is None
    return model, torch.randn(2, 3, size, size)


# class, the layouts and prefix-token counts the check measures, what the warning adds
CONFIRMED = [
    ("Cait", {("NLC", 0)}, "model.num_prefix_tokens is 1, but the sequences there carry 0"),
    ("Xcit", {("NLC", 0)}, "model.num_prefix_tokens is 1, but the sequences there carry 0"),
    ("Levit", {("NLC", 0)}, "NLC with 0 prefix tokens"),
    ("MlpMixer", {("NLC", 0)}, "NLC with 0 prefix tokens"),
    ("VisionTransformerDistilled", {("NLC", 2)}, "NLC with 2 prefix tokens"),
    (
        "CrossVit",
        {("NLC", 1)},
        "4 modules listed in model.feature_info ('blocks.0' .. 'blocks.1')",
    ),  # a slot per branch
    ("SwinTransformer", {("NHWC", 0)}, "NHWC"),
    ("ResNet", {("NCHW", 0)}, "NCHW"),
]


@pytest.mark.parametrize(("class_name", "layouts", "said"), CONFIRMED, ids=[c[0] for c in CONFIRMED])
def test_confirmed_guess_has_the_measured_layout(
    class_name: str, layouts: set[tuple[str, int]], said: str, unregistered: set[str]
) -> None:
    model, x = _unregistered_tiny(class_name, unregistered)
    with pytest.warns(UserWarning, match="as one forward_intermediates call confirmed") as caught:
        info = tdsteer_timm.describe(model)
    assert said in str(caught[0].message) and caught[0].filename == __file__
    assert info.guessed and info.source == "feature_info" and info.architecture == "feature_info"
    stages = info.of_kind("stage")
    assert {(r.site.layout, r.site.prefix_tokens) for r in stages} == layouts
    assert len({r.site.key for r in stages}) == len(stages)
    assert [r.path for r in stages] == [e["module"] for e in model.feature_info]
    with torch.no_grad(), capturing(model, [r.site for r in stages]) as seen:
        intermediates = model.forward_intermediates(x, intermediates_only=True)
    for record, reference in zip(stages, intermediates, strict=True):
        assert reference.shape[1] == record.num_chs
        site, activation = record.site, seen[record.site.key]
        if site.layout == "NHWC":
            activation = activation.permute(0, 3, 1, 2)
        elif site.layout == "NLC":
            activation = activation[:, site.prefix_tokens :].transpose(1, 2).reshape(reference.shape)
        torch.testing.assert_close(activation, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tdsteer_timm.sites(model, -1, kind="stage") == [stages[-1].site]  # the check runs once per model


REFUSED = [
    ("Hiera", "is not timm's intermediate 0"),
    ("Twins", "names 'block.0', which is not a module of Twins"),
    ("HighResolutionNet", "names 'stem', which is not a module of HighResolutionNet"),
]


@pytest.mark.parametrize(("class_name", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
def test_unconfirmed_guess_is_refused(class_name: str, reason: str, unregistered: set[str]) -> None:
    model, _ = _unregistered_tiny(class_name, unregistered)
    with pytest.raises(UnknownArchitectureError) as refused, warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal does not warn
        tdsteer_timm.sites(model)
    message = str(refused.value)
    assert reason in message and "the fallback's guess from model.feature_info was refused" in message
    assert f"tdsteer_timm.register_architecture({class_name}, fn)" in message
    with pytest.raises(UnknownArchitectureError, match="fallback=False refuses"):
        tdsteer_timm.describe(model, fallback=False)


def test_a_model_on_the_meta_device_is_refused(unregistered: set[str]) -> None:
    model = build(TINY["ResNet"][0]).to("meta")
    arch._REGISTRY.pop(type(model))
    with pytest.raises(UnknownArchitectureError, match="meta device"):
        tdsteer_timm.describe(model)


@pytest.mark.parametrize(
    ("name", "kwargs", "layouts"),
    [
        ("starnet_s050", {}, {("NCHW", 0)}),
        ("test_mambaout", {}, {("NHWC", 0)}),
        ("test_vit_relpos", {"img_size": 64}, {("NLC", 0)}),
    ],
    ids=["starnet", "mambaout", "vit_relpos"],
)
def test_unregistered_timm_classes_are_confirmed(
    name: str, kwargs: dict[str, Any], layouts: set[tuple[str, int]]
) -> None:
    model = build(name, **kwargs)
    assert tdsteer_timm.arch.lookup(model) is None, "registered now: pick another unregistered class"
    with pytest.warns(UserWarning, match="as one forward_intermediates call confirmed"):
        tdsteer_timm.describe(model)
    info = check_against_timm(model, torch.randn(2, 3, 64, 64), fallback=True)
    assert info.guessed and {(r.site.layout, r.site.prefix_tokens) for r in info.sites} == layouts


def test_a_features_only_wrapper_of_an_unregistered_class_is_checked_against_its_outputs() -> None:
    model = build("starnet_s050", features_only=True, out_indices=(1, 2, 3))
    with pytest.warns(
        UserWarning, match=r"one forward pass of the feature wrapper confirmed \(in the StarNet it wraps\)"
    ):
        info = tdsteer_timm.describe(model)
    assert [r.path for r in info.of_kind("stage")] == ["stages_0", "stages_1", "stages_2", "stages_3"]
    check_against_timm(model, torch.randn(2, 3, 64, 64), fallback=True)
    with pytest.raises(UnknownArchitectureError, match="the StarNet it wraps is not registered"):
        tdsteer_timm.describe(model, fallback=False)


@pytest.mark.parametrize("in_chans", [1, 3, 4])
@pytest.mark.parametrize(
    ("name", "kwargs"), [("starnet_s050", {}), ("test_mambaout", {}), ("test_vit_relpos", {"img_size": 64})]
)
def test_the_check_feeds_the_model_its_own_channel_count(name: str, kwargs: dict[str, Any], in_chans: int) -> None:
    # timm keeps pretrained_cfg["input_size"] at (3, H, W) for a model built with another in_chans
    model = build(name, in_chans=in_chans, **kwargs)
    assert tdsteer_timm.arch.lookup(model) is None, "registered now: pick another unregistered class"
    assert model.pretrained_cfg["input_size"][0] == 3
    with pytest.warns(UserWarning, match="as one forward_intermediates call confirmed"):
        stages = tdsteer_timm.sites(model, kind="stage")
    assert [s.path for s in stages] == [e["module"] for e in model.feature_info]
    check_against_timm(model, torch.randn(2, in_chans, 64, 64), fallback=True)


def test_a_features_only_wrapper_with_one_input_channel_is_checked() -> None:
    model = build("starnet_s050", features_only=True, in_chans=1)
    with pytest.warns(UserWarning, match=r"one forward pass of the feature wrapper confirmed"):
        info = tdsteer_timm.describe(model)
    assert [r.path for r in info.of_kind("stage")] == ["stages_0", "stages_1", "stages_2", "stages_3"]
    check_against_timm(model, torch.randn(2, 1, 64, 64), fallback=True)
