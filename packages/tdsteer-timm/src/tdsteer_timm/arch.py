"""Architecture registry: where the blocks and stages of a timm model live.

Each supported model family registers one small function (timm style, with a decorator keyed by model
class) that returns an :class:`ArchSpec`: regular expressions for the block and stage module paths, the
activation layout and the number of prefix tokens. One builder, :func:`describe`, turns a spec and a
model instance into an :class:`ArchInfo` of plain frozen :class:`SiteInfo` records (path, channels,
layout, stage), in the spirit of timm's ``feature_info``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

from tdsteer import Site

Layout = Literal["NLC", "NCHW", "NHWC"]
Level = Literal["block", "stage"]
LEVELS: tuple[str, ...] = ("block", "stage")

SpecFn = Callable[[nn.Module], "ArchSpec"]
F = TypeVar("F", bound=SpecFn)


@dataclass(frozen=True)
class ArchSpec:
    """What a registered family tells the builder about one model instance.

    Args:
        family: Short family name (``"vit"``, ``"resnet"``...), for messages and metadata.
        block_pattern: Regular expression that fully matches the path of every block
            (``r"layer\\d+\\.\\d+"``), in the grammar of ``model.named_modules()``.
        stage_pattern: Regular expression that fully matches the path of every stage
            (``r"layer\\d+"``); equal to ``block_pattern`` for isotropic models (ViT).
        layout: Layout of the block and stage outputs: ``"NLC"``, ``"NCHW"`` or ``"NHWC"``.
        prefix_tokens: Leading non-patch tokens (class, distillation, register tokens) of an
            ``NLC`` layout.
        stages_from_feature_info: Take the stage level from ``model.feature_info`` (the modules timm
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


@dataclass(frozen=True)
class SiteInfo:
    """One steerable location of a model: a plain record, like an entry of timm's ``feature_info``.

    Args:
        path: Module path relative to the model root (``"layer2.1"``, ``"stages.1.blocks.0"``).
        num_chs: Channels (hidden size) of the module's output.
        layout: ``"NLC"``, ``"NCHW"`` or ``"NHWC"``.
        prefix_tokens: Leading non-patch tokens in an ``NLC`` layout.
        stage: Index of the stage that holds this site (among all stage modules of the model).

    Examples:
        >>> SiteInfo("blocks.0", 192, "NLC", 1, 0).site().prefix_tokens
        1
    """

    path: str
    num_chs: int
    layout: Layout
    prefix_tokens: int
    stage: int

    def site(self) -> Site:
        """Return the :class:`tdsteer.Site` for this record."""
        return Site(self.path, layout=self.layout, prefix_tokens=self.prefix_tokens)


@dataclass(frozen=True)
class ArchInfo:
    """Blocks and stages of one model, as records.

    Args:
        family: Family name from the registered :class:`ArchSpec` (``"generic"`` for the fallback).
        model_class: Class name of the model.
        blocks: One record per block, in forward order.
        stages: One record per stage, in forward order.
        generic: ``True`` when built by the ``feature_info`` fallback for an unregistered class.
    """

    family: str
    model_class: str
    blocks: tuple[SiteInfo, ...]
    stages: tuple[SiteInfo, ...]
    generic: bool = False

    def level(self, level: Level) -> tuple[SiteInfo, ...]:
        """Return the records of ``level`` (``"block"`` or ``"stage"``)."""
        if level == "block":
            return self.blocks
        if level == "stage":
            return self.stages
        raise ValueError(f"Unknown level {level!r}: use one of {', '.join(LEVELS)}")


_REGISTRY: dict[type, SpecFn] = {}


def register_arch(*classes: type) -> Callable[[F], F]:
    """Register a spec function for one or more model classes (subclasses inherit it).

    The decorated function receives the model instance and returns an :class:`ArchSpec`. A later
    registration for the same class replaces the earlier one, so users can override built-in families.

    Args:
        *classes: Model classes (``timm.models.resnet.ResNet``, or your own ``nn.Module`` subclass).

    Returns:
        A decorator that registers the function and returns it unchanged.

    Examples:
        >>> from torch import nn
        >>> class TinyNet(nn.Module):
        ...     pass
        >>> @register_arch(TinyNet)
        ... def _tiny(model):
        ...     return ArchSpec("tiny", r"stages\\.\\d+\\.\\d+", r"stages\\.\\d+", "NCHW")
        >>> "TinyNet" in supported_classes()
        True
    """
    if not classes:
        raise TypeError("register_arch needs at least one model class")
    for cls in classes:
        if not isinstance(cls, type):
            raise TypeError(f"register_arch expects classes, got {cls!r}")

    def decorator(fn: F) -> F:
        for cls in classes:
            _REGISTRY[cls] = fn
        return fn

    return decorator


def supported_classes() -> list[str]:
    """Names of the model classes with a registered architecture, sorted.

    Returns:
        Class names such as ``"ResNet"`` and ``"VisionTransformer"``.

    Examples:
        >>> "ResNet" in supported_classes()
        True
    """
    return sorted({cls.__name__ for cls in _REGISTRY})


def _lookup(model: nn.Module) -> SpecFn | None:
    for cls in type(model).__mro__:
        fn = _REGISTRY.get(cls)
        if fn is not None:
            return fn
    return None


def _unknown_error(model: nn.Module) -> TypeError:
    name = type(model).__name__
    return TypeError(
        f"tdsteer_timm does not know the model class {name!r}. Supported classes: "
        f"{', '.join(supported_classes())}. Register it with "
        f"@tdsteer_timm.register_arch({name}) on a function returning "
        "tdsteer_timm.ArchSpec(family, block_pattern, stage_pattern, layout), "
        "or pass fallback=True to use the stage modules listed in model.feature_info."
    )


def _feature_info_entries(model: nn.Module) -> list[Mapping[str, Any]]:
    """The entries of timm's ``model.feature_info`` (a list of dicts, or a ``FeatureInfo`` wrapping one)."""
    info = getattr(model, "feature_info", None)
    items = getattr(info, "info", info)
    if not isinstance(items, (list, tuple)):
        return []
    return [item for item in items if isinstance(item, Mapping) and isinstance(item.get("module"), str)]


def _block_feature_chs(module: nn.Module) -> int | None:
    """Channels a timm EfficientNet-family block reports through its ``feature_info(location)`` method."""
    method = getattr(module, "feature_info", None)
    if not callable(method):
        return None
    try:
        record = method("bottleneck")
    except Exception:  # noqa: BLE001 - a different protocol: no answer
        return None
    if isinstance(record, Mapping) and isinstance(record.get("num_chs"), int):
        return int(record["num_chs"])
    return None


def _last_width(module: nn.Module) -> int | None:
    """Output width of the last convolution or linear layer inside ``module`` (a heuristic)."""
    found: int | None = None
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            found = sub.out_channels
        elif isinstance(sub, nn.Linear):
            found = sub.out_features
    return found


def _build(model: nn.Module, spec: ArchSpec, *, generic: bool = False) -> ArchInfo:
    modules = dict(model.named_modules())
    block_re = re.compile(spec.block_pattern)
    stage_re = re.compile(spec.stage_pattern)
    block_paths = [path for path in modules if path and block_re.fullmatch(path)]
    stage_paths = [path for path in modules if path and stage_re.fullmatch(path)]
    name = type(model).__name__
    if not block_paths or not stage_paths:
        missing = "blocks" if not block_paths else "stages"
        raise ValueError(
            f"{name} ({spec.family}): no module path matches the {missing} pattern "
            f"{(spec.block_pattern if not block_paths else spec.stage_pattern)!r}. "
            "Check the registered ArchSpec against model.named_modules()."
        )

    entries = _feature_info_entries(model)
    feature_chs = {e["module"]: int(e["num_chs"]) for e in entries if isinstance(e.get("num_chs"), int)}

    def stage_of(path: str) -> int:
        for index, stage in enumerate(stage_paths):
            if path == stage or path.startswith(stage + "."):
                return index
        raise ValueError(f"{name} ({spec.family}): block {path!r} lies in none of the stages {stage_paths}")

    def channels(path: str) -> int:
        if spec.channels is not None:
            return int(spec.channels(model, path))
        if path in feature_chs:
            return feature_chs[path]
        own = _block_feature_chs(modules[path])
        if own is not None:
            return own
        stage = stage_paths[stage_of(path)]
        if stage in feature_chs:
            return feature_chs[stage]
        guess = _last_width(modules[path])
        if guess is None:
            raise ValueError(
                f"{name} ({spec.family}): cannot tell the channels of {path!r}; "
                "give the ArchSpec a channels=fn(model, path) function."
            )
        return guess

    def record(path: str) -> SiteInfo:
        return SiteInfo(path, channels(path), spec.layout, spec.prefix_tokens, stage_of(path))

    stage_level = stage_paths
    if spec.stages_from_feature_info and entries:
        listed = [e["module"] for e in entries]
        chosen = [p for p in listed if p in modules and (stage_re.fullmatch(p) or block_re.fullmatch(p))]
        if chosen:
            stage_level = chosen
    return ArchInfo(
        family=spec.family,
        model_class=name,
        blocks=tuple(record(p) for p in block_paths),
        stages=tuple(record(p) for p in stage_level),
        generic=generic,
    )


def _generic_spec(model: nn.Module) -> ArchSpec:
    entries = _feature_info_entries(model)
    modules = dict(model.named_modules())
    paths = [e["module"] for e in entries if e["module"] in modules and e["module"]]
    if not paths:
        raise TypeError(
            f"{type(model).__name__} is not registered and has no usable model.feature_info, so the "
            "fallback cannot find its stages. Register it with @tdsteer_timm.register_arch("
            f"{type(model).__name__}) on a function returning a tdsteer_timm.ArchSpec."
        )
    layout: Layout
    if getattr(model, "output_fmt", None) == "NHWC":
        layout = "NHWC"
    elif hasattr(model, "num_prefix_tokens"):
        layout = "NLC"
    else:
        layout = "NCHW"
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if layout == "NLC" else 0
    pattern = "|".join(re.escape(p) for p in paths)
    return ArchSpec("generic", pattern, pattern, layout, prefix, stages_from_feature_info=False)


def describe(model: nn.Module, *, fallback: bool = False) -> ArchInfo:
    """Build the block and stage records of a timm model: the one builder behind :func:`sites`.

    Args:
        model: A timm model (``timm.create_model(...)``) or any module whose class is registered.
        fallback: For an unregistered class, use the modules listed in ``model.feature_info`` as
            both blocks and stages (with a warning) instead of raising. The layout is guessed:
            ``NHWC`` if ``model.output_fmt == "NHWC"``, ``NLC`` if the model has
            ``num_prefix_tokens``, else ``NCHW``.

    Returns:
        An :class:`ArchInfo` with one :class:`SiteInfo` per block and per stage.

    Raises:
        TypeError: The model class is not registered (and ``fallback`` is false); the message lists
            the supported classes and how to register one.

    Examples:
        >>> import timm
        >>> info = describe(timm.create_model("resnet18", pretrained=False))
        >>> [s.path for s in info.stages]
        ['layer1', 'layer2', 'layer3', 'layer4']
        >>> info.blocks[2].path, info.blocks[2].num_chs
        ('layer2.0', 128)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"describe expects a torch.nn.Module, got {type(model).__name__}")
    fn = _lookup(model)
    if fn is not None:
        return _build(model, fn(model))
    if not fallback:
        raise _unknown_error(model)
    spec = _generic_spec(model)
    warnings.warn(
        f"{type(model).__name__} is not a registered architecture: using the {spec.layout} modules listed in "
        "model.feature_info as blocks and stages. Register it with tdsteer_timm.register_arch for block-level sites.",
        UserWarning,
        stacklevel=2,
    )
    return _build(model, spec, generic=True)
