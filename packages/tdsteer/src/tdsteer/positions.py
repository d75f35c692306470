"""Which token positions a steering context touches, with and without a KV cache.

Positions are absolute: position ``p`` is the ``p``-th token of the padded sequence, whether the
current forward call covers the whole sequence (no cache) or only its newest tokens (KV cache).
The context learns which absolute positions a call covers from the root model's keyword
arguments (the length of ``cache`` / ``past_key_values``, or ``cache_position``), and where the
prompt ends from the ``generate`` call it wraps. Everything a hook computes from that is a tensor
op on the activation's device: no host-device synchronisation (a static cache reports its length
as a tensor, which stays a tensor).

Leading padding (``positions="from:k"`` and per-position vectors count from each row's first real token)
comes from the ``attention_mask`` given to ``generate``: ``[B]``, one value per prompt. Beam search,
``num_return_sequences`` and sampled beams call the model with ``B * n`` rows, each prompt's rows
next to each other (Hugging Face's ``repeat_interleave``); the tracker reads each call's number of
rows from its inputs' shapes and repeats each prompt's padding ``n`` times, once per generation, not
per hook. Outside ``generate`` the call's own 2-D ``attention_mask`` gives it. Per-row starts set for
the prompts of a ``generate`` call are repeated the same way.

Per-row starts (``positions="continuation"``) are a ``[B]`` tensor of absolute positions that the
caller sets between calls (:meth:`PositionTracker.set_starts`, or
:meth:`tdsteer.SteeringHandle.set`); hooks compare them with the call's positions on the
activation's device, once per model call, and never read them back to the host.

Two paths build a selection. In eager mode (:meth:`PositionTracker.mask`) whole calls are decided on
the host when possible (:class:`Span`) and masks are built once per model call and shared by every
hooked layer. While ``torch.compile`` traces a hook (:meth:`PositionTracker.traced_mask`) every
quantity that changes between calls is read from a tensor (the cache length, the prompt length, the
``from:k`` start, the per-row starts), so that changing them does not recompile the graph.

The policies themselves live in :mod:`tdsteer.policies` (re-exported here); the masks of the windows
``"prompt:a:b"`` and ``"generated:a:b"`` in :mod:`tdsteer.windows`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from tdsteer.call_facts import call_rows, check_starts, expand_rows, leading_padding, past_length
from tdsteer.policies import (
    IMAGE_POLICIES,
    POSITION_POLICIES,
    PositionPolicy,
    PositionsLike,
    Selection,
    Span,
    as_policy,
    as_token_policy,
    site_mask,
)
from tdsteer.windows import traced_window_mask, window_mask, window_tensor

__all__ = [
    "IMAGE_POLICIES",
    "POSITION_POLICIES",
    "PositionPolicy",
    "PositionTracker",
    "PositionsLike",
    "Selection",
    "Span",
    "as_policy",
    "as_token_policy",
    "call_rows",
    "check_starts",
    "expand_rows",
    "leading_padding",
    "past_length",
    "site_mask",
]


class PositionTracker:
    """Knows the absolute positions of the current forward call and where the prompt ends.

    One tracker serves every hook of one steering context. The root pre-hook refreshes it before
    each call of the model; the ``generate`` wrapper records the prompt; the caller may set per-row
    starts (:meth:`set_starts`) for ``positions="continuation"``.

    Args:
        device: Where the tensors that a compiled graph reads live (the prompt length, the ``from:k``
            start, the per-row starts); :meth:`bind` changes it.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.start: int | Tensor = 0
        self.starts: Tensor | None = None
        self.starts_on_device: Tensor | None = None
        self._starts_on: dict[torch.device, Tensor] = {}
        self.cache_position: Tensor | None = None
        self.attention_mask: Tensor | None = None
        #: rows of the current call (from its inputs' shapes); ``None`` when unknown
        self.rows: int | None = None
        self.prompt_length: int | None = None
        self.prompt_tensor: Tensor | None = None
        self.prompt_padding: Tensor | None = None
        #: rows of the prompts given to the ``generate`` call in progress; ``None`` outside one
        self.prompt_rows: int | None = None
        self.from_tensor: Tensor | None = None
        #: a window policy's ``[start, stop]`` (:mod:`tdsteer.windows`), read by compiled graphs
        self.window_tensor: Tensor | None = None
        #: per-row bounds of a prompt window, ``(policy, rows, device) -> (lo, hi)``: made once per generation
        self.windows: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self._arange: dict[torch.device, Tensor] = {}
        self._padding: Tensor | None = None
        # the prompt padding and the per-row starts repeated for a call's rows, on a device: made once
        # per generate (per set_starts)
        self._prompt_padding_on: dict[tuple[int | None, torch.device], Tensor] = {}
        self._starts_repeated: dict[tuple[int, torch.device], Tensor] = {}
        # set once a compiled graph has read the positions: from then on an eagerly observed start
        # (a compiled forward under an eager root) is handed over as a tensor
        self.traced = False
        # masks of the current call, shared by every hooked layer: built once per model call
        self._masks: dict[tuple[Any, ...], Selection] = {}

    def bind(self, device: torch.device | None, policy: PositionPolicy) -> None:
        """Keep the tensors that compiled graphs read on ``device``, and the ``from:k`` start of ``policy``."""
        if device != self.device:
            self.device = device
            self.set_starts(self.starts)
        self.set_policy(policy)

    def set_policy(self, policy: PositionPolicy) -> None:
        """Hold ``policy``'s ``from:k`` start or window bounds as a tensor (a compiled graph reads it, so a
        new ``k`` or window does not recompile)."""
        if policy.kind == "from":
            self.from_tensor = torch.full((), policy.start, dtype=torch.long, device=self.device)
        self.window_tensor = window_tensor(policy, self.device)
        self._masks.clear()

    # -- observed from the root model -------------------------------------------------------------
    def observe_call(self, kwargs: dict[str, Any]) -> None:
        """Record where the call that starts now sits in the sequence (the root pre-hook calls it)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_position = kwargs.get("cache_position")
        # The cache's length tells the host where the call starts without reading a device tensor;
        # cache_position is used only when there is no cache object to ask.
        if cache is not None or not isinstance(cache_position, Tensor):
            self.cache_position = None
            start = past_length(cache)
            if self.traced and not isinstance(start, Tensor) and not torch.compiler.is_compiling():
                # read by compiled hooks: a tensor, or the graph would be specialised on each length
                start = torch.full((), start, dtype=torch.long, device=self.device)
            self.start = start
        else:
            self.cache_position = cache_position
            self.start = 0
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        self.rows = call_rows(kwargs)
        self._padding = None
        if not torch.compiler.is_compiling():
            self._masks.clear()

    def end_call(self) -> None:
        """Forget the call that just ended (the root forward hook calls it)."""
        self.start = 0
        self.cache_position = None
        self.attention_mask = None
        self.rows = None
        self._padding = None
        if not torch.compiler.is_compiling():
            self._masks.clear()

    @contextmanager
    def generation(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
        """Inside a ``generate`` call: where the prompt ends and how each prompt is padded (``[B]``, one
        value per prompt; :meth:`padding` repeats it for calls with more rows, such as beams)."""
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(inputs, Tensor):
            inputs = kwargs.get("inputs_embeds", kwargs.get("inputs"))
        previous = (self.prompt_length, self.prompt_tensor, self.prompt_padding, self.prompt_rows)
        self.prompt_rows = None
        if isinstance(inputs, Tensor) and inputs.ndim >= 2:
            self.prompt_rows = int(inputs.shape[0])
            self.prompt_length = int(inputs.shape[1])
            device = self.device if self.device is not None else inputs.device
            self.prompt_tensor = torch.full((), self.prompt_length, dtype=torch.long, device=device)
        mask = kwargs.get("attention_mask")
        self.prompt_padding = leading_padding(mask) if isinstance(mask, Tensor) and mask.ndim == 2 else None
        self._prompt_padding_on.clear()
        self._starts_repeated.clear()
        self.windows.clear()
        try:
            yield
        finally:
            self.prompt_length, self.prompt_tensor, self.prompt_padding, self.prompt_rows = previous
            self._prompt_padding_on.clear()
            self._starts_repeated.clear()
            self.windows.clear()

    # -- set by the caller ------------------------------------------------------------------------
    def set_starts(self, starts: Tensor | None) -> None:
        """Set (or clear, with ``None``) the first steered position of each row, for ``"continuation"``.

        Args:
            starts: ``[B]`` integer tensor of absolute positions (position ``p`` is the ``p``-th token
                of the padded sequence, as in a KV-cached ``generate``), on any device; it is moved
                to each activation's device once, not read back. It stays in force for every call
                until it is changed: set it before each batch. Inside ``generate``, starts set for
                its prompts are repeated for calls with several rows per prompt (beams,
                ``num_return_sequences``).

        Raises:
            ValueError: Not a 1-D integer tensor.

        Examples:
            >>> tracker, cpu = PositionTracker(), torch.device("cpu")
            >>> tracker.set_starts(torch.tensor([1, 3]))
            >>> tracker.mask(as_policy("continuation"), 4, cpu)
            tensor([[False,  True,  True,  True],
                    [False, False, False,  True]])
        """
        check_starts(starts)
        self._starts_on.clear()
        self._starts_repeated.clear()
        self.starts_on_device = None
        if starts is not None and self.device is not None:
            self.starts_on_device = starts.to(self.device, non_blocking=True)
            self._starts_on[self.device] = self.starts_on_device
        self.starts = starts
        self._masks.clear()

    def check_rows(self, rows: int, where: str) -> None:
        """Raise ``ValueError`` when per-row starts are set for another number of rows than ``rows``
        (inside ``generate``, starts set for its prompts fit a call with several rows per prompt)."""
        if self.starts is not None and self.starts.shape[0] != rows and not self._repeats_starts(rows):
            raise ValueError(
                f"Site {where!r}: {self.starts.shape[0]} row starts were set but the batch has {rows} rows; "
                "set one start per batch row (handle.set(starts=...)) before each call"
            )

    def _repeats_starts(self, rows: int | None) -> bool:
        """Whether the starts were set for the prompts of the ``generate`` call in progress, and a
        call of ``rows`` rows holds several rows per prompt."""
        prompts = self.prompt_rows
        return (
            self.starts is not None
            and prompts is not None
            and rows is not None
            and self.starts.shape[0] == prompts != rows
            and rows % prompts == 0
        )

    def row_starts(self, device: torch.device) -> Tensor | None:
        """The per-row starts on ``device`` (moved there once), or ``None`` when none are set; inside
        ``generate``, starts set for its prompts are repeated for the current call's rows."""
        if self.starts is None:
            return None
        moved = self._starts_on.get(device)
        if moved is None:
            moved = self.starts.to(device, non_blocking=True)
            self._starts_on[device] = moved
        rows = self.rows
        if rows is not None and self._repeats_starts(rows):
            repeated = self._starts_repeated.get((rows, device))
            if repeated is None:
                repeated = self._starts_repeated[rows, device] = expand_rows(moved, rows)
            return repeated
        return moved

    # -- used by hooks ----------------------------------------------------------------------------
    def positions(self, length: int, device: torch.device) -> Tensor:
        """Absolute positions ``[L]`` of the tokens of the current call."""
        if self.cache_position is not None and self.cache_position.shape[-1] == length:
            return self.cache_position.to(device, non_blocking=True).reshape(-1)
        start = self.start
        if isinstance(start, Tensor):
            return self._counting(length, device)[:length] + start.to(device, non_blocking=True)
        return self._counting(start + length, device)[start : start + length]

    def _counting(self, stop: int, device: torch.device) -> Tensor:
        cached = self._arange.get(device)
        if cached is None or cached.shape[0] < stop:
            cached = torch.arange(max(stop, 2 * (cached.shape[0] if cached is not None else 256)), device=device)
            self._arange[device] = cached
        return cached

    def padding(self, device: torch.device) -> Tensor | None:
        """Per-row leading padding ``[B]`` of the current call's rows, or ``None`` when unknown.

        Inside ``generate``: the prompts' padding, repeated for a call with several rows per prompt
        (beams, ``num_return_sequences``); made once per generation, row count and device.

        Raises:
            ValueError: The call's rows are not a whole number of rows per prompt.
        """
        if self.prompt_padding is not None:
            key = (self.rows, device)
            expanded = self._prompt_padding_on.get(key)
            if expanded is None:
                expanded = expand_rows(self.prompt_padding, self.rows).to(device, non_blocking=True)
                self._prompt_padding_on[key] = expanded
            return expanded
        if self._padding is None and self.attention_mask is not None:
            self._padding = leading_padding(self.attention_mask)
        return None if self._padding is None else self._padding.to(device, non_blocking=True)

    def window(self, length: int) -> tuple[int, int] | None:
        """Host-side ``(start, stop)`` of the current call when known without reading a tensor."""
        if self.cache_position is not None or isinstance(self.start, Tensor):
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
        """Which positions of the current call the token policy ``policy`` selects (eager mode).

        Returns:
            :attr:`Span.ALL` when every position is selected, :attr:`Span.NONE` when none is, else a
            bool tensor ``[1, L]`` or ``[B, L]``.

        Raises:
            ValueError: A per-site policy (``"patches"``, ``"prefix"``): see :func:`site_mask`.

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
        if policy.per_site:
            raise ValueError(f"positions={policy.kind!r} is a per-site policy: use tdsteer.positions.site_mask")
        if policy.kind.endswith("_window"):
            return window_mask(self, policy, length, device)
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

    # -- while torch.compile traces a hook --------------------------------------------------------
    def traced_positions(self, length: int, device: torch.device) -> Tensor:
        """:meth:`positions` without host-side caches: what a traced graph computes."""
        self.traced = True
        if self.cache_position is not None and self.cache_position.shape[-1] == length:
            return self.cache_position.to(device).reshape(-1)
        pos = torch.arange(length, device=device)
        start = self.start
        if isinstance(start, Tensor):
            return pos + start.to(device)
        return pos + start if start else pos

    def traced_real_positions(self, length: int, device: torch.device) -> Tensor:
        """:meth:`real_positions` without host-side caches: ``[B, L]`` or ``[1, L]``."""
        pos = self.traced_positions(length, device).unsqueeze(0)
        padding = self.traced_padding(device)
        return pos if padding is None else pos - padding.unsqueeze(-1)

    def traced_padding(self, device: torch.device) -> Tensor | None:
        """:meth:`padding` without host-side caches: ``[B]`` or ``None``."""
        padding = self.prompt_padding
        if padding is not None:
            padding = expand_rows(padding, self.rows)
        elif self.attention_mask is not None:
            padding = leading_padding(self.attention_mask)
        return None if padding is None else padding.to(device)

    def traced_row_starts(self, device: torch.device) -> Tensor | None:
        """:meth:`row_starts` without host-side caches (repeated for a call with several rows per prompt)."""
        starts = self.starts_on_device if self.starts_on_device is not None else self.starts
        if starts is None:
            return None
        if self._repeats_starts(self.rows):
            starts = expand_rows(starts, self.rows)
        return starts.to(device)

    def traced_mask(self, policy: PositionPolicy, length: int, device: torch.device) -> Selection:
        """:meth:`mask` as a traced graph computes it: every value that changes between calls (the
        cache length, the prompt length, the ``from:k`` start, a window's bounds, the per-row starts) is
        read from a tensor, so that a new value does not recompile; only what changes the graph's structure (the
        policy's kind, whether ``generate`` runs, whether starts are set) is decided on the host.

        Examples:
            >>> tracker = PositionTracker()
            >>> tracker.bind(None, as_policy("from:2"))
            >>> tracker.traced_mask(as_policy("from:2"), 4, torch.device("cpu"))
            tensor([[False, False,  True,  True]])
        """
        kind = policy.kind
        if kind == "all" or policy.per_site:
            raise ValueError(f"positions={kind!r} needs no tracking")
        if kind.endswith("_window"):
            return traced_window_mask(self, policy, length, device)
        if kind == "continuation":
            starts = self.traced_row_starts(device)
            if starts is not None:
                pos = self.traced_positions(length, device).unsqueeze(0)
                return pos >= starts.unsqueeze(-1)
            if self.prompt_tensor is None:
                return Span.NONE
            pos = self.traced_positions(length, device)
            return (pos >= self.prompt_tensor.to(device) - 1).unsqueeze(0)
        if kind in ("prompt", "generated"):
            if self.prompt_tensor is None:
                return Span.ALL if kind == "prompt" else Span.NONE
            pos = self.traced_positions(length, device)
            boundary = self.prompt_tensor.to(device)
            return (pos < boundary if kind == "prompt" else pos >= boundary).unsqueeze(0)
        start = self.from_tensor
        if start is None:
            raise RuntimeError("positions='from:k' without its start tensor: call PositionTracker.bind first")
        return self.traced_real_positions(length, device) >= start.to(device)
