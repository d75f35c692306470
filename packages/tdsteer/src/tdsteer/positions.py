"""Which token positions a steering context touches, with and without a KV cache.

Positions are absolute: position ``p`` is the ``p``-th token of the padded sequence, whether the
current forward call covers the whole sequence (no cache) or only its newest tokens (KV cache).
The context learns which absolute positions a call covers from the root model's keyword
arguments (``cache_position``, or the length of ``cache`` / ``past_key_values``), and where the
prompt ends from the ``generate`` call it wraps. Everything a hook computes from that is a tensor
op on the activation's device: no host-device synchronisation.

What a hook gets for a policy is a :data:`Selection`: a mask tensor, or a :class:`Span` when the
whole call is selected (:attr:`Span.ALL`) or none of it is (:attr:`Span.NONE`) and no mask is needed.

Per-row starts (``positions="continuation"``) are a ``[B]`` tensor of absolute positions that the
caller sets between calls (:meth:`PositionTracker.set_starts`, or
:meth:`tdsteer.SteeringHandle.set`); hooks compare them with the call's positions on the
activation's device, once per model call, and never read them back to the host.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

PositionsLike = str | int


class Span(enum.Enum):
    """A selection that covers every position of the current call, or none of them.

    Hooks tell the members apart by identity (``selected is Span.NONE``), which costs no
    allocation and reads no device tensor.
    """

    ALL = "all"
    """Every position is selected: steer the whole call, no mask needed."""
    NONE = "none"
    """No position is selected: leave the activation as it is."""


Selection: TypeAlias = Tensor | Span
"""What :meth:`PositionTracker.mask` and :meth:`PositionTracker.weights` return: a mask tensor, or a
:class:`Span` when the answer is the same for every position."""


@dataclass(frozen=True)
class PositionPolicy:
    """Where steering applies along the token axis.

    Args:
        kind: ``"all"``, ``"prompt"`` (tokens of the prompt given to ``generate``; every token of a
            plain forward call), ``"generated"`` (tokens produced by ``generate``; none in a plain
            forward call), ``"continuation"`` (the positions whose outputs score a continuation:
            from each row's start on, the starts set per call with
            :meth:`PositionTracker.set_starts`; without starts, inside ``generate`` the last prompt
            token and the generated tokens, and nothing in a plain forward call) or ``"from"``
            (tokens from real position ``start`` on, counted from each row's first non-padding token).
        start: First real position for ``kind="from"``.
    """

    kind: str
    start: int = 0

    @property
    def is_all(self) -> bool:
        """Whether every position is selected, so that no position needs tracking."""
        return self.kind == "all" or (self.kind == "from" and self.start == 0)

    @property
    def per_row(self) -> bool:
        """Whether the policy reads per-row starts (:meth:`PositionTracker.set_starts`)."""
        return self.kind == "continuation"


_FROM = re.compile(r"^from[:_ ]?(\d+)$")
_NAMED = ("all", "prompt", "generated", "continuation")
POSITION_POLICIES = ("all", "prompt", "generated", "continuation", "from:K (or an int K)")


def as_policy(positions: PositionsLike | PositionPolicy) -> PositionPolicy:
    """Parse a position policy: ``"all"``, ``"prompt"``, ``"generated"``, ``"continuation"``, an int
    ``k`` or ``"from:k"``.

    Args:
        positions: The policy, by name or as a :class:`PositionPolicy`.

    Returns:
        The :class:`PositionPolicy`.

    Raises:
        TypeError: A bool.
        ValueError: An unknown name or a negative start.

    Examples:
        >>> as_policy(3)
        PositionPolicy(kind='from', start=3)
        >>> as_policy("generated").kind
        'generated'
        >>> as_policy("continuation").per_row
        True
    """
    if isinstance(positions, PositionPolicy):
        return positions
    if isinstance(positions, bool):
        raise TypeError("positions must be a policy name or an int, got a bool")
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(f"positions={positions}: a start position must be >= 0")
        return PositionPolicy("from", positions)
    if isinstance(positions, str):
        if positions in _NAMED:
            return PositionPolicy(positions)
        match = _FROM.match(positions)
        if match:
            return PositionPolicy("from", int(match.group(1)))
    raise ValueError(f"Unknown position policy {positions!r}; use one of {', '.join(POSITION_POLICIES)}")


def past_length(cache: Any) -> int:
    """Number of tokens already held by a KV cache object (0 for ``None``)."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is not None:
        return int(get())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        first = cache[0][0]
        if isinstance(first, Tensor):
            return int(first.shape[-2])
    return 0


def leading_padding(attention_mask: Tensor) -> Tensor:
    """Per-row count of padding tokens before the first real token: ``[B]``."""
    return (attention_mask.cumsum(-1) == 0).sum(-1)


class PositionTracker:
    """Knows the absolute positions of the current forward call and where the prompt ends.

    One tracker serves every hook of one steering context. The root pre-hook refreshes it before
    each call of the model; the ``generate`` wrapper records the prompt; the caller may set per-row
    starts (:meth:`set_starts`) for ``positions="continuation"``.
    """

    def __init__(self) -> None:
        self.start = 0
        self.starts: Tensor | None = None
        self._starts_on: dict[torch.device, Tensor] = {}
        self.cache_position: Tensor | None = None
        self.attention_mask: Tensor | None = None
        self.prompt_length: int | None = None
        self.prompt_padding: Tensor | None = None
        self._arange: dict[torch.device, Tensor] = {}
        self._padding: Tensor | None = None
        # masks of the current call, shared by every hooked layer: built once per model call
        self._masks: dict[tuple[Any, ...], Selection] = {}

    # -- observed from the root model -------------------------------------------------------------
    def observe_call(self, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_position = kwargs.get("cache_position")
        # The cache's length tells the host where the call starts without reading a device tensor;
        # cache_position is used only when there is no cache object to ask.
        if cache is not None or not isinstance(cache_position, Tensor):
            self.cache_position = None
            self.start = past_length(cache)
        else:
            self.cache_position = cache_position
            self.start = 0
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        self._padding = None
        self._masks.clear()

    def end_call(self) -> None:
        self.start = 0
        self.cache_position = None
        self.attention_mask = None
        self._padding = None
        self._masks.clear()

    @contextmanager
    def generation(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(inputs, Tensor):
            inputs = kwargs.get("inputs_embeds", kwargs.get("inputs"))
        previous = (self.prompt_length, self.prompt_padding)
        if isinstance(inputs, Tensor) and inputs.ndim >= 2:
            self.prompt_length = int(inputs.shape[1])
        mask = kwargs.get("attention_mask")
        self.prompt_padding = leading_padding(mask) if isinstance(mask, Tensor) and mask.ndim == 2 else None
        try:
            yield
        finally:
            self.prompt_length, self.prompt_padding = previous

    # -- set by the caller ------------------------------------------------------------------------
    def set_starts(self, starts: Tensor | None) -> None:
        """Set (or clear, with ``None``) the first steered position of each row, for ``"continuation"``.

        Args:
            starts: ``[B]`` integer tensor of absolute positions (position ``p`` is the ``p``-th token
                of the padded sequence, as in a KV-cached ``generate``), on any device; it is moved
                to each activation's device once, not read back. It stays in force for every call
                until it is changed: set it before each batch.

        Raises:
            ValueError: Not a 1-D integer tensor.

        Examples:
            >>> tracker, cpu = PositionTracker(), torch.device("cpu")
            >>> tracker.set_starts(torch.tensor([1, 3]))
            >>> tracker.mask(as_policy("continuation"), 4, cpu)
            tensor([[False,  True,  True,  True],
                    [False, False, False,  True]])
        """
        if starts is not None and (
            not isinstance(starts, Tensor)
            or starts.ndim != 1
            or starts.dtype.is_floating_point
            or starts.dtype.is_complex
            or starts.dtype == torch.bool
        ):
            shown = f"a {starts.dtype} tensor of shape {tuple(starts.shape)}" if isinstance(starts, Tensor) else starts
            raise ValueError(f"starts must be a 1-D integer tensor with one position per batch row, got {shown}")
        self.starts = starts
        self._starts_on.clear()
        self._masks.clear()

    def check_rows(self, rows: int, where: str) -> None:
        """Raise ``ValueError`` when per-row starts are set for another number of rows than ``rows``."""
        if self.starts is not None and self.starts.shape[0] != rows:
            raise ValueError(
                f"Site {where!r}: {self.starts.shape[0]} row starts were set but the batch has {rows} rows; "
                "set one start per batch row (handle.set(starts=...)) before each call"
            )

    def row_starts(self, device: torch.device) -> Tensor | None:
        """The per-row starts on ``device`` (moved there once), or ``None`` when none are set."""
        if self.starts is None:
            return None
        moved = self._starts_on.get(device)
        if moved is None:
            moved = self.starts.to(device, non_blocking=True)
            self._starts_on[device] = moved
        return moved

    # -- used by hooks ----------------------------------------------------------------------------
    def positions(self, length: int, device: torch.device) -> Tensor:
        """Absolute positions ``[L]`` of the tokens of the current call."""
        if self.cache_position is not None and self.cache_position.shape[-1] == length:
            return self.cache_position.to(device, non_blocking=True).reshape(-1)
        stop = self.start + length
        cached = self._arange.get(device)
        if cached is None or cached.shape[0] < stop:
            cached = torch.arange(max(stop, 2 * (cached.shape[0] if cached is not None else 256)), device=device)
            self._arange[device] = cached
        return cached[self.start : stop]

    def padding(self, device: torch.device) -> Tensor | None:
        """Per-row leading padding ``[B]`` of the current sequence, or ``None`` when unknown."""
        if self.prompt_padding is not None:
            return self.prompt_padding.to(device, non_blocking=True)
        if self._padding is None and self.attention_mask is not None:
            self._padding = leading_padding(self.attention_mask)
        return None if self._padding is None else self._padding.to(device, non_blocking=True)

    def window(self, length: int) -> tuple[int, int] | None:
        """Host-side ``(start, stop)`` of the current call when known without reading a tensor."""
        if self.cache_position is not None:
            return None
        return self.start, self.start + length

    def weights(self, policy: PositionPolicy, length: int, device: torch.device, dtype: torch.dtype) -> Selection:
        """:meth:`mask` with its tensor as ``[1 or B, L, 1]`` weights of ``dtype``, built once per call
        and shared by every hooked layer; a :class:`Span` is returned as it is."""
        key = (policy, length, device, dtype)
        selected = self._masks.get(key)  # never None once stored: one dict lookup per hook call
        if selected is None:
            selected = self.mask(policy, length, device)
            if isinstance(selected, Tensor):
                selected = selected.unsqueeze(-1).to(dtype)
            self._masks[key] = selected
        return selected

    def mask(self, policy: PositionPolicy, length: int, device: torch.device) -> Selection:
        """Which positions of the current call ``policy`` selects.

        Returns:
            :attr:`Span.ALL` when every position is selected, :attr:`Span.NONE` when none is, else a
            bool tensor ``[1, L]`` or ``[B, L]``.

        Examples:
            >>> tracker, cpu = PositionTracker(), torch.device("cpu")
            >>> tracker.mask(as_policy("all"), 4, cpu)
            <Span.ALL: 'all'>
            >>> tracker.mask(as_policy("generated"), 4, cpu)  # a plain forward generates nothing
            <Span.NONE: 'none'>
            >>> tracker.mask(as_policy("from:2"), 4, cpu)
            tensor([[False, False,  True,  True]])
            >>> tracker.mask(as_policy("continuation"), 4, cpu)  # no starts set, not generating
            <Span.NONE: 'none'>
        """
        if policy.is_all:
            return Span.ALL
        window = self.window(length)
        if policy.kind == "continuation":
            starts = self.row_starts(device)
            if starts is not None:
                return self.positions(length, device).unsqueeze(0) >= starts.unsqueeze(-1)
            if self.prompt_length is None:
                return Span.NONE  # a plain forward call with no starts scores no continuation
            # inside generate: the last prompt token (its output scores the first new token) and the new ones
            return self._split(self.prompt_length - 1, before=False, length=length, device=device, window=window)
        if policy.kind in ("prompt", "generated"):
            if self.prompt_length is None:
                return Span.ALL if policy.kind == "prompt" else Span.NONE
            return self._split(
                self.prompt_length, before=policy.kind == "prompt", length=length, device=device, window=window
            )
        # "from": real positions counted from each row's first non-padding token
        padding = self.padding(device)
        if padding is None and window is not None:
            start, stop = window
            if start >= policy.start:
                return Span.ALL
            if stop <= policy.start:
                return Span.NONE
        pos = self.positions(length, device).unsqueeze(0)
        if padding is not None:
            pos = pos - padding.unsqueeze(-1)
        return pos >= policy.start

    def _split(
        self, boundary: int, *, before: bool, length: int, device: torch.device, window: tuple[int, int] | None
    ) -> Selection:
        """Positions before ``boundary`` (``before``) or from it on, the same for every row."""
        if window is not None:
            start, stop = window
            if stop <= boundary:
                return Span.ALL if before else Span.NONE
            if start >= boundary:
                return Span.NONE if before else Span.ALL
        pos = self.positions(length, device)
        selected = pos < boundary if before else pos >= boundary
        return selected.unsqueeze(0)

    def real_positions(self, length: int, device: torch.device) -> Tensor:
        """Positions counted from each row's first real token: ``[B, L]`` or ``[1, L]``."""
        pos = self.positions(length, device).unsqueeze(0)
        padding = self.padding(device)
        return pos if padding is None else pos - padding.unsqueeze(-1)


def wrap_generate(model: nn.Module, tracker: PositionTracker) -> Callable[[], None] | None:
    """Route ``model.generate`` through ``tracker.generation``; return the undo, or ``None``."""
    bound = getattr(model, "generate", None)
    if bound is None or not callable(bound):
        return None
    had_own = "generate" in model.__dict__
    previous = model.__dict__.get("generate")

    def generate(*args: Any, **kwargs: Any) -> Any:
        with tracker.generation(args, kwargs):
            return bound(*args, **kwargs)

    generate.__doc__ = getattr(bound, "__doc__", None)
    object.__setattr__(model, "generate", generate)

    def undo() -> None:
        if had_own:
            object.__setattr__(model, "generate", previous)
        else:
            model.__dict__.pop("generate", None)

    return undo
