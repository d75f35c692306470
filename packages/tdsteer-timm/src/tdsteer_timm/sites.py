"""Sites of timm models, by block or stage index."""

from __future__ import annotations

from torch import nn

from tdsteer import Site, take_indices
from tdsteer.indices import IndexSpec
from tdsteer_timm.arch import LEVELS, Level, describe


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"Unknown level {level!r}: use 'block' (every residual block) or 'stage' (every stage)")


def num_layers(model: nn.Module, level: Level = "block", *, fallback: bool = False) -> int:
    """Number of blocks or stages of a timm model.

    Args:
        model: A timm model (``timm.create_model(..., pretrained=False)`` works offline).
        level: ``"block"`` (every block) or ``"stage"`` (the stages timm lists in ``feature_info``).
        fallback: For an unregistered class, count the modules of ``model.feature_info`` (with a warning).

    Returns:
        The count that :func:`sites` indexes into.

    Examples:
        >>> import timm
        >>> num_layers(timm.create_model("resnet18", pretrained=False))
        8
        >>> num_layers(timm.create_model("resnet18", pretrained=False), "stage")
        4
    """
    _check_level(level)
    return len(describe(model, fallback=fallback).level(level))


def sites(
    model: nn.Module,
    layers: IndexSpec = None,
    level: Level = "block",
    *,
    fallback: bool = False,
) -> list[Site]:
    """Sites at the outputs of chosen blocks or stages of a timm model.

    Args:
        model: A timm model; its class (or a parent class) must be registered, see
            :func:`tdsteer_timm.supported_classes` and :func:`tdsteer_timm.register_arch`.
        layers: ``None`` for all, an int for one, a sequence of ints, or a slice; negative indices
            count from the end (:func:`tdsteer.take_indices`).
        level: ``"block"`` for block outputs (``blocks.3``, ``layer2.1``, ``stages.1.blocks.0``) or
            ``"stage"`` for stage outputs (``layer2``, ``stages.1``).
        fallback: For an unregistered class, use the modules of ``model.feature_info`` (with a warning).

    Returns:
        One :class:`tdsteer.Site` per chosen layer, with the layout (``NLC`` with ``prefix_tokens``
        for ViTs, ``NCHW`` for CNNs, ``NHWC`` for Swin) set.

    Raises:
        TypeError: The model class is not registered; the message lists the supported classes.
        IndexError: An index is out of range; the message gives the valid range.

    Examples:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4)
        >>> [s.path for s in sites(model, [0, -1])]
        ['blocks.0', 'blocks.3']
        >>> sites(model, -1)[0].prefix_tokens
        1
        >>> sites(timm.create_model("resnet18", pretrained=False), 1, level="stage")[0].path
        'layer2'
    """
    _check_level(level)
    records = describe(model, fallback=fallback).level(level)
    chosen = take_indices(len(records), layers, what=level)
    return [records[i].site() for i in chosen]
