"""``describe``: how tdsteer_timm sees one model, from the registry, through a ``features_only``
wrapper, or from the checked fallback (:mod:`tdsteer_timm.fallback`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from tdsteer.adapter import ModelDescription, warn_fallback
from tdsteer.errors import UnknownArchitectureError
from tdsteer_timm.arch import lookup, supported
from tdsteer_timm.build import ADAPTER, build
from tdsteer_timm.fallback import Refusal, guess
from tdsteer_timm.features import Wrapped, relocate, unwrap


@dataclass(frozen=True)
class Resolved:
    """A description, whether its NLC sites start with a class token, the fallback's guess (if any),
    and the class to register to make the guess explicit (the wrapped one, for a features_only model)."""

    description: ModelDescription
    class_token: bool
    guessed: str | None = None
    register: str | None = None


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


def _refused(model: nn.Module, refusal: Refusal) -> UnknownArchitectureError:
    return _unknown(model, f"not registered, and the fallback's guess from model.feature_info was refused: {refusal}")


def _wrapped(model: nn.Module, wrapped: Wrapped, fallback: bool) -> Resolved:
    fn = lookup(wrapped.original) if wrapped.original is not None else None
    if fn is not None:
        spec = fn(wrapped.inner)
        return Resolved(relocate(build(wrapped.inner, spec), wrapped, model), spec.class_token)
    inner_name = wrapped.original.__name__ if wrapped.original is not None else None
    if wrapped.reference is None:  # a getter: the wrapped model is a whole timm model
        inner = resolve(wrapped.inner, fallback)
        return Resolved(relocate(inner.description, wrapped, model), inner.class_token, inner.guessed, inner_name)
    if not fallback:
        raise _unknown(
            model, f"the {inner_name or 'model'} it wraps is not registered, and fallback=False refuses a guess"
        )
    try:
        found = guess(model, translate=wrapped.translate, reference=wrapped.reference)
    except Refusal as refusal:
        raise _refused(model, refusal) from None
    return Resolved(found.description, found.class_token, found.summary, inner_name)


def resolve(model: nn.Module, fallback: bool) -> Resolved:
    """Describe ``model`` without warning: registered class, ``features_only`` wrapper, or fallback.

    Raises:
        UnknownArchitectureError: Nothing fits (the message says why).
        TypeError: ``model`` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tdsteer_timm expects a torch.nn.Module, got {type(model).__name__}")
    fn = lookup(model)
    if fn is not None:
        spec = fn(model)
        return Resolved(build(model, spec), spec.class_token)
    wrapped = unwrap(model)
    if wrapped is not None:
        return _wrapped(model, wrapped, fallback)
    if not fallback:
        raise _unknown(model, "not registered, and fallback=False refuses a guess from model.feature_info")
    try:
        found = guess(model)
    except Refusal as refusal:
        raise _refused(model, refusal) from None
    return Resolved(found.description, found.class_token, found.summary)


def _mark_class_tokens(resolved: Resolved) -> Resolved:
    """Set each token site's ``class_token``: token 0 is one when the model has a class token and the
    site keeps its prefix (CaiT and XCiT blocks have none: their class token joins later)."""
    sites = tuple(
        replace(info, site=replace(info.site, class_token=resolved.class_token and info.site.prefix_tokens > 0))
        if info.site.layout == "NLC"
        else info
        for info in resolved.description.sites
    )
    return replace(resolved, description=replace(resolved.description, sites=sites))


def describe_model(model: nn.Module, fallback: bool) -> Resolved:
    """The body of :func:`describe`. :func:`~tdsteer_timm.sites` and :func:`~tdsteer_timm.num_layers` call it
    directly, so that the fallback's warning (``stacklevel``) points at the user's call in all three."""
    resolved = _mark_class_tokens(resolve(model, fallback))
    if resolved.guessed is not None:
        name = resolved.register or type(model).__name__
        guessed = resolved.guessed if resolved.register is None else f"{resolved.guessed} (in the {name} it wraps)"
        warn_fallback(ADAPTER, model, guessed, f"tdsteer_timm.register_architecture({name}, fn)")
    return resolved


def describe(model: nn.Module, *, fallback: bool = True) -> ModelDescription:
    """Every block and stage site of a timm model, with channels, layout and stage: the one builder
    behind :func:`tdsteer_timm.sites`.

    Stage ``i`` is timm's index ``i``: the output of ``model.forward_intermediates(x, indices=[i])``
    and the module of ``model.feature_info[i]`` (ResNet's stage 0 is the stem, ``act1``). Each block
    record's ``stage`` is the stage that holds it (or the next stage after it).

    Args:
        model: A timm model (``timm.create_model(...)``, also with ``features_only=True``) or any
            module whose class is registered (:func:`tdsteer_timm.register_architecture`).
        fallback: For an unregistered class, guess from the modules listed in ``model.feature_info``
            (with a ``UserWarning``): they become both the blocks and the stages. The guess is checked
            by one ``forward_intermediates`` call on a dummy input, which measures each site's layout
            (``NCHW``, ``NHWC`` or ``NLC``) and prefix tokens; a guess it cannot confirm is refused.
            ``False`` refuses to guess.

    Returns:
        A :class:`tdsteer.adapter.ModelDescription` (``adapter="tdsteer_timm"``, ``architecture`` the
        family, or ``"feature_info"`` for a guess) with one :class:`tdsteer.adapter.SiteInfo` per block
        (kind ``"block"``) and per stage (kind ``"stage"``, ``index`` = timm's index).

    Raises:
        tdsteer.errors.UnknownArchitectureError: The class is not registered and ``fallback`` is false,
            or the fallback cannot confirm a guess; the message says why, lists the supported classes
            and how to register one.
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Examples:
        >>> import timm
        >>> info = describe(timm.create_model("resnet18", pretrained=False))
        >>> [s.path for s in info.of_kind("stage")]
        ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
        >>> info.of_kind("block")[2].path, info.of_kind("block")[2].num_chs, info.of_kind("block")[2].stage
        ('layer2.0', 128, 2)
        >>> info.architecture, info.hidden_size
        ('resnet', 512)
    """
    return describe_model(model, fallback).description
