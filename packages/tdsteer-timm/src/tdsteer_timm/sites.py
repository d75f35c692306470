"""Sites of timm models, by block or stage index: the adapter's ``sites`` and ``num_layers``."""

from __future__ import annotations

from torch import nn

from tdsteer import Site
from tdsteer.indices import IndexSpec
from tdsteer_timm.arch import DEFAULT_KIND
from tdsteer_timm.description import describe_model


def num_layers(model: nn.Module, kind: str = DEFAULT_KIND, *, fallback: bool = True) -> int:
    """Number of blocks or stages of a timm model: the count that :func:`sites` indexes into.

    Args:
        model: A timm model (``timm.create_model(..., pretrained=False)`` works offline).
        kind: ``"block"`` (every block) or ``"stage"`` (timm's ``forward_intermediates`` outputs, in its order).
        fallback: For an unregistered class, guess from ``model.feature_info`` with a warning
            (see :func:`tdsteer_timm.describe`); ``False`` raises instead.

    Returns:
        The number of sites of ``kind``: valid ``layers`` run from ``0`` to this minus one.

    Raises:
        tdsteer.errors.UnknownArchitectureError: The model cannot be placed.
        ValueError: Unknown ``kind``.

    Examples:
        >>> import timm
        >>> num_layers(timm.create_model("resnet18", pretrained=False))
        8
        >>> num_layers(timm.create_model("resnet18", pretrained=False), "stage")  # the stem is stage 0, as in timm
        5
    """
    return describe_model(model, fallback).description.num_layers(kind)


def sites(
    model: nn.Module,
    layers: IndexSpec = None,
    kind: str = DEFAULT_KIND,
    *,
    fallback: bool = True,
) -> list[Site]:
    """Sites at the outputs of chosen blocks or stages of a timm model.

    Args:
        model: A timm model; its class (or a parent class) is registered (:func:`tdsteer_timm.supported`,
            :func:`tdsteer_timm.register_architecture`), or the fallback guesses from ``feature_info``.
        layers: ``None`` for all, an int for *one* (``-1`` the last), a sequence of ints and slices,
            or a slice (``slice(-2, None)``: the last two); the one index rule of
            :func:`tdsteer.take_indices` (not timm's ``feature_take_indices``, where ``n`` means the last n).
        kind: ``"block"`` for block outputs (``blocks.3``, ``layer2.1``, ``stages.1.blocks.0``) or
            ``"stage"`` for the sites of timm's ``forward_intermediates`` outputs, numbered as timm numbers
            them (ResNet: ``act1``, ``layer1``.. ``layer4``).
        fallback: For an unregistered class, guess from ``model.feature_info`` with a warning
            (see :func:`tdsteer_timm.describe`); ``False`` raises instead.

    Returns:
        One :class:`tdsteer.Site` per chosen layer, with the layout (``NLC`` with ``prefix_tokens``
        for ViTs, ``NCHW`` for CNNs, ``NHWC`` for Swin) set.

    Raises:
        tdsteer.errors.UnknownArchitectureError: The model cannot be placed; the message lists the
            supported classes and how to register one.
        IndexError: An index is out of range; the message gives the valid range.
        ValueError: Unknown ``kind``.

    Examples:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4)
        >>> [s.path for s in sites(model, [0, -1])]
        ['blocks.0', 'blocks.3']
        >>> sites(model, -1)[0].prefix_tokens
        1
        >>> sites(timm.create_model("resnet18", pretrained=False), 1, kind="stage")[0].path  # forward_intermediates index 1
        'layer1'
    """
    return describe_model(model, fallback).description.select(layers, kind)
