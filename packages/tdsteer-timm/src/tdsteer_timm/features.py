"""``timm.create_model(..., features_only=True)`` models: the wrappers timm puts around a model.

- ``FeatureGetterNet`` (ViTs, Twins, CrossViT, LeViT...) holds the model as ``model.model`` and calls
  its ``forward_intermediates``: its sites are the model's, under ``model.``; a pruned model keeps
  the stages up to its last output.
- ``FeatureHookNet`` built without rewriting holds the model as ``body``: the same, under ``body.``.
- ``FeatureListNet`` / ``FeatureDictNet`` (ResNet, ConvNeXt, Swin, RegNet, DenseNet...) re-parent the
  model's top-level modules, flattening first-level ``nn.Sequential`` children (``stages.0`` becomes
  ``stages_0``). The original tree is rebuilt from the same module objects (:func:`unflatten`),
  described with the original class's spec, and every site path is mapped back into the wrapper.
  The original class is the one timm builds for ``pretrained_cfg["architecture"]`` (found on the
  meta device, without weights).
- ``EfficientNetFeatures``, ``MobileNetV3Features`` and ``HighResolutionNetFeatures`` are model
  classes of their own, with the paths of their full models: they are registered directly.

Stage ``i`` of a wrapper is timm's index ``i``, as for the full model: ``out_indices=(2, 3)`` selects
from the same numbering.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import timm
import torch
from timm.models import FeatureDictNet, FeatureHookNet
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

from tdsteer.adapter import ModelDescription
from tdsteer_timm.build import feature_entries
from tdsteer_timm.fallback import Reference


@dataclass(frozen=True)
class Wrapped:
    """A ``features_only`` wrapper, seen through the model it wraps.

    Args:
        inner: The wrapped model, or its tree rebuilt by :func:`unflatten`.
        original: The class timm built before wrapping (``type(inner)`` for a getter).
        path_of: A path in ``inner`` -> the same module's path in the wrapper (``None`` if it has none).
        translate: A ``feature_info`` module name -> its path in the wrapper (for the fallback).
        reference: ``fn(x) -> {index: feature}`` from the wrapper's forward, for the fallback's check.
    """

    inner: nn.Module
    original: type | None
    path_of: Callable[[str], str | None]
    translate: Callable[[str], str | None]
    reference: Reference | None


class Unflattened(nn.Module):
    """The module tree a ``FeatureListNet`` was cut from, rebuilt around the same module objects."""

    feature_info: Any = None
    pretrained_cfg: Any = None

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - a view for describing, never run
        """Not runnable: the wrapper that holds these modules runs them."""
        raise RuntimeError("Unflattened only describes a features_only model; run the wrapper itself")


def unflatten(wrapper: nn.Module) -> Unflattened:
    """Rebuild the original top-level tree of a ``FeatureDictNet``: ``stages_0`` back under ``stages.0``.

    Which first-level containers were flattened is read off ``feature_info`` (original names) and
    the wrapper's children (flattened names).

    Examples:
        >>> import timm
        >>> wrapper = timm.create_model("convnext_atto", pretrained=False, features_only=True)
        >>> [name for name, _ in unflatten(wrapper).named_children()][-1], type(wrapper).__name__
        ('stages', 'FeatureListNet')
    """
    children = dict(wrapper.named_children())
    flattened: set[str] = set()
    for entry in feature_entries(wrapper):
        head, _, rest = str(entry["module"]).partition(".")
        child = rest.partition(".")[0]
        if head not in children and child and f"{head}_{child}" in children:
            flattened.add(head)
    shell = Unflattened()
    groups: dict[str, nn.Sequential] = {}
    for name, module in children.items():
        parent = next((p for p in sorted(flattened, key=len, reverse=True) if name.startswith(p + "_")), None)
        if parent is None:
            shell.add_module(name, module)
            continue
        if parent not in groups:
            groups[parent] = nn.Sequential()
            shell.add_module(parent, groups[parent])
        groups[parent].add_module(name[len(parent) + 1 :], module)
    shell.feature_info = getattr(wrapper, "feature_info", None)
    shell.pretrained_cfg = getattr(wrapper, "pretrained_cfg", None)
    return shell


@lru_cache(maxsize=64)
def _class_of_architecture(name: str) -> type | None:
    if not timm.is_model(name):
        return None
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return type(timm.create_model(name, pretrained=False))
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: class unknown
        return None


def original_class(wrapper: nn.Module) -> type | None:
    """The class timm wrapped: the one it builds for ``pretrained_cfg["architecture"]``, or ``None``."""
    cfg = getattr(wrapper, "pretrained_cfg", None) or getattr(wrapper, "default_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    return _class_of_architecture(name) if isinstance(name, str) and name else None


def _wrapper_reference(wrapper: nn.Module) -> Reference:
    indices = list(getattr(getattr(wrapper, "feature_info", None), "out_indices", ()))

    def reference(x: Tensor) -> Mapping[int, Tensor]:
        out = wrapper(x)
        values = list(out.values()) if isinstance(out, Mapping) else list(out)
        return dict(zip(sorted(indices), values))

    return reference


def _prefixed(prefix: str, inner: nn.Module, original: type | None) -> Wrapped:
    return Wrapped(
        inner,
        original,
        lambda path: f"{prefix}.{path}",
        lambda name: f"{prefix}.{name}",
        None,
    )


def unwrap(model: nn.Module) -> Wrapped | None:
    """The model inside a ``features_only`` wrapper, or ``None`` for a model that is not one."""
    if isinstance(model, FeatureGetterNet) and isinstance(getattr(model, "model", None), nn.Module):
        return _prefixed("model", model.model, type(model.model))
    if isinstance(model, FeatureHookNet) and "body" in model and len(model) == 1:
        body = model["body"]
        return _prefixed("body", body, type(body))
    if not isinstance(model, (FeatureDictNet, FeatureHookNet)):
        return None
    shell = unflatten(model)
    ids = {id(module): path for path, module in model.named_modules()}
    shell_modules = dict(shell.named_modules())

    def path_of(path: str) -> str | None:
        module = shell_modules.get(path)
        return None if module is None else ids.get(id(module))

    return Wrapped(shell, original_class(model), path_of, path_of, _wrapper_reference(model))


def model_class_name(model: nn.Module) -> str:
    """The class of the timm model ``model`` is: for a ``features_only`` wrapper, the class it wraps
    (``ConvNeXt`` for a ``FeatureListNet``, ``VisionTransformer`` for a ``FeatureGetterNet``).

    Examples:
        >>> import timm
        >>> model_class_name(timm.create_model("convnext_atto", pretrained=False, features_only=True))
        'ConvNeXt'
        >>> model_class_name(timm.create_model("convnext_atto", pretrained=False))
        'ConvNeXt'
    """
    wrapped = unwrap(model)
    original = wrapped.original if wrapped is not None else None
    return (original or type(model)).__name__


def relocate(description: ModelDescription, wrapped: Wrapped, wrapper: nn.Module) -> ModelDescription:
    """``description`` of the inner model with every site moved to its path in ``wrapper``."""
    sites = []
    for info in description.sites:
        path = wrapped.path_of(info.site.path)
        if path is not None:
            sites.append(replace(info, site=replace(info.site, path=path)))
    return replace(description, model_class=type(wrapper).__name__, sites=tuple(sites))
