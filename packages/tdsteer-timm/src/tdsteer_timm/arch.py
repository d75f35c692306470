"""Architecture registry: where the blocks and stages of a timm model live.

Each supported model family registers one small function, keyed by model class (subclasses inherit
it), that returns an :class:`ArchSpec`: regular expressions for the block and stage module paths, the
activation layout and the number of prefix tokens. :func:`tdsteer_timm.describe` turns a spec and a
model instance into a :class:`tdsteer.adapter.ModelDescription`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

Layout = Literal["NLC", "NCHW", "NHWC"]

#: The kinds of site this adapter offers: every residual block, or every stage.
SITE_KINDS: tuple[str, ...] = ("block", "stage")
#: The kind :func:`tdsteer_timm.sites` uses when none is given.
DEFAULT_KIND = "block"

SpecFn = Callable[[nn.Module], "ArchSpec"]
F = TypeVar("F", bound=SpecFn)


@dataclass(frozen=True)
class ArchSpec:
    """What a registered family tells the builder about one model instance.

    Args:
        family: Short family name (``"vit"``, ``"resnet"``...): the description's ``architecture``.
        block_pattern: Regular expression that fully matches the path of every block
            (``r"layer\\d+\\.\\d+"``), in the grammar of ``model.named_modules()``.
        stage_pattern: Regular expression that fully matches the path of every stage
            (``r"layer\\d+"``); equal to ``block_pattern`` for isotropic models (ViT).
        layout: Layout of the block and stage outputs: ``"NLC"``, ``"NCHW"`` or ``"NHWC"``.
        prefix_tokens: Leading non-patch tokens (class, distillation, register tokens) of an
            ``NLC`` layout.
        stages_from_feature_info: Take the stage sites from ``model.feature_info`` (the modules timm
            reports as features, stem excluded) rather than from every ``stage_pattern`` match.
        channels: Optional ``fn(model, path) -> int`` giving the channel count of a site; when
            ``None`` the builder reads ``feature_info`` and the modules themselves.

    Examples:
        >>> ArchSpec("mynet", r"stages\\.\\d+\\.\\d+", r"stages\\.\\d+", "NCHW").layout
        'NCHW'
    """

    family: str
    block_pattern: str
    stage_pattern: str
    layout: Layout
    prefix_tokens: int = 0
    stages_from_feature_info: bool = True
    channels: Callable[[nn.Module, str], int] | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("NLC", "NCHW", "NHWC"):
            raise ValueError(f"ArchSpec {self.family!r}: unknown layout {self.layout!r}; use NLC, NCHW or NHWC")
        for pattern in (self.block_pattern, self.stage_pattern):
            re.compile(pattern)


_REGISTRY: dict[type, SpecFn] = {}


def _as_classes(classes: type | tuple[type, ...], caller: str) -> tuple[type, ...]:
    found = classes if isinstance(classes, tuple) else (classes,)
    if not found:
        raise TypeError(f"{caller} needs at least one model class")
    for cls in found:
        if not isinstance(cls, type):
            raise TypeError(f"{caller} expects model classes, got {cls!r}")
    return found


def register_architecture(
    classes: type | tuple[type, ...],
    spec_fn: SpecFn | ArchSpec | None = None,
    /,
    *,
    overwrite: bool = False,
    **fields: Any,
) -> SpecFn:
    """Teach the adapter a model class: where its blocks and stages are (subclasses inherit it).

    Args:
        classes: A model class (``timm.models.resnet.ResNet``, or your own ``nn.Module`` subclass),
            or a tuple of classes.
        spec_fn: ``fn(model) -> ArchSpec``, called with each model instance, or one :class:`ArchSpec`
            for every instance.
        overwrite: Replace the entry of a class that is already registered instead of raising.
        **fields: Instead of ``spec_fn``: the fields of one :class:`ArchSpec` (``family=...,
            block_pattern=..., stage_pattern=..., layout=...``).

    Returns:
        The spec function registered.

    Raises:
        ValueError: A class is already registered and ``overwrite`` is false (nothing is registered).
        TypeError: ``classes`` holds something that is not a class, ``spec_fn`` is not callable, or
            both ``spec_fn`` and ``fields`` (or neither) are given.

    Examples:
        >>> from torch import nn
        >>> class TinyNet(nn.Module):
        ...     pass
        >>> _ = register_architecture(TinyNet, ArchSpec("tiny", r"stages\\.\\d+\\.\\d+", r"stages\\.\\d+", "NCHW"))
        >>> class TinyNet2(nn.Module):
        ...     pass
        >>> _ = register_architecture(TinyNet2, family="tiny2", block_pattern=r"b\\.\\d+", stage_pattern=r"b\\.\\d+", layout="NLC")
        >>> "TinyNet" in supported() and "TinyNet2" in supported()
        True
    """
    found = _as_classes(classes, "register_architecture")
    if (spec_fn is None) == (not fields):
        raise TypeError("register_architecture takes a spec function, an ArchSpec, or ArchSpec fields as keywords")
    if spec_fn is None:
        spec_fn = ArchSpec(**fields)
    if isinstance(spec_fn, ArchSpec):
        spec = spec_fn
        fn: SpecFn = lambda model: spec
    elif callable(spec_fn):
        fn = spec_fn
    else:
        raise TypeError(f"register_architecture expects fn(model) -> ArchSpec or an ArchSpec, got {spec_fn!r}")
    taken = [cls.__name__ for cls in found if cls in _REGISTRY]
    if taken and not overwrite:
        raise ValueError(
            f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} already registered; pass overwrite=True to replace"
        )
    for cls in found:
        _REGISTRY[cls] = fn
    return fn


def architecture_for(*classes: type, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator form of :func:`register_architecture`: register ``fn(model) -> ArchSpec`` for ``classes``.

    Examples:
        >>> from torch import nn
        >>> class SmallNet(nn.Module):
        ...     pass
        >>> @architecture_for(SmallNet)
        ... def _small(model):
        ...     return ArchSpec("small", r"stages\\.\\d+\\.\\d+", r"stages\\.\\d+", "NCHW")
        >>> "SmallNet" in supported()
        True
    """
    found = _as_classes(classes, "architecture_for")

    def decorator(fn: F) -> F:
        register_architecture(found, fn, overwrite=overwrite)
        return fn

    return decorator


def supported() -> list[str]:
    """Names of the model classes with a registered architecture, sorted.

    Examples:
        >>> "ResNet" in supported()
        True
    """
    return sorted({cls.__name__ for cls in _REGISTRY})


def lookup(model: nn.Module) -> SpecFn | None:
    """The spec function registered for the class of ``model`` or its nearest registered parent."""
    for cls in type(model).__mro__:
        fn = _REGISTRY.get(cls)
        if fn is not None:
            return fn
    return None
