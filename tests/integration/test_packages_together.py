"""The four distributions installed side by side: one version, the pins between them, the core API."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import subprocess
import sys

import pytest
import torch
from packaging.requirements import Requirement

import tdsteer

pytestmark = pytest.mark.integration

# distribution name -> import name
DISTRIBUTIONS = {
    "tdsteer": "tdsteer",
    "tdsteer-hf": "tdsteer_hf",
    "tdsteer-timm": "tdsteer_timm",
    "tdsteer-eval": "tdsteer_eval",
}


def _requirements(distribution: str) -> dict[str, Requirement]:
    parsed = [Requirement(r) for r in metadata.requires(distribution) or []]
    return {r.name: r for r in parsed if r.marker is None}


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_every_distribution_reports_the_core_version(distribution: str) -> None:
    assert metadata.version(distribution) == tdsteer.__version__
    module = importlib.import_module(f"{DISTRIBUTIONS[distribution]}._version")
    assert module.__version__ == tdsteer.__version__


@pytest.mark.parametrize(
    ("distribution", "pinned"),
    [("tdsteer-hf", ["tdsteer"]), ("tdsteer-timm", ["tdsteer"]), ("tdsteer-eval", ["tdsteer", "tdsteer-hf"])],
)
def test_adapters_pin_the_same_release_of_their_siblings(distribution: str, pinned: list[str]) -> None:
    requirements = _requirements(distribution)
    for name in pinned:
        assert str(requirements[name].specifier) == f"=={tdsteer.__version__}", requirements[name]


def test_core_requires_no_model_library() -> None:
    requirements = _requirements("tdsteer")
    assert "torch" in requirements
    assert not {"transformers", "timm", "lm-eval"} & set(requirements)


def test_importing_the_core_imports_no_model_library() -> None:
    code = (
        "import sys, tdsteer; "
        "loaded = sorted({'transformers', 'timm', 'lm_eval'} & set(sys.modules)); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_scripts_point_at_their_packages() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts["tdsteer"] == "tdsteer.cli:main"
    assert scripts["tdsteer-eval"] == "tdsteer_eval.cli:main"


def test_site_keys_and_records() -> None:
    assert tdsteer.Site("transformer.h.3").key == "transformer.h.3"
    assert tdsteer.Site("blocks.2", slot=1).key == "blocks.2#1"
    assert tdsteer.Site("model.layers.4", io="input").key == "model.layers.4:input"
    assert tdsteer.Site("blocks.0", name="first").key == "first"
    assert tdsteer.Site("features.3", layout="NCHW").channel_dim == 1

    site = tdsteer.Site("blocks.5", slot=0, layout="NLC", prefix_tokens=1)
    assert tdsteer.Site.from_dict(site.to_dict()) == site
    with pytest.raises(ValueError, match="unknown layout"):
        tdsteer.Site("blocks.5", layout="NCL")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown fields"):
        tdsteer.Site.from_dict({"path": "blocks.5", "colour": "red"})


def test_sites_resolve_in_a_model_and_swap_tensors() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    assert tdsteer.Site("0").module(model) is model[0]
    with pytest.raises(ValueError, match="does not resolve"):
        tdsteer.Site("layers.0").module(model)

    hidden, extra = torch.zeros(2, 3), torch.ones(1)
    site = tdsteer.Site("0", slot=0)
    assert site.select((hidden, extra)) is hidden
    replaced = site.replace((hidden, extra), hidden + 1)
    assert isinstance(replaced, tuple)
    assert torch.equal(replaced[0], hidden + 1)
    assert replaced[1] is extra

    assert [s.key for s in tdsteer.as_sites(["a.0", tdsteer.Site("a.1")])] == ["a.0", "a.1"]
    with pytest.raises(ValueError, match="Duplicate sites"):
        tdsteer.as_sites(["a.0", "a.0"])


def test_take_indices() -> None:
    assert tdsteer.take_indices(12, -1) == [11]
    assert tdsteer.take_indices(12, [0, -2, 0]) == [0, 10]
    assert tdsteer.take_indices(4, slice(1, None)) == [1, 2, 3]
    assert tdsteer.take_indices(3) == [0, 1, 2]
    with pytest.raises(IndexError, match=r"0\.\.11 or -12\.\.-1"):
        tdsteer.take_indices(12, 12)
    with pytest.raises(TypeError):
        tdsteer.take_indices(12, True)
