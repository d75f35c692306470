"""The builder: a model and its :class:`~tdsteer_timm.ArchSpec` into a :class:`tdsteer.adapter.ModelDescription`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from tdsteer import Site
from tdsteer.adapter import ModelDescription, SiteInfo
from tdsteer_timm.arch import DEFAULT_KIND, SITE_KINDS, ArchSpec, Layout, parse_key

ADAPTER = "tdsteer_timm"


def feature_entries(model: nn.Module) -> list[Mapping[str, Any]]:
    """The entries of timm's ``model.feature_info`` (a list of dicts, or a ``FeatureInfo`` wrapping one).

    Examples:
        >>> import timm
        >>> [e["module"] for e in feature_entries(timm.create_model("resnet10t", pretrained=False))]
        ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    """
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


def last_width(module: nn.Module) -> int | None:
    """Output width of the last convolution, linear or norm layer inside ``module`` (a heuristic)."""
    found: int | None = None
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            found = sub.out_channels
        elif isinstance(sub, nn.Linear):
            found = sub.out_features
        elif isinstance(sub, nn.BatchNorm2d):
            found = sub.num_features
        elif isinstance(sub, nn.LayerNorm) and sub.normalized_shape:
            found = int(sub.normalized_shape[-1])
        elif isinstance(sub, nn.GroupNorm):
            found = sub.num_channels
    return found


def following_conv_channels(model: nn.Module, path: str) -> int:
    """Channels of the module at ``path``, read as the input width of the first convolution registered
    after it: for blocks that concatenate branches (Inception, GhostNet) or have no weights (VGG's ReLUs).

    Args:
        model: The model.
        path: A module path.

    Returns:
        The ``in_channels`` of the next ``nn.Conv2d``, else the block's own last width.

    Raises:
        ValueError: Neither is found.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> following_conv_channels(net, "1")
        8
    """
    after = False
    for name, module in model.named_modules():
        if name == path:
            after = True
        elif after and not name.startswith(path + ".") and isinstance(module, nn.Conv2d):
            return module.in_channels
    own = last_width(model.get_submodule(path))
    if own is None:
        raise ValueError(f"{type(model).__name__}: cannot tell the channels of {path!r}")
    return own


def _stage_refs(model: nn.Module, spec: ArchSpec, modules: Mapping[str, nn.Module]) -> list[str]:
    """The stage site keys, in timm's index order, cut at the first that is not a module of ``model``
    (a pruned model, ``FeatureGetterNet``, keeps the stages up to its last output)."""
    entries = feature_entries(model)
    if spec.stages is not None:
        refs = list(spec.stages)
    elif spec.stages_from_feature_info and entries:
        refs = [str(e["module"]) for e in entries]
    else:
        stage_re = re.compile(spec.stage_pattern)
        refs = [path for path in modules if path and stage_re.fullmatch(path)]
    kept: list[str] = []
    for ref in refs:
        if parse_key(ref)[0] not in modules:
            break
        kept.append(ref)
    return kept


def _site(key: str, layout: Layout, prefix_tokens: int) -> Site:
    path, slot = parse_key(key)
    return Site(path, slot=slot, layout=layout, prefix_tokens=prefix_tokens if layout == "NLC" else 0)


def build(model: nn.Module, spec: ArchSpec, *, source: str = "registry", guessed: bool = False) -> ModelDescription:
    """Every block and stage site that ``spec`` names in ``model``.

    Args:
        model: The model (or the unflattened tree of a ``FeatureListNet``).
        spec: Its :class:`~tdsteer_timm.ArchSpec`.
        source: How the spec was found (``"registry"``, ``"features_only"``...).
        guessed: Whether a fallback guessed it.

    Returns:
        The description: blocks in module order, stages in timm's index order.

    Raises:
        ValueError: No module matches the block pattern or the stages, or a channel count cannot be told.
    """
    modules = dict(model.named_modules())
    order = {path: index for index, path in enumerate(modules)}
    block_re = re.compile(spec.block_pattern)
    block_paths = [path for path in modules if path and block_re.fullmatch(path)]
    stage_keys = _stage_refs(model, spec, modules)
    name = type(model).__name__
    if not block_paths or not stage_keys:
        what, pattern = ("blocks", spec.block_pattern) if not block_paths else ("stages", spec.stage_pattern)
        raise ValueError(
            f"{name} ({spec.family}): no module path matches the {what} ({pattern!r}, or the stages the spec "
            "lists, or model.feature_info's modules). Check the registered ArchSpec against model.named_modules()."
        )
    stage_paths = [parse_key(key)[0] for key in stage_keys]
    entries = feature_entries(model)
    feature_chs = {str(e["module"]): int(e["num_chs"]) for e in entries if isinstance(e.get("num_chs"), int)}
    # feature_info[i] describes timm's stage i: trust its num_chs by index where the stages come from it
    # (or from the spec, in timm's order), or where it lists as many modules as the pattern found
    aligned = spec.stages is not None or spec.stages_from_feature_info or len(entries) == len(stage_keys)
    indexed_chs = [e.get("num_chs") for e in entries] if aligned else []

    def stage_of(path: str) -> int | None:
        if spec.stage_of is not None:
            return spec.stage_of(path)
        for index, stage in enumerate(stage_paths):
            if path == stage or path.startswith(stage + "."):
                return index
        later = [index for index, stage in enumerate(stage_paths) if order[stage] > order[path]]
        return later[0] if later else None

    def stage_channels(index: int) -> int | None:
        value = indexed_chs[index] if index < len(indexed_chs) else None
        return int(value) if isinstance(value, int) else None

    def channels(path: str) -> int:
        if path in feature_chs and path in stage_paths:
            return feature_chs[path]
        if spec.channels is not None:
            return int(spec.channels(model, path))
        own = _block_feature_chs(modules[path])
        if own is not None:
            return own
        stage = stage_of(path)
        if stage is not None and (path == stage_paths[stage] or path.startswith(stage_paths[stage] + ".")):
            known = stage_channels(stage)
            if known is not None:
                return known
        guess = last_width(modules[path])
        if guess is None:
            raise ValueError(
                f"{name} ({spec.family}): cannot tell the channels of {path!r}; "
                "give the ArchSpec a channels=fn(model, path) function."
            )
        return guess

    blocks = [
        SiteInfo(
            "block", index, _site(path, spec.block_layout(path), spec.prefix_tokens), channels(path), stage_of(path)
        )
        for index, path in enumerate(block_paths)
    ]
    stage_layout = spec.stage_layout or spec.layout
    stages = []
    for index, key in enumerate(stage_keys):
        known = stage_channels(index)
        count = known if known is not None else channels(parse_key(key)[0])
        stages.append(SiteInfo("stage", index, _site(key, stage_layout, spec.prefix_tokens), count, index))
    return describe_sites(model, spec.family, blocks, stages, source=source, guessed=guessed)


def describe_sites(
    model: nn.Module,
    architecture: str,
    blocks: Sequence[SiteInfo],
    stages: Sequence[SiteInfo],
    *,
    source: str,
    guessed: bool,
) -> ModelDescription:
    """The :class:`~tdsteer.adapter.ModelDescription` of ``model`` with these block and stage records."""
    return ModelDescription(
        adapter=ADAPTER,
        model_class=type(model).__name__,
        architecture=architecture,
        source=source,
        guessed=guessed,
        hidden_size=blocks[-1].num_chs if blocks else None,
        sites=tuple(blocks) + tuple(stages),
        kinds=SITE_KINDS,
        default_kind=DEFAULT_KIND,
    )
