"""Reading positions: which part of an activation extraction and caching keep.

A reader turns one activation (channel-last, ``[B, L, C]`` for token sequences, ``[B, H, W, C]``
for feature maps) into either one row per example, ``[B, C]``, or a :class:`TokenReading` of every
real token. Padding never leaks into a read: token readers use the attention mask, and index reads
count within each row's real tokens (``0`` = first real token, ``-1`` = last real token), whatever
the padding side.

What extraction and caching keep never shares memory with the activation it was read from
(:func:`owned`): a module's output may be changed in place later in the same forward (Falcon adds
the attention output into its MLP output), so a reading that kept a view of it would change with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from tdsteer.sites import Site, feature_map_as_tokens

ReadLike = str | int | slice


@dataclass
class ReadContext:
    """What a reader may use besides the activation.

    Args:
        site: The site being read.
        attention_mask: ``[B, L]`` mask of real tokens, or ``None`` (every token is real).
        index: ``[B]`` per-example positions counted within the real tokens (for ``read="index"``).
    """

    site: Site
    attention_mask: Tensor | None = None
    index: Tensor | None = None


@dataclass
class TokenReading:
    """Every token of a batch: ``values [B, L, C]`` and a bool ``mask [B, L]`` of the real ones."""

    values: Tensor
    mask: Tensor


Reading = Tensor | TokenReading
Reader = Callable[[Tensor, ReadContext], Reading]

READERS: dict[str, Reader] = {}


ReaderT = TypeVar("ReaderT", bound=Reader)


def register_reader(name: str) -> Callable[[ReaderT], ReaderT]:
    """Register a reader ``fn(h, ctx) -> [B, C] or TokenReading`` under ``name``.

    A reader may return a view of ``h``: extraction and caching copy what shares memory with the
    activation (:func:`owned`), so only readers that reduce keep it without a copy.

    Examples:
        >>> @register_reader("max")
        ... def read_max(h, ctx):
        ...     return h.amax(dim=1)
    """

    def decorator(fn: ReaderT) -> ReaderT:
        READERS[name] = fn
        return fn

    return decorator


def _tokens(h: Tensor, site: Site) -> Tensor:
    """Any layout as ``[B, L, C]`` (feature maps flattened over space)."""
    if h.ndim == 3:
        return h
    if h.ndim == 4:
        if site.layout == "NLC":
            raise ValueError(feature_map_as_tokens(site, h))
        return h.flatten(1, 2)
    if h.ndim == 2:
        return h.unsqueeze(1)
    raise ValueError(f"Site {site.key!r}: cannot read an activation of shape {tuple(h.shape)}")


def _mask(h: Tensor, ctx: ReadContext) -> Tensor:
    if ctx.attention_mask is None or h.ndim != 3:
        return torch.ones(h.shape[0], h.shape[1], dtype=torch.bool, device=h.device)
    mask = ctx.attention_mask.to(h.device, non_blocking=True).bool()
    if mask.shape != h.shape[:2]:
        raise ValueError(
            f"Site {ctx.site.key!r}: attention mask has shape {tuple(mask.shape)} but the activation has "
            f"{tuple(h.shape[:2])} (batch, tokens); read sites whose outputs keep the token axis"
        )
    return mask


def _bounds(mask: Tensor) -> tuple[Tensor, Tensor]:
    """First and last real token index of each row."""
    length = mask.shape[1]
    first = mask.to(torch.int8).argmax(-1)
    last = length - 1 - mask.flip(-1).to(torch.int8).argmax(-1)
    return first, last


def real_to_absolute(index: Tensor, mask: Tensor, site: Site) -> Tensor:
    """Map per-row positions counted within the real tokens to positions in the padded tensor."""
    first, last = _bounds(mask)
    index = index.to(mask.device)
    absolute = torch.where(index >= 0, first + index, last + 1 + index)
    if bool(((absolute < first) | (absolute > last)).any()):
        counts = mask.sum(-1).tolist()
        raise IndexError(
            f"Site {site.key!r}: read index {index.tolist()} is outside the real tokens of some rows "
            f"(real token counts {counts}); indices count within the non-padding tokens"
        )
    return absolute


def _gather(h: Tensor, absolute: Tensor) -> Tensor:
    rows = torch.arange(h.shape[0], device=h.device)
    return h[rows, absolute.to(h.device)]


@register_reader("last")
def read_last(h: Tensor, ctx: ReadContext) -> Tensor:
    """The last real token of each row (left or right padding)."""
    x = _tokens(h, ctx.site)
    return _gather(x, _bounds(_mask(x, ctx))[1])


@register_reader("first")
def read_first(h: Tensor, ctx: ReadContext) -> Tensor:
    """The first real token of each row."""
    x = _tokens(h, ctx.site)
    return _gather(x, _bounds(_mask(x, ctx))[0])


@register_reader("mean")
def read_mean(h: Tensor, ctx: ReadContext) -> Tensor:
    """The mean over the real tokens of each row (over all positions of a feature map)."""
    x = _tokens(h, ctx.site)
    mask = _mask(x, ctx).to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1)


@register_reader("all")
def read_all(h: Tensor, ctx: ReadContext) -> TokenReading:
    """Every real token (every spatial position of a feature map).

    The values may be ``h`` itself (a view); :func:`owned` copies them, as it does any reading that
    shares memory with the activation.
    """
    x = _tokens(h, ctx.site)
    return TokenReading(x, _mask(x, ctx))


@register_reader("answer")
@register_reader("index")
def read_index(h: Tensor, ctx: ReadContext) -> Tensor:
    """The per-example position in the batch's index entry, counted within the real tokens.

    Registered as ``"index"`` and ``"answer"`` (the answer token that text adapters locate).
    """
    if ctx.index is None:
        raise ValueError(
            f"read='index' at site {ctx.site.key!r} needs per-example indices: give the batch "
            "'positive_index' and 'negative_index' entries (LongTensor [B])"
        )
    x = _tokens(h, ctx.site)
    return _gather(x, real_to_absolute(ctx.index, _mask(x, ctx), ctx.site))


def check_read(read: object, sites: Sequence[Site]) -> None:
    """Refuse, before any forward pass, a named read that cannot apply to a site.

    Raises:
        ValueError: ``read="cls"`` at a feature map or at a site whose model has no class token; the
            message names the site and the alternatives.
    """
    if read != "cls":
        return
    for site in sites:
        if site.layout != "NLC":
            raise ValueError(
                f"read='cls' needs a token sequence, but site {site.key!r} is a {site.layout} feature map; "
                "use read='spatial_mean'"
            )
        if site.class_token is False:
            raise ValueError(
                f"read='cls' at site {site.key!r}: this model has no class token there (token 0 is a patch or a "
                "register); use read='patch_mean' (the mean over patch tokens) or read='mean'"
            )


@register_reader("cls")
def read_cls(h: Tensor, ctx: ReadContext) -> Tensor:
    """The first prefix token (CLS) of a vision transformer; the first real token of a text model."""
    check_read("cls", [ctx.site])
    if h.ndim != 3:
        raise ValueError(f"read='cls' needs a token sequence, but site {ctx.site.key!r} has layout {ctx.site.layout}")
    return read_first(h, ctx)


@register_reader("patch_mean")
def read_patch_mean(h: Tensor, ctx: ReadContext) -> Tensor:
    """The mean over patch tokens, after the site's prefix tokens; spatial mean for feature maps.

    Through the attention mask when the inputs carry one (text, or padded patch sequences): the mean
    over the real tokens after the first ``prefix_tokens`` real ones, so padding never enters it. A
    text model's sites have no prefix tokens, where this is ``read="mean"``.
    """
    if h.ndim == 4:
        if ctx.site.layout == "NLC":
            raise ValueError(feature_map_as_tokens(ctx.site, h))
        return h.mean(dim=(1, 2))
    x = _tokens(h, ctx.site)
    prefix = ctx.site.prefix_tokens
    if ctx.attention_mask is None:  # image models: every token is real
        return x[:, prefix:].mean(1)
    mask = _mask(x, ctx)
    if prefix:
        real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) - _bounds(mask)[0].unsqueeze(-1)
        mask = mask & (real >= prefix)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1)


@register_reader("spatial_mean")
def read_spatial_mean(h: Tensor, ctx: ReadContext) -> Tensor:
    """The mean over the spatial positions of a feature map (:func:`read_patch_mean` for token
    sequences, through the attention mask)."""
    return read_patch_mean(h, ctx)


def _shares_memory(reading: Tensor, h: Tensor) -> bool:
    if torch.compiler.is_compiling():  # no storage to compare while tracing: copy
        return True
    try:
        return reading.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): copy
        return True


def owned(reading: Reading, h: Tensor) -> Reading:
    """``reading`` in memory of its own: a copy where it shares storage with the activation ``h``.

    Readers may return views of ``h`` (``read="all"`` does, and so may custom readers such as
    ``lambda h, ctx: h[:, -1]``); a module's output can be changed in place later in the same
    forward, or by the next one, which would change such a reading behind the caller's back.
    Readings that reduce (``"mean"``, ``"last"``, ...) are new tensors and are returned as they are.

    Examples:
        >>> h = torch.zeros(1, 2, 3)
        >>> reading = owned(h[:, -1], h)
        >>> _ = h.add_(1.0)
        >>> reading.tolist()
        [[0.0, 0.0, 0.0]]
    """
    if isinstance(reading, TokenReading):
        values = reading.values.clone() if _shares_memory(reading.values, h) else reading.values
        mask = reading.mask.clone() if _shares_memory(reading.mask, h) else reading.mask
        return reading if values is reading.values and mask is reading.mask else TokenReading(values, mask)
    if isinstance(reading, Tensor) and _shares_memory(reading, h):
        return reading.clone()
    return reading


def _index_reader(index: int) -> Reader:
    def read(h: Tensor, ctx: ReadContext) -> Tensor:
        x = _tokens(h, ctx.site)
        mask = _mask(x, ctx)
        return _gather(x, real_to_absolute(torch.full((x.shape[0],), index, device=x.device), mask, ctx.site))

    read.__name__ = f"read_index_{index}"
    return read


def _slice_reader(window: slice) -> Reader:
    def read(h: Tensor, ctx: ReadContext) -> Tensor:
        x = _tokens(h, ctx.site)
        mask = _mask(x, ctx)
        first, last = _bounds(mask)
        count = last - first + 1
        real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) - first.unsqueeze(-1)
        start, stop, step = window.start or 0, window.stop, window.step or 1
        if step != 1:
            raise ValueError(f"read slices take step 1, got {window}")
        lo = (torch.full_like(count, start) if start >= 0 else count + start).clamp_min(0)
        if stop is None:
            hi = count
        else:
            hi = torch.full_like(count, stop).minimum(count) if stop >= 0 else count + stop
        selected = mask & (real >= lo.unsqueeze(-1)) & (real < hi.unsqueeze(-1))
        if bool((selected.sum(-1) == 0).any()):
            raise IndexError(f"Site {ctx.site.key!r}: read slice {window} selects no real token in some rows")
        weights = selected.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(1) / weights.sum(1)

    read.__name__ = "read_slice"
    return read


def as_reader(read: ReadLike | Reader) -> Reader:
    """Resolve a read position: a registered name, an int (a real-token index), a slice (mean over
    that range of real tokens) or a callable ``fn(h, ctx)``.

    Examples:
        >>> import torch
        >>> from tdsteer.sites import Site
        >>> h = torch.arange(8.0).reshape(1, 4, 2)
        >>> ctx = ReadContext(Site("x"), attention_mask=torch.tensor([[0, 1, 1, 0]]))
        >>> as_reader("last")(h, ctx).tolist()
        [[4.0, 5.0]]
        >>> as_reader(0)(h, ctx).tolist()
        [[2.0, 3.0]]
    """
    if isinstance(read, bool):
        raise TypeError("read must be a name, an int, a slice or a callable, got a bool")
    if isinstance(read, int):
        return _index_reader(read)
    if isinstance(read, slice):
        return _slice_reader(read)
    if isinstance(read, str):
        try:
            return READERS[read]
        except KeyError:
            raise ValueError(
                f"Unknown read position {read!r}; use one of {', '.join(sorted(READERS))}, an int index, a slice "
                "or a callable fn(h, ctx)"
            ) from None
    if callable(read):
        return read
    raise TypeError(f"read must be a name, an int, a slice or a callable, got {type(read).__name__}")


def describe_read(read: ReadLike | Reader) -> str | int:
    """A JSON-friendly description of a read position, for metadata."""
    if isinstance(read, (str, int)):
        return read
    if isinstance(read, slice):
        return f"slice({read.start}, {read.stop})"
    return getattr(read, "__name__", repr(read))
