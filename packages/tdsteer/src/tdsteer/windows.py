"""Position windows: ``positions="prompt:a:b"`` and ``positions="generated:a:b"``.

A **generated window** ``generated:a:b`` selects the generated tokens ``a`` to ``b - 1``, counted from
the first generated token: absolute positions ``P + a`` to ``P + b - 1`` where ``P`` is the padded
prompt's length, the same for every row (left padding keeps each row's generated tokens at the same
positions). It selects nothing in a plain forward call (no ``generate``).

A **prompt window** ``prompt:a:b`` is a Python slice of each row's real prompt tokens: a negative bound
counts from the end of the row's prompt, so ``prompt:-1:`` is each row's last prompt token whatever
its left padding, and bounds past the prompt are clipped to it. Inside ``generate`` the prompt is what
``generate`` was given (``n = P - padding`` real tokens per row, the padding from its
``attention_mask``, repeated for beams and ``num_return_sequences``); in a plain forward call it is the
sequence up to the call's last token (``n`` = the row's ones in the call's 2-D ``attention_mask``, so
right padding works too; without a mask, every position up to the call's end).

Eager mode (:func:`window_mask`) decides whole calls on the host where the answer is the same for
every row (a cached decoding step past the prompt, a generated window's steps) and otherwise builds a
``[1, L]`` or ``[B, L]`` mask that the tracker shares between hooked layers; a prompt window's
per-row bounds are made once per generation. The traced path (:func:`traced_window_mask`) reads the
window's bounds from :attr:`PositionTracker.window_tensor <tdsteer.positions.PositionTracker>`, so a
new window (``handle.set(positions="generated:2:6")``) does not recompile; like the other policies,
only the kind of policy and whether ``generate`` runs / a mask is given change the graph.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from tdsteer.policies import WINDOW_KINDS, PositionPolicy, Selection, Span


class PositionTracker(Protocol):
    """What a window reads from :class:`tdsteer.positions.PositionTracker` (which imports this module)."""

    prompt_length: int | None
    prompt_tensor: Tensor | None
    prompt_padding: Tensor | None
    attention_mask: Tensor | None
    rows: int | None
    window_tensor: Tensor | None
    windows: dict[tuple[Any, ...], tuple[Tensor, Tensor]]

    def window(self, length: int) -> tuple[int, int] | None: ...
    def padding(self, device: torch.device) -> Tensor | None: ...
    def positions(self, length: int, device: torch.device) -> Tensor: ...
    def traced_positions(self, length: int, device: torch.device) -> Tensor: ...
    def traced_padding(self, device: torch.device) -> Tensor | None: ...


#: what an open end (``generated:a:``) is held as in :func:`window_tensor`: past any sequence
OPEN_END = 2**62


def window_tensor(policy: PositionPolicy, device: torch.device | None) -> Tensor | None:
    """A window policy's ``[start, stop]`` as a tensor a compiled graph reads (``None`` for other policies)."""
    if policy.kind not in WINDOW_KINDS:
        return None
    stop = OPEN_END if policy.stop is None else policy.stop
    return torch.tensor([policy.start, stop], dtype=torch.long, device=device)


def window_mask(tracker: PositionTracker, policy: PositionPolicy, length: int, device: torch.device) -> Selection:
    """Which positions of the current call a window policy selects (eager mode).

    Examples:
        >>> from tdsteer.policies import as_policy
        >>> from tdsteer.positions import PositionTracker
        >>> tracker, cpu = PositionTracker(), torch.device("cpu")
        >>> window_mask(tracker, as_policy("prompt:-1:"), 4, cpu)  # a plain forward: the call is the prompt
        tensor([[False, False, False,  True]])
        >>> window_mask(tracker, as_policy("generated:0:8"), 4, cpu)  # nothing is generated
        <Span.NONE: 'none'>
    """
    prompt = tracker.prompt_length
    if policy.kind == "generated_window":
        if prompt is None:
            return Span.NONE
        stop = None if policy.stop is None else prompt + policy.stop
        return _interval(tracker, prompt + policy.start, stop, length, device)
    window = tracker.window(length)
    if prompt is not None:
        if window is not None and window[0] >= prompt:
            return Span.NONE  # a decoding step past the prompt
        padding = tracker.padding(device)
        if padding is None:  # every row's prompt is the whole prompt
            return _interval(tracker, *_host_bounds(policy, prompt), length, device)
        cached = tracker.prompt_padding is not None  # the same padding for the whole generation
        key = (policy, tracker.rows, device)
        bounds = tracker.windows.get(key) if cached else None
        if bounds is None:
            bounds = _row_bounds(policy.start, policy.stop, prompt - padding, padding)
            if cached:
                tracker.windows[key] = bounds
    elif tracker.attention_mask is not None:
        real = tracker.attention_mask.sum(-1).to(device, non_blocking=True)
        bounds = _row_bounds(policy.start, policy.stop, real, tracker.padding(device))
    elif window is not None:
        return _interval(tracker, *_host_bounds(policy, window[1]), length, device)
    else:  # the call starts at a tensor position (a static cache): its end, on the device
        bounds = _row_bounds(policy.start, policy.stop, tracker.positions(length, device)[-1:] + 1, None)
    return _between(tracker.positions(length, device).unsqueeze(0), bounds)


def traced_window_mask(
    tracker: PositionTracker, policy: PositionPolicy, length: int, device: torch.device
) -> Selection:
    """:func:`window_mask` as a traced graph computes it: the bounds, the cache length and the prompt
    length are read from tensors; only the kind of window, whether ``generate`` runs and whether
    padding is known are decided on the host."""
    bounds = tracker.window_tensor
    if bounds is None:
        raise RuntimeError(f"positions={policy.spec!r} without its bounds tensor: call PositionTracker.bind first")
    bounds = bounds.to(device)
    start, stop = bounds[0], bounds[1]
    pos = tracker.traced_positions(length, device)
    prompt = tracker.prompt_tensor
    if policy.kind == "generated_window":
        if prompt is None:
            return Span.NONE
        generated = pos - prompt.to(device)
        return ((generated >= start) & (generated < stop)).unsqueeze(0)
    padding = tracker.traced_padding(device)
    if prompt is not None:
        real = prompt.to(device) if padding is None else prompt.to(device) - padding
    elif tracker.attention_mask is not None:
        real = tracker.attention_mask.sum(-1).to(device)
    else:
        real = pos[-1:] + 1
    return _between(pos.unsqueeze(0), _row_bounds(start, stop, real, padding))


def _host_bounds(policy: PositionPolicy, real: int) -> tuple[int, int]:
    """A prompt window's ``[lo, hi)`` in a prompt of ``real`` tokens that starts at position 0."""
    lo, hi, _ = slice(policy.start, policy.stop).indices(real)
    return lo, hi


def _resolve(real: Tensor, bound: int | Tensor | None) -> Tensor:
    """A slice bound in prompts of ``real`` tokens (``[R]`` or ``[1]``), clipped to ``[0, real]``."""
    if isinstance(bound, Tensor):
        return torch.where(bound < 0, (real + bound).clamp(min=0), torch.minimum(real, bound))
    if bound is None:
        return real
    return (real + bound).clamp(min=0) if bound < 0 else real.clamp(max=bound)


def _row_bounds(
    start: int | Tensor, stop: int | Tensor | None, real: Tensor, padding: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-row absolute ``[lo, hi)`` as ``[R, 1]`` columns: the window in each row's real tokens,
    shifted by the row's leading padding."""
    lo, hi = _resolve(real, start), _resolve(real, stop)
    if padding is not None:
        lo, hi = lo + padding, hi + padding
    return lo.reshape(-1, 1), hi.reshape(-1, 1)


def _between(pos: Tensor, bounds: tuple[Tensor, Tensor]) -> Tensor:
    lo, hi = bounds
    return (pos >= lo) & (pos < hi)


def _interval(tracker: PositionTracker, lo: int, hi: int | None, length: int, device: torch.device) -> Selection:
    """Absolute positions ``[lo, hi)`` (``hi=None``: no end), the same for every row; decided on the host
    when the call's positions are known there."""
    window = tracker.window(length)
    if window is not None:
        start, stop = window
        if stop <= lo or (hi is not None and (start >= hi or hi <= lo)):
            return Span.NONE
        if start >= lo and (hi is None or stop <= hi):
            return Span.ALL
    pos = tracker.positions(length, device)
    selected = pos >= lo if hi is None else (pos >= lo) & (pos < hi)
    return selected.unsqueeze(0)
