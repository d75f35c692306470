"""The run-time side of a :class:`~tdsteer.Condition`: which rows of the current sequence a steering
context steers.

A :class:`ConditionGate` belongs to one context. A root pre-hook marks the calls that start a sequence
(the first call of a ``generate``, or a call at position 0); in such a call a hook on the condition
site scores each row's prompt and sets the gate, and every steering hook multiplies its position
weights by it (built once per call). Nothing is read back to the host.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tdsteer.conditions import Condition
from tdsteer.hooking import Installation, resolve
from tdsteer.positions import PositionTracker


class ConditionGate:
    """A steering context's gate: which rows of the current sequence are steered.

    Args:
        condition: The condition.
        tracker: The context's position tracker (where each call sits in its sequence).
    """

    def __init__(self, condition: Condition, tracker: PositionTracker) -> None:
        self.condition = condition
        self.tracker = tracker
        #: ``[B]`` bool, the rows steered in the current sequence; ``None`` before it is decided.
        self.met: Tensor | None = None
        #: ``[B]`` the scores that decided it.
        self.scores: Tensor | None = None
        self._deciding = False
        self._sequence: object = None  # the generate call the gate was decided for
        self._weights: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._combined: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        self._warned = False
        self.decisions = 0
        # made once: the same hook functions on every entry, so that a compiled graph is reused
        self._read = self._read_hook()
        self._begin = self._begin_hook()

    def add_read_hook(self, installation: Installation, root: nn.Module) -> None:
        """Hook the condition site (before the context's steering hooks, so it reads the unsteered output)."""
        site = self.condition.site
        installation.add_hook(resolve(root, site), self._read, path=site.path)
        self.decisions = 0

    def add_begin_hook(self, installation: Installation, root: nn.Module) -> None:
        """Hook the start of every call (after the position tracker's own, whose call position it reads)."""
        installation.add_hook(root, self._begin, path="", pre=True, first=False)

    def _begin_hook(self) -> Callable[..., None]:
        def begin(module: nn.Module, args: Any, kwargs: Any) -> None:
            tracker = self.tracker
            if tracker.prompt_length is not None:  # inside generate: decided once, on its first call
                deciding = self._sequence is not tracker.prompt_tensor
            else:
                deciding = isinstance(tracker.start, int) and tracker.start == 0 and tracker.cache_position is None
            if deciding:
                self._deciding = True
                self._set(None, None)

        return begin

    def _read_hook(self) -> Callable[..., None]:
        site = self.condition.site

        def read(module: nn.Module, args: Any, output: Any) -> None:
            if not self._deciding:
                return
            h = site.select(output)
            x = h.movedim(1, -1) if site.layout == "NCHW" else h
            scores = self.condition.score(x.detach(), self._prompt_mask(x) if x.ndim == 3 else None)
            self._set(self.condition.met(scores), scores)
            self._deciding = False
            self._sequence = self.tracker.prompt_tensor
            if not torch.compiler.is_compiling():  # an int a graph would guard on; counted for report() only
                self.decisions += 1

        return read

    def _prompt_mask(self, x: Tensor) -> Tensor | None:
        """The real tokens of each row's prompt in this call: with per-row starts (a scored request's
        continuation), the tokens up to and including the start."""
        tracker, length = self.tracker, x.shape[1]
        mask = tracker.attention_mask
        if mask is not None and mask.shape[1] != length:
            mask = mask[:, -length:]
        if torch.compiler.is_compiling():  # no host-side caches while traced
            starts, positions = tracker.traced_row_starts(x.device), tracker.traced_positions
        else:
            starts, positions = tracker.row_starts(x.device), tracker.positions
        if starts is None:
            return mask
        within = positions(length, x.device).unsqueeze(0) <= starts.unsqueeze(-1)
        return within if mask is None else within & mask.to(x.device, non_blocking=True).bool()

    def _set(self, met: Tensor | None, scores: Tensor | None) -> None:
        self.met, self.scores = met, scores
        self._weights.clear()
        self._combined.clear()

    def apply(self, mask: Tensor | None, x: Tensor, key: str) -> Tensor | None:
        """``mask`` (``[1 or B, L, 1]`` position weights, or ``None`` for all) restricted to the
        steered rows, built once per call; ``None`` when no row is steered yet."""
        met = self.met
        if torch.compiler.is_compiling():
            return self._traced_apply(met, mask, x)
        if met is None:
            if self._deciding and not self._warned:
                self._warned = True
                warnings.warn(
                    f"Site {key!r} ran before the condition site {self.condition.site.key!r} in the call that read "
                    "the prompt, so it was not steered in that call: steer sites after the condition site, or use "
                    "positions='generated', for the same result with and without a KV cache",
                    UserWarning,
                    stacklevel=5,
                )
            return None
        if met.shape[0] != x.shape[0]:
            raise ValueError(
                f"The condition was decided for {met.shape[0]} rows, but this call has {x.shape[0]}: a call that "
                "continues a sequence must keep its batch"
            )
        device_dtype = (x.device, x.dtype)
        weights = self._weights.get(device_dtype)
        if weights is None:
            shape = (-1,) + (1,) * (x.ndim - 1)
            weights = self._weights[device_dtype] = met.to(x.device, x.dtype, non_blocking=True).reshape(shape)
        if mask is None:
            return weights
        cached = self._combined.get(device_dtype)
        if cached is not None and cached[0] is mask:
            return cached[1]
        combined = mask * weights
        self._combined[device_dtype] = (mask, combined)
        return combined

    @staticmethod
    def _traced_apply(met: Tensor | None, mask: Tensor | None, x: Tensor) -> Tensor | None:
        """:meth:`apply` as a compiled graph runs it: the same weights, with no Python-side cache."""
        if met is None:
            return None
        weights = met.to(x.device, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return weights if mask is None else mask * weights

    def report(self) -> None:
        """On exit: warn when calls started sequences but the condition site never read one."""
        if self._deciding and self.decisions == 0:
            warnings.warn(
                f"The condition site {self.condition.site.key!r} never ran while the context was open, so no row "
                "was steered; check the site path (model.named_modules())",
                UserWarning,
                stacklevel=4,
            )
        self._deciding = False
