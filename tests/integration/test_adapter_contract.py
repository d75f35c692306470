"""The adapter contract (tdsteer.adapter): tdsteer_hf and tdsteer_timm answer the same questions with
the same names, the same keywords, the same index rule, the same fallback and the same exception."""

from __future__ import annotations

import inspect
import warnings
from types import ModuleType

import pytest
import timm
import torch
from timm.models._features import feature_take_indices
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import tdsteer
import tdsteer_hf
import tdsteer_timm
from tdsteer.adapter import Adapter, ModelDescription

ADAPTERS = [tdsteer_hf, tdsteer_timm]
CONTRACT = (
    "SITE_KINDS",
    "DEFAULT_KIND",
    "sites",
    "num_layers",
    "describe",
    "supported",
    "register_architecture",
    "architecture_for",
    "contrastive_batches",
)
#: Names one adapter once used for what the contract now calls otherwise.
RETIRED = ("register_arch", "supported_classes", "supported_model_types", "image_batches", "ArchInfo")


def _gpt2(layers: int = 3) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).eval()


def _resnet() -> nn.Module:
    return timm.create_model("resnet10t", pretrained=False).eval()


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Unregistered(nn.Module):
    """A model neither adapter has registered: identical blocks, and a timm-style feature_info."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(Block(4) for _ in range(3))
        self.feature_info = [{"module": f"stages.{i}", "num_chs": 4, "reduction": 1} for i in range(3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda m: m.__name__)
def test_both_export_the_contract(adapter: ModuleType) -> None:
    assert isinstance(adapter, Adapter)
    exported = set(adapter.__all__)
    assert set(CONTRACT) <= exported, set(CONTRACT) - exported
    assert not set(RETIRED) & set(dir(adapter))
    assert adapter.DEFAULT_KIND in adapter.SITE_KINDS


@pytest.mark.parametrize("name", ["sites", "num_layers", "describe"])
def test_same_keywords(name: str) -> None:
    shapes = []
    for adapter in ADAPTERS:
        parameters = inspect.signature(getattr(adapter, name)).parameters
        positional = [p.name for p in parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert parameters["fallback"].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters["fallback"].default is True
        if "kind" in parameters:
            assert parameters["kind"].default == adapter.DEFAULT_KIND
        shapes.append(positional)
    assert shapes[0] == shapes[1]


def test_same_index_rule() -> None:
    models = {tdsteer_hf: _gpt2(), tdsteer_timm: _resnet()}
    for adapter, model in models.items():
        described = adapter.describe(model)
        assert isinstance(described, ModelDescription)
        records = described.of_kind(adapter.DEFAULT_KIND)
        count = adapter.num_layers(model)
        assert count == len(records) > 2
        # An int is ONE layer (negative from the end), in both adapters.
        assert adapter.sites(model, -1) == [records[-1].site]
        assert adapter.sites(model, 1) == [records[1].site]
        # "the last two" is a slice; a list mixes ints and slices.
        assert adapter.sites(model, slice(-2, None)) == [records[-2].site, records[-1].site]
        assert adapter.sites(model, [0, slice(-1, None)]) == [records[0].site, records[-1].site]
        with pytest.raises(IndexError, match=rf"the model has {count} layers"):
            adapter.sites(model, count)
    # timm's own rule reads an int n as "the last n": tdsteer does not follow it.
    timm_indices, _ = feature_take_indices(4, 1)
    assert list(timm_indices) == [3]
    assert tdsteer.take_indices(4, 1) == [1]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda m: m.__name__)
def test_same_fallback_policy(adapter: ModuleType) -> None:
    model = Unregistered()
    with pytest.warns(UserWarning, match=rf"{adapter.__name__}: Unregistered is not a registered architecture"):
        described = adapter.describe(model)
    assert described.guessed and described.adapter == adapter.__name__
    with pytest.warns(UserWarning):
        assert [s.path for s in adapter.sites(model, -1)] == ["stages.2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(tdsteer.UnknownArchitectureError) as refused:
            adapter.sites(model, fallback=False)
    message = str(refused.value)
    assert message.startswith(f"{adapter.__name__} does not know the architecture of Unregistered")
    assert "Supported: " in message and "register_architecture" in message and "pass module paths" in message
    assert refused.value.supported == adapter.supported()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda m: m.__name__)
def test_a_model_nothing_fits_raises_the_core_exception(adapter: ModuleType) -> None:
    with pytest.raises(tdsteer.UnknownArchitectureError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.sites(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_registration_means_the_same() -> None:
    for adapter in ADAPTERS:
        parameters = inspect.signature(adapter.register_architecture).parameters
        assert parameters["overwrite"].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters["overwrite"].default is False
        decorator = inspect.signature(adapter.architecture_for).parameters
        assert next(iter(decorator.values())).kind is inspect.Parameter.VAR_POSITIONAL
        assert decorator["overwrite"].default is False
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        tdsteer_hf.register_architecture("gpt2", blocks="h")
    resnet = type(_resnet())
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        tdsteer_timm.register_architecture(resnet, lambda model: None)


def test_descriptions_check_vectors_the_same_way() -> None:
    for adapter, model in {tdsteer_hf: _gpt2(), tdsteer_timm: _resnet()}.items():
        described = adapter.describe(model)
        site = described.of_kind(adapter.DEFAULT_KIND)[-1]
        assert site.num_chs is not None
        good = tdsteer.SteeringVector({site.site.key: torch.ones(site.num_chs)}, {site.site.key: site.site})
        good.validate(model, site_sizes=described.site_sizes(), check="ignore")
        wrong = tdsteer.SteeringVector({site.site.key: torch.ones(site.num_chs + 1)}, {site.site.key: site.site})
        with pytest.raises(ValueError, match=rf"hidden size {site.num_chs + 1} at site '{site.site.key}'"):
            wrong.validate(model, site_sizes=described.site_sizes(), check="ignore")
