"""The one builder behind :func:`tdsteer_timm.sites`: a model and its :class:`~tdsteer_timm.ArchSpec`
(registered, or guessed from ``model.feature_info``) into a :class:`tdsteer.adapter.ModelDescription`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from tdsteer import Site
from tdsteer.adapter import ModelDescription, SiteInfo, warn_fallback
from tdsteer.errors import UnknownArchitectureError
from tdsteer_timm.arch import DEFAULT_KIND, SITE_KINDS, ArchSpec, Layout, lookup, supported

ADAPTER = "tdsteer_timm"
FALLBACK = "feature_info"


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


def _build(model: nn.Module, spec: ArchSpec, *, guessed: bool = False) -> ModelDescription:
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

    def records(kind: str, paths: list[str]) -> list[SiteInfo]:
        return [
            SiteInfo(
                kind,
                index,
                Site(path, layout=spec.layout, prefix_tokens=spec.prefix_tokens),
                channels(path),
                stage_of(path),
            )
            for index, path in enumerate(paths)
        ]

    stage_sites = stage_paths
    if spec.stages_from_feature_info and entries:
        listed = [e["module"] for e in entries]
        chosen = [p for p in listed if p in modules and (stage_re.fullmatch(p) or block_re.fullmatch(p))]
        if chosen:
            stage_sites = chosen
    blocks = records("block", block_paths)
    return ModelDescription(
        adapter=ADAPTER,
        model_class=name,
        architecture=FALLBACK if guessed else spec.family,
        source=FALLBACK if guessed else "registry",
        guessed=guessed,
        hidden_size=blocks[-1].num_chs,
        sites=tuple(blocks + records("stage", stage_sites)),
        kinds=SITE_KINDS,
        default_kind=DEFAULT_KIND,
    )


def _unknown(model: nn.Module, reason: str) -> UnknownArchitectureError:
    name = type(model).__name__
    return UnknownArchitectureError(
        ADAPTER,
        name,
        supported(),
        register=(
            f"tdsteer_timm.register_architecture({name}, fn) or @tdsteer_timm.architecture_for({name}) on a "
            "function fn(model) returning tdsteer_timm.ArchSpec(family, block_pattern, stage_pattern, layout)"
        ),
        paths="tdsteer.Site('path.to.module', layout='NCHW') (or 'NLC', 'NHWC') for each module you want",
        reason=reason,
    )


def _fallback_spec(model: nn.Module) -> ArchSpec | None:
    """A spec whose blocks and stages are the modules of ``model.feature_info``; ``None`` if it lists none."""
    entries = _feature_info_entries(model)
    modules = dict(model.named_modules())
    paths = [e["module"] for e in entries if e["module"] in modules and e["module"]]
    if not paths:
        return None
    layout: Layout
    if getattr(model, "output_fmt", None) == "NHWC":
        layout = "NHWC"
    elif hasattr(model, "num_prefix_tokens"):
        layout = "NLC"
    else:
        layout = "NCHW"
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if layout == "NLC" else 0
    pattern = "|".join(re.escape(p) for p in paths)
    return ArchSpec(FALLBACK, pattern, pattern, layout, prefix, stages_from_feature_info=False)


def describe_model(model: nn.Module, fallback: bool) -> ModelDescription:
    """The body of :func:`describe`. :func:`~tdsteer_timm.sites` and :func:`~tdsteer_timm.num_layers` call it
    directly, so that the fallback's warning (``stacklevel``) points at the user's call in all three."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tdsteer_timm expects a torch.nn.Module, got {type(model).__name__}")
    fn = lookup(model)
    if fn is not None:
        return _build(model, fn(model))
    if not fallback:
        raise _unknown(model, "not registered, and fallback=False refuses a guess from model.feature_info")
    spec = _fallback_spec(model)
    if spec is None:
        raise _unknown(model, "not registered, and it has no usable model.feature_info to guess its stages from")
    found = _build(model, spec, guessed=True)
    stages = found.of_kind("stage")
    name = type(model).__name__
    warn_fallback(
        ADAPTER,
        model,
        f"its blocks and stages are the {len(stages)} {spec.layout} modules listed in model.feature_info "
        f"({stages[0].path!r} .. {stages[-1].path!r})",
        f"tdsteer_timm.register_architecture({name}, fn)",
    )
    return found


def describe(model: nn.Module, *, fallback: bool = True) -> ModelDescription:
    """Every block and stage site of a timm model, with channels, layout and stage: the one builder
    behind :func:`tdsteer_timm.sites`.

    Args:
        model: A timm model (``timm.create_model(...)``) or any module whose class is registered
            (:func:`tdsteer_timm.register_architecture`).
        fallback: For an unregistered class, guess from the modules listed in ``model.feature_info``
            (with a ``UserWarning``): they become both the blocks and the stages, with the layout
            ``NHWC`` if ``model.output_fmt == "NHWC"``, ``NLC`` if the model has ``num_prefix_tokens``,
            else ``NCHW``. ``False`` refuses to guess.

    Returns:
        A :class:`tdsteer.adapter.ModelDescription` (``adapter="tdsteer_timm"``, ``architecture`` the
        family, or ``"feature_info"`` for a guess) with one :class:`tdsteer.adapter.SiteInfo` per block
        (kind ``"block"``) and per stage (kind ``"stage"``).

    Raises:
        tdsteer.errors.UnknownArchitectureError: The class is not registered and ``fallback`` is false,
            or the fallback finds no ``feature_info``; the message lists the supported classes and
            how to register one.
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Examples:
        >>> import timm
        >>> info = describe(timm.create_model("resnet18", pretrained=False))
        >>> [s.path for s in info.of_kind("stage")]
        ['layer1', 'layer2', 'layer3', 'layer4']
        >>> info.of_kind("block")[2].path, info.of_kind("block")[2].num_chs, info.architecture
        ('layer2.0', 128, 'resnet')
    """
    return describe_model(model, fallback)
