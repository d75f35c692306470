"""Applying steering vectors: the ``SteeringVectors`` hooking context and its per-site steerers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tdhook.contexts import HookingContextFactory
from tdhook.hooks import HookFactory
from tdhook.modules import HookedModule
from tdhook.runtime import BoundHookProgram, HookProgramBuilder, HookSpec
from torch import Tensor, nn

from tdsteer.operators import Add, Custom, Operator, Scale, as_operator
from tdsteer.positions import PositionPolicy, PositionsLike, PositionTracker, Span, as_policy, wrap_generate
from tdsteer.sites import Site, SiteLike, as_site, as_sites


class _SiteSteerer:
    """Per-site state of one steering context: the vector cast once per device, dtype and scale.

    The scale and the position policy are read from ``owner`` (the :class:`SteeringVectors`) on every
    call, so that a change while the context is open applies from the next call on.
    """

    def __init__(self, site: Site, vector: Tensor | None, operator: Operator, owner: SteeringVectors) -> None:
        self.site = site
        self.vector = vector
        self.operator = operator
        self.owner = owner
        self.tracker = owner.tracker
        self.positional = vector is not None and vector.ndim == 2
        self.hidden = None if vector is None else int(vector.shape[-1])
        self._fast_add = isinstance(operator, Add) and vector is not None and not self.positional
        self._cast: dict[tuple[torch.device, torch.dtype, int], tuple[Tensor | None, Scale, Tensor | None]] = {}
        self._scale_seen = owner.scale_version

    def _prepared(self, x: Tensor) -> tuple[Tensor | None, Scale, Tensor | None]:
        """Vector and scale cast to ``x``'s device and dtype, and the ``scale * v`` of ``add``, cached."""
        if self._scale_seen != self.owner.scale_version:  # the scale changed while open
            self._cast.clear()
            self._scale_seen = self.owner.scale_version
        key = (x.device, x.dtype, x.ndim)
        prepared = self._cast.get(key)
        if prepared is None:
            wide_vector = None if self.vector is None else self.vector.to(x.device)
            wide_scale = self.owner.scale
            if isinstance(wide_scale, Tensor):
                wide_scale = wide_scale.to(x.device)
                if wide_scale.ndim == 1:
                    wide_scale = wide_scale.reshape((-1,) + (1,) * (x.ndim - 1))
            vector = None if wide_vector is None else wide_vector.to(x.dtype)
            scale = wide_scale.to(x.dtype) if isinstance(wide_scale, Tensor) else wide_scale
            # add's scale * v: computed in the vector's precision, rounded once to the activation's dtype
            delta = (wide_vector * wide_scale).to(x.dtype) if self._fast_add and wide_vector is not None else None
            prepared = (vector, scale, delta)
            self._cast[key] = prepared
        return prepared

    def __call__(self, h: Tensor) -> Tensor | None:
        """Return the steered activation, or ``None`` to leave it as it is."""
        if self.hidden is not None and h.shape[self.site.channel_dim] != self.hidden:
            raise ValueError(
                f"Site {self.site.key!r}: the steering vector has hidden size {self.hidden} but the activation has "
                f"{h.shape[self.site.channel_dim]} channels (shape {tuple(h.shape)}); the vector was made for "
                "another model or another site"
            )
        scale, policy = self.owner.scale, self.owner.policy
        if isinstance(scale, Tensor) and scale.ndim == 1 and scale.shape[0] != h.shape[0]:
            raise ValueError(
                f"Site {self.site.key!r}: scale has {scale.shape[0]} values but the batch has {h.shape[0]} rows; "
                "pass a float or one scale per batch row"
            )
        channels_first = self.site.layout == "NCHW"
        x = h.movedim(1, -1) if channels_first else h
        mask: Tensor | None = None
        if policy.per_row:
            self.tracker.check_rows(x.shape[0], self.site.key)
        if not policy.is_all:
            selected = self.tracker.weights(policy, x.shape[1], x.device, x.dtype)
            # a mask, Span.NONE or Span.ALL (no mask); the tensor test first, as an enum attribute is slower
            if isinstance(selected, Tensor):
                mask = selected
            elif selected is Span.NONE:
                return None
        vector, scale, delta = self._prepared(x)
        if delta is not None:
            out = x + (delta if mask is None else delta * mask)
        else:
            if vector is None:
                vector = x.new_zeros(x.shape[-1])
            elif self.positional:
                vector, inside = self._positional(vector, x)
                mask = inside if mask is None else mask * inside
            out = self.operator(x, vector, scale, mask)
        return out.movedim(-1, 1) if channels_first else out

    def _positional(self, vector: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gather a per-position vector ``[Lv, C]`` at each token's real position."""
        length = vector.shape[0]
        real = self.tracker.real_positions(x.shape[1], x.device)
        inside = (real >= 0) & (real < length)
        gathered = vector[real.clamp(0, length - 1)]
        return gathered, inside.unsqueeze(-1).to(x.dtype)


class SteeringVectors(HookingContextFactory):
    """A tdhook hooking context that steers chosen sites while it is open.

    The hooks sit on the model's own modules, so any call made while the context is open is
    steered: ``model(...)``, ``model.generate(...)``, or the TensorDict module that tdhook returns.

    Args:
        modules_to_steer: Sites (or module paths) to steer.
        steer_fn: tdhook-style ``steer_fn(module_key=..., output=...) -> tensor``, applied to the
            selected tensor of each site. Mutually exclusive with ``vectors``.
        vectors: One tensor per site, ``[C]`` (every position) or ``[L, C]`` (added at real positions
            ``0..L-1``, as in ActAdd), as a mapping keyed by site key or path, or a sequence.
        scale: Float, or a tensor with one value per batch row.
        operator: ``"add"``, ``"ablate"``, ``"clamp"``, ``"add_norm"``, an operator object, or a
            callable ``fn(h, v, scale) -> h``.
        positions: ``"all"``, ``"prompt"``, ``"generated"``, ``"continuation"``, an int ``k`` or
            ``"from:k"``.
        track_positions: Track positions (a root hook, a ``generate`` wrapper) even when
            ``positions`` does not need it, so that :meth:`set_positions` may switch to a policy
            that does while open. ``None``: only when needed.

    Examples:
        >>> import torch
        >>> from tdsteer import SteeringVectors
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> ctx = SteeringVectors(["0"], vectors={"0": torch.ones(4)}, scale=2.0).prepare(model)
        >>> x = torch.zeros(1, 4)
        >>> with ctx:
        ...     steered = model(x)
        >>> torch.allclose(steered - model(x), torch.full((1, 4), 2.0))
        True
    """

    def __init__(
        self,
        modules_to_steer: Sequence[SiteLike],
        steer_fn: Callable[..., Tensor] | None = None,
        *,
        vectors: Mapping[str, Tensor] | Sequence[Tensor] | None = None,
        scale: Scale = 1.0,
        operator: str | Operator | Callable[..., Tensor] = "add",
        positions: PositionsLike | PositionPolicy = "all",
        track_positions: bool | None = None,
    ) -> None:
        super().__init__()
        self.sites = as_sites(modules_to_steer)
        if (steer_fn is None) == (vectors is None):
            raise ValueError("SteeringVectors needs exactly one of steer_fn or vectors")
        self.policy = as_policy(positions)
        self.scale = _check_scale(scale)
        self._vectors = self._match_vectors(vectors) if vectors is not None else {s.key: None for s in self.sites}
        self._operators: dict[str, Operator]
        if steer_fn is not None:
            self._operators = {s.key: Custom(_tdhook_steer_fn(steer_fn, s.key)) for s in self.sites}
        else:
            op = as_operator(operator)
            self._operators = {s.key: op for s in self.sites}
        self._check_layouts(self.policy)
        self.tracker = PositionTracker()
        self.scale_version = 0  # bumped by set_scale: the hooks recompute their cast scale * v
        self._track = track_positions
        self._tracking: bool | None = None  # whether the prepared hooks track positions (None: not prepared)

    def _check_layouts(self, policy: PositionPolicy) -> None:
        for site in self.sites:
            vector = self._vectors[site.key]
            if site.layout != "NLC" and (not policy.is_all or (vector is not None and vector.ndim == 2)):
                raise ValueError(
                    f"Site {site.key!r} has layout {site.layout}: position policies and per-position vectors "
                    "apply to token sequences (NLC) only; use positions='all' and a [C] vector"
                )

    def _needs_positions(self) -> bool:
        if self._track:
            return True
        return not (self.policy.is_all and all(v is None or v.ndim == 1 for v in self._vectors.values()))

    # -- changes while open: read by the hooks from their next call on -----------------------------
    def set_scale(self, scale: Scale) -> None:
        """Steer with ``scale`` (a float, or one value per batch row) from the next call on."""
        self.scale = _check_scale(scale)
        self.scale_version += 1

    def set_positions(self, positions: PositionsLike | PositionPolicy) -> None:
        """Steer the positions of ``positions`` from the next call on.

        Raises:
            ValueError: An unknown policy, a policy on a non-token site, or one that needs position
                tracking in a context prepared without it (see ``track_positions``).
        """
        policy = as_policy(positions)
        self._check_layouts(policy)
        if self._tracking is False and not policy.is_all:
            raise ValueError(
                f"positions={positions!r} needs position tracking, which this context was opened without "
                "(its policy was 'all'); open it with track_positions=True to change the policy while it is open"
            )
        self.policy = policy
        self.tracker.set_starts(self.tracker.starts)  # drop masks built for the old policy

    def set_starts(self, starts: Tensor | None) -> None:
        """Per-row first steered positions for ``"continuation"`` (:meth:`PositionTracker.set_starts`)."""
        self.tracker.set_starts(starts)

    def _match_vectors(self, vectors: Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor | None]:
        if isinstance(vectors, Mapping):
            by_key = {(as_site(k).key if isinstance(k, (str, Site)) else k): v for k, v in vectors.items()}
            missing = [s.key for s in self.sites if s.key not in by_key]
            if missing:
                raise ValueError(f"No vector given for sites {missing}; vectors cover {sorted(by_key)}")
            matched = {s.key: by_key[s.key] for s in self.sites}
        else:
            items = list(vectors)
            if len(items) != len(self.sites):
                raise ValueError(f"Got {len(items)} vectors for {len(self.sites)} sites")
            matched = {s.key: v for s, v in zip(self.sites, items, strict=True)}
        for key, vector in matched.items():
            if not isinstance(vector, Tensor) or vector.ndim not in (1, 2):
                raise ValueError(f"Vector for site {key!r} must be a tensor [C] or [L, C], got {_describe(vector)}")
            if not torch.isfinite(vector).all():
                raise ValueError(f"Vector for site {key!r} contains NaN or infinite values")
        return dict(matched)

    def _hook_module(self, module: HookedModule) -> BoundHookProgram:
        tracker = self.tracker
        with HookProgramBuilder() as program:
            root = program.resolve_path(module.hook_root, "", relative_path=module.relative_path)
            for site in self.sites:
                site.module(root)  # a clear error naming the site before anything is installed
            needs_positions = self._needs_positions()
            self._tracking = needs_positions
            if needs_positions:
                self._observe_root(program, module, tracker)
            for site in self.sites:
                steerer = _SiteSteerer(site, self._vectors[site.key], self._operators[site.key], self)
                if site.io == "output":
                    hook = HookFactory.make_setting_hook(None, callback=_output_callback(site, steerer))
                    spec = HookSpec(site.path, "steer", "fwd")
                else:
                    hook = HookFactory.make_setting_hook(
                        None, callback=_input_callback(site, steerer), direction="fwd_pre_kwargs"
                    )
                    spec = HookSpec(site.path, "steer", "fwd_pre_kwargs")
                program.register_path(module.hook_root, hook, spec, relative_path=module.relative_path)
            undo = wrap_generate(root, tracker) if needs_positions else None
            if undo is not None:
                program.add_cleanup(undo)
            return program.build()

    @staticmethod
    def _observe_root(program: HookProgramBuilder, module: HookedModule, tracker: PositionTracker) -> None:
        def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tracker.observe_call(kwargs)

        def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            tracker.end_call()

        program.register_path(
            module.hook_root, before, HookSpec("", "observe", "fwd_pre_kwargs"), relative_path=module.relative_path
        )
        program.register_path(
            module.hook_root, after, HookSpec("", "observe", "fwd"), relative_path=module.relative_path
        )


def _output_callback(site: Site, steerer: _SiteSteerer) -> Callable[..., Any]:
    def callback(module: nn.Module, args: Any, output: Any, **_: Any) -> Any:
        h = site.select(output)
        new = steerer(h)
        return None if new is None else site.replace(output, new)

    return callback


def _input_callback(site: Site, steerer: _SiteSteerer) -> Callable[..., Any]:
    slot = site.slot or 0
    name = site.kwarg or "hidden_states"

    def callback(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], **_: Any) -> Any:
        if len(args) > slot:
            new = steerer(args[slot])
            if new is None:
                return None
            return args[:slot] + (new,) + args[slot + 1 :], kwargs
        if name not in kwargs:
            raise ValueError(
                f"Site {site.key!r}: the module got no positional argument {slot} and no keyword {name!r}; "
                "set Site(kwarg=...) to the keyword that holds the input"
            )
        new = steerer(kwargs[name])
        if new is None:
            return None
        return args, {**kwargs, name: new}

    return callback


def _tdhook_steer_fn(steer_fn: Callable[..., Tensor], key: str) -> Callable[[Tensor, Tensor, Scale], Tensor]:
    def fn(h: Tensor, v: Tensor, scale: Scale) -> Tensor:
        return steer_fn(module_key=key, output=h)

    return fn


def _check_scale(scale: Scale) -> Scale:
    if isinstance(scale, Tensor):
        if scale.ndim > 1:
            raise ValueError(f"scale must be a float or a 1-D tensor with one value per batch row, got {scale.shape}")
        if not torch.isfinite(scale).all():
            raise ValueError("scale contains NaN or infinite values")
        return scale.detach()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    return float(scale)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
