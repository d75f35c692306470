"""What one site's hook does with an activation: check it, select positions, apply the operator.

A :class:`SiteSteerer` reads the scale, the position policy and the vector from its context on every
call, so that a change while the context is open applies from the next call on. It has two paths:

* **eager**: the vector and ``scale * v`` are cast once per device and dtype and reused (only when
  no gradient flows into the vector: a learnable vector is recomputed on every call, so each
  backward pass gets its own graph), position masks are built once per model call and shared by
  every hooked layer, and whole calls are skipped on the host when the policy selects nothing.
* **traced**, while ``torch.compile`` traces the hook: nothing is cached in Python; the scale, the
  vector, the prompt length, the ``from:k`` start and the per-row starts are tensors the graph
  reads, so that changing them (``handle.set``) does not recompile.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from tdsteer.gating import ConditionGate
from tdsteer.operators import Add, Operator, Scale
from tdsteer.positions import PositionPolicy, PositionTracker, Selection, Span, site_mask
from tdsteer.sites import Site, feature_map_as_tokens

_Prepared = tuple[Tensor | None, Scale, Tensor | None]


class Owner(Protocol):
    """What a steerer reads from its context (:class:`tdsteer.SteeringVectors`) on every call."""

    scale: Scale
    policy: PositionPolicy
    tracker: PositionTracker
    version: int  # bumped when the scale or a vector changes
    traced: bool  # set when a compiled graph ran a hook
    gate: ConditionGate | None  # the rows a condition lets through

    def scale_tensor(self, device: torch.device, dtype: torch.dtype) -> Tensor: ...


class SiteSteerer:
    """Per-site state of one steering context.

    Args:
        site: The site.
        vector: Its direction, ``[C]`` or ``[L, C]``; ``None`` for a tdhook-style ``steer_fn``.
        operator: What steering does.
        owner: The :class:`~tdsteer.SteeringVectors` whose scale and policy it reads.
    """

    __slots__ = (
        "site",
        "vector",
        "operator",
        "owner",
        "tracker",
        "positional",
        "hidden",
        "fast_add",
        "channels_first",
        "tokens",
        "calls",
        "scale_tensor",
        "_cast",
        "_static",
    )

    def __init__(self, site: Site, vector: Tensor | None, operator: Operator, owner: Owner) -> None:
        self.site = site
        self.vector = vector
        self.operator = operator
        self.owner = owner
        self.tracker = owner.tracker
        self.positional = vector is not None and vector.ndim == 2
        self.hidden = None if vector is None else int(vector.shape[-1])
        self.fast_add = isinstance(operator, Add) and vector is not None and not self.positional
        self.channels_first = site.layout == "NCHW"
        self.tokens = site.layout == "NLC"
        self.calls = 0  # eager calls while open: a site that never ran is reported on exit
        # what a traced graph reads as the scale: a tensor updated in place by set_scale
        self.scale_tensor: Tensor | None = None if vector is None else owner.scale_tensor(vector.device, vector.dtype)
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[tuple[int, int, int], _Prepared]] = {}
        self._static: dict[tuple[Any, ...], Selection] = {}

    def set_vector(self, vector: Tensor) -> None:
        """Steer with ``vector`` (same shape rules) from the next call on; the caches notice."""
        self.vector = vector
        self.scale_tensor = self.owner.scale_tensor(vector.device, vector.dtype)

    # -- checks shared by both paths --------------------------------------------------------------
    def _check(self, h: Tensor, scale: Scale | None, positions: bool) -> None:
        if self.tokens and h.ndim == 4:
            raise ValueError(feature_map_as_tokens(self.site, h))
        if self.hidden is not None and h.shape[self.site.channel_dim] != self.hidden:
            raise ValueError(
                f"Site {self.site.key!r}: the steering vector has hidden size {self.hidden} but the activation has "
                f"{h.shape[self.site.channel_dim]} channels (shape {tuple(h.shape)}); the vector was made for "
                "another model or another site"
            )
        if isinstance(scale, Tensor) and scale.ndim == 1 and scale.shape[0] != h.shape[0]:
            raise ValueError(
                f"Site {self.site.key!r}: scale has {scale.shape[0]} values but the batch has {h.shape[0]} rows; "
                "pass a float or one scale per batch row"
            )
        if positions and self.tokens and h.ndim != 3:
            raise ValueError(
                f"Site {self.site.key!r} has layout NLC but its activation has shape {tuple(h.shape)}: position "
                "policies and per-position vectors need [batch, tokens, channels]; give a feature map its layout "
                "(Site(..., layout='NCHW' or 'NHWC')) and use positions='all', 'patches' or 'prefix'"
            )

    # -- eager ------------------------------------------------------------------------------------
    def __call__(self, h: Tensor) -> Tensor | None:
        """Return the steered activation, or ``None`` to leave it as it is."""
        if torch.compiler.is_compiling():
            return self.traced(h)
        self.calls += 1
        owner = self.owner
        policy = owner.policy
        selects = not policy.is_all
        self._check(h, owner.scale, selects or self.positional)
        x = h.movedim(1, -1) if self.channels_first else h
        mask: Tensor | None = None
        if selects:
            selected = self._select(x)
            # a mask, Span.NONE or Span.ALL (no mask); the tensor test first, as an enum attribute is slower
            if isinstance(selected, Tensor):
                mask = selected
            elif selected is Span.NONE:
                return None
        if owner.gate is not None:
            mask = owner.gate.apply(mask, x, self.site.key)
            if mask is None:
                return None
        vector, scale, delta = self._prepared(x)
        if delta is not None:
            out = x + delta if mask is None else torch.addcmul(x, mask, delta)
        else:
            if vector is None:
                vector = x.new_zeros(x.shape[-1])
            elif self.positional:
                vector, inside = self._gather(vector, self.tracker.real_positions(x.shape[1], x.device), x)
                mask = inside if mask is None else mask * inside
            out = self.operator(x, vector, scale, mask)
        return out.movedim(-1, 1) if self.channels_first else out

    def _select(self, x: Tensor) -> Selection:
        policy = self.owner.policy
        if policy.per_site:
            length = x.shape[1] if self.tokens else 0
            key = (policy.kind, length, x.device, x.dtype)
            selected = self._static.get(key)
            if selected is None:
                selected = site_mask(policy, self.site.prefix_tokens, self.tokens, length, x.device)
                if isinstance(selected, Tensor):
                    selected = selected.unsqueeze(-1).to(x.dtype)
                self._static[key] = selected
            return selected
        if policy.per_row:
            self.tracker.check_rows(x.shape[0], self.site.key)
        return self.tracker.weights(policy, x.shape[1], x.device, x.dtype)

    def _prepared(self, x: Tensor) -> _Prepared:
        """Vector and scale cast to ``x``'s device and dtype, and the ``scale * v`` of ``add``.

        Cached per device and dtype while nothing changes (the context's version, the vector object
        and its in-place version), and never while a gradient flows into the vector.
        """
        vector = self.vector
        if vector is not None and vector.requires_grad and torch.is_grad_enabled():
            return self._cast_now(vector, x)
        stamp = (self.owner.version, id(vector), 0 if vector is None else vector._version)
        key = (x.device, x.dtype)
        cached = self._cast.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        prepared = self._cast_now(vector, x)
        self._cast[key] = (stamp, prepared)
        return prepared

    def _cast_now(self, vector: Tensor | None, x: Tensor) -> _Prepared:
        wide_scale = self.owner.scale
        if isinstance(wide_scale, Tensor):
            wide_scale = wide_scale.to(x.device)
            if wide_scale.ndim == 1:
                wide_scale = wide_scale.reshape((-1,) + (1,) * (x.ndim - 1))
        scale = wide_scale.to(x.dtype) if isinstance(wide_scale, Tensor) else wide_scale
        if vector is None:
            return None, scale, None
        wide_vector = vector.to(x.device)
        # add's scale * v: computed in the vector's precision, rounded once to the activation's dtype
        delta = (wide_vector * wide_scale).to(x.dtype) if self.fast_add else None
        return wide_vector.to(x.dtype), scale, delta

    @staticmethod
    def _gather(vector: Tensor, real: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """A per-position vector ``[Lv, C]`` gathered at each token's real position, and where it applies."""
        length = vector.shape[0]
        inside = (real >= 0) & (real < length)
        return vector[real.clamp(0, length - 1)], inside.unsqueeze(-1).to(x.dtype)

    # -- while torch.compile traces the hook ------------------------------------------------------
    def traced(self, h: Tensor) -> Tensor | None:
        """What a compiled graph runs: the eager result, from tensors only, with no Python-side cache."""
        owner = self.owner
        owner.traced = True
        policy = owner.policy
        selects = policy.kind != "all"  # not is_all, which reads from:k's start: the graph would guard on it
        # the scale tensor's shape, not the float: reading a Python float would make the graph guard on its value
        self._check(h, self.scale_tensor, selects or self.positional)
        x = h.movedim(1, -1) if self.channels_first else h
        mask: Tensor | None = None
        if selects:
            if policy.per_site:
                length = x.shape[1] if self.tokens else 0
                selected = site_mask(policy, self.site.prefix_tokens, self.tokens, length, x.device)
            else:
                if policy.per_row:
                    self.tracker.check_rows(x.shape[0], self.site.key)
                selected = self.tracker.traced_mask(policy, x.shape[1], x.device)
            if selected is Span.NONE:
                return None
            if isinstance(selected, Tensor):
                mask = selected.unsqueeze(-1).to(x.dtype)
        if owner.gate is not None:
            mask = owner.gate.apply(mask, x, self.site.key)
            if mask is None:
                return None
        vector, scale_tensor = self.vector, self.scale_tensor
        if vector is None or scale_tensor is None:  # a tdhook-style steer_fn, which takes no scale
            out = self.operator(x, x.new_zeros(x.shape[-1]), 1.0, mask)
            return out.movedim(-1, 1) if self.channels_first else out
        scale = scale_tensor.to(x.device)
        if scale.ndim == 1:
            scale = scale.reshape((-1,) + (1,) * (x.ndim - 1))
        wide_vector = vector.to(x.device)
        if self.fast_add:
            delta = (wide_vector * scale).to(x.dtype)
            out = x + delta if mask is None else torch.addcmul(x, mask, delta)
        else:
            cast = wide_vector.to(x.dtype)
            if self.positional:
                real = self.tracker.traced_real_positions(x.shape[1], x.device)
                cast, inside = self._gather(cast, real, x)
                mask = inside if mask is None else mask * inside
            out = self.operator(x, cast, scale.to(x.dtype), mask)
        return out.movedim(-1, 1) if self.channels_first else out
