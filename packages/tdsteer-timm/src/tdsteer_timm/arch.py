"""Architecture registry: where the blocks and stages of a timm model live.

Each supported model family registers one small function, keyed by model class (subclasses inherit
it), that returns an :class:`ArchSpec`: regular expressions for the block module paths, the stage
sites in timm's own index order, the activation layouts and the number of prefix tokens.
:func:`tdsteer_timm.describe` turns a spec and a model instance into a
:class:`tdsteer.adapter.ModelDescription`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import nn

Layout = Literal["NLC", "NCHW", "NHWC"]
LAYOUTS: tuple[str, ...] = ("NLC", "NCHW", "NHWC")

#: The kinds of site this adapter offers: every residual block, or every stage.
SITE_KINDS: tuple[str, ...] = ("block", "stage")
#: The kind :func:`tdsteer_timm.sites` uses when none is given.
DEFAULT_KIND = "block"

SpecFn = Callable[[nn.Module], "ArchSpec"]
F = TypeVar("F", bound=SpecFn)


@dataclass(frozen=True)
class ArchSpec:
    """What a registered family tells the builder about one model instance.

    Stage ``i`` of a description is the site whose output is timm's ``forward_intermediates``
    output ``i`` (and ``feature_info[i]``), so a stage index means the same in tdsteer and timm.

    Args:
        family: Short family name (``"vit"``, ``"resnet"``...): the description's ``architecture``.
        block_pattern: Regular expression that fully matches the path of every block
            (``r"layer\\d+\\.\\d+"``), in the grammar of ``model.named_modules()``.
        stage_pattern: Regular expression that fully matches the path of every stage
            (``r"layer\\d+"``); used when neither ``stages`` nor ``model.feature_info`` gives them.
        layout: Layout of the block outputs (and of the stage outputs unless ``stage_layout`` says
            otherwise): ``"NLC"``, ``"NCHW"`` or ``"NHWC"``.
        prefix_tokens: Leading non-patch tokens (class, distillation, register tokens) of the ``NLC``
            sites; ``0`` where the model adds its class token after the blocks (CaiT, XCiT).
        stages_from_feature_info: Take the stage sites from the modules listed in ``model.feature_info``,
            in its order (timm's index order), rather than from every ``stage_pattern`` match.
        channels: Optional ``fn(model, path) -> int`` giving the channel count of a block; when
            ``None`` the builder reads ``feature_info`` and the modules themselves.
        stages: Explicit stage sites in timm's index order, as site keys: ``"path"`` or
            ``"path#slot"`` for one tensor of a module that returns a list (CrossViT's branches).
            Overrides ``stages_from_feature_info`` and ``stage_pattern``.
        stage_layout: Layout of the stage outputs when it differs from the blocks' (PVTv2: ``NLC``
            blocks, ``NCHW`` stages).
        block_layouts: Module path -> layout of the blocks under it, where it differs from
            ``layout`` (CAFormer: ``{"stages.2": "NLC"}``).
        stage_of: Optional ``fn(block_path) -> stage index or None``; by default a block belongs to
            the stage that contains it, else to the first stage after it.
        class_token: Whether the first prefix token is a class token (``False`` for register-only
            or pooled ViTs: ``read="cls"`` is refused there).

    Examples:
        >>> ArchSpec("mynet", r"stages\\.\\d+\\.\\d+", r"stages\\.\\d+", "NCHW").layout
        'NCHW'
        >>> ArchSpec("branches", r"b\\.\\d+", r"b\\.\\d+", "NLC", 1, stages=("b.0#0", "b.0#1")).stages
        ('b.0#0', 'b.0#1')
    """

    family: str
    block_pattern: str
    stage_pattern: str
    layout: Layout
    prefix_tokens: int = 0
    stages_from_feature_info: bool = True
    channels: Callable[[nn.Module, str], int] | None = None
    stages: tuple[str, ...] | None = None
    stage_layout: Layout | None = None
    block_layouts: Mapping[str, Layout] = field(default_factory=dict)
    stage_of: Callable[[str], int | None] | None = None
    class_token: bool = False

    def __post_init__(self) -> None:
        for layout in (self.layout, self.stage_layout, *self.block_layouts.values()):
            if layout is not None and layout not in LAYOUTS:
                raise ValueError(f"ArchSpec {self.family!r}: unknown layout {layout!r}; use NLC, NCHW or NHWC")
        if self.prefix_tokens < 0:
            raise ValueError(f"ArchSpec {self.family!r}: prefix_tokens must be >= 0, got {self.prefix_tokens}")
        for pattern in (self.block_pattern, self.stage_pattern):
            re.compile(pattern)

    def block_layout(self, path: str) -> Layout:
        """The layout of the block at ``path``: the nearest ``block_layouts`` entry above it, else ``layout``.

        Examples:
            >>> spec = ArchSpec("m", r"s\\.\\d+\\.\\d+", r"s\\.\\d+", "NCHW", block_layouts={"s.1": "NLC"})
            >>> spec.block_layout("s.0.2"), spec.block_layout("s.1.0")
            ('NCHW', 'NLC')
        """
        found = [(len(p), layout) for p, layout in self.block_layouts.items() if path == p or path.startswith(p + ".")]
        return max(found)[1] if found else self.layout


def parse_key(key: str) -> tuple[str, int | None]:
    """Split a site key ``"path#slot"`` into the path and the slot (``None`` without one).

    Examples:
        >>> parse_key("blocks.0#1"), parse_key("layer1")
        (('blocks.0', 1), ('layer1', None))
    """
    path, hash_, slot = key.rpartition("#")
    if hash_ and slot.isdigit():
        return path, int(slot)
    return key, None


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

    Args:
        *classes: The model classes (subclasses inherit the entry).
        overwrite: Replace existing entries instead of raising.

    Returns:
        A decorator that registers the function and returns it unchanged.

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

    Returns:
        Class names (``"ResNet"``, ``"VisionTransformer"``...); subclasses of these are handled too.

    Examples:
        >>> "ResNet" in supported() and "Hiera" in supported()
        True
    """
    return sorted({cls.__name__ for cls in _REGISTRY})


def lookup(model: nn.Module | type) -> SpecFn | None:
    """The spec function registered for the class of ``model`` (or ``model`` itself, a class) or its
    nearest registered parent."""
    cls = model if isinstance(model, type) else type(model)
    for parent in cls.__mro__:
        fn = _REGISTRY.get(parent)
        if fn is not None:
            return fn
    return None
