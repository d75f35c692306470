"""Applying steering vectors: the ``SteeringVectors`` hooking context factory.

:class:`SteeringVectors` holds what a steering context does (sites, vectors, operator, scale,
position policy) and installs it on a model: through tdhook (``factory.prepare(model)``, a tdhook
hooking context) or directly (:func:`tdsteer.steer`, which skips tdhook's TensorDict wrapper to keep
opening a context cheap). Either way the hooks are plain PyTorch hooks that call one
:class:`~tdsteer.steerer.SiteSteerer` per site, installed all or nothing by :mod:`tdsteer.hooking`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tdhook.contexts import HookingContext, HookingContextFactory
from tdhook.modules import HookedModule
from tdhook.paths import resolve_submodule_path
from torch import Tensor, nn

from tdsteer import interrupts
from tdsteer.conditions import Condition
from tdsteer.gating import ConditionGate
from tdsteer.hooking import Installation, install, module_device, resolve
from tdsteer.operators import Custom, Operator, Scale, as_operator
from tdsteer.policies import PositionPolicy, PositionsLike, as_policy
from tdsteer.positions import PositionTracker
from tdsteer.sites import Site, SiteLike, as_sites
from tdsteer.steerer import SiteSteerer
from tdsteer.steering_inputs import check_scale, check_vector
from tdsteer.vector import SteeringVector


class SteeringVectors(HookingContextFactory):
    """A tdhook hooking context that steers chosen sites while it is open.

    The hooks sit on the model's own modules, so any call made while the context is open is
    steered: ``model(...)``, ``model.generate(...)``, or the TensorDict module that tdhook returns.
    They run before the module's other forward hooks, so whatever records a module's output through
    a hook (Hugging Face's ``output_hidden_states``) records the steered activation.

    Args:
        modules_to_steer: Sites (or module paths) to steer.
        steer_fn: tdhook-style ``steer_fn(module_key=..., output=...) -> tensor``, applied to the
            selected tensor of each site. Mutually exclusive with ``vectors``.
        vectors: One tensor per site, ``[C]`` (every position) or ``[L, C]`` (added at real positions
            ``0..L-1``, as in ActAdd), as a :class:`~tdsteer.SteeringVector`, a mapping keyed by site
            key or path, or a sequence.
        scale: Float, or a tensor with one value per batch row.
        operator: ``"add"``, ``"ablate"``, ``"clamp"``, ``"add_norm"``, an operator object, or a
            callable ``fn(h, v, scale) -> h``.
        positions: ``"all"``, ``"prompt"``, ``"generated"``, ``"continuation"``, an int ``k`` or
            ``"from:k"``, a window ``"generated:a:b"`` or ``"prompt:a:b"``, ``"patches"`` or
            ``"prefix"`` (:mod:`tdsteer.policies`).
        track_positions: Track positions (a root hook, a ``generate`` wrapper) even when
            ``positions`` does not need it, so that :meth:`set_positions` may switch to a policy
            that does while open. ``None``: only when needed.
        condition: Steer only the rows whose prompt meets it (:mod:`tdsteer.conditions`).

    Raises:
        ValueError: A bad scale, vector, operator or policy, a policy that does not fit a site.

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
        vectors: SteeringVector | Mapping[str, Tensor] | Sequence[Tensor] | None = None,
        scale: Scale = 1.0,
        operator: str | Operator | Callable[..., Tensor] = "add",
        positions: PositionsLike | PositionPolicy = "all",
        track_positions: bool | None = None,
        condition: Condition | None = None,
    ) -> None:
        super().__init__()
        self.sites = as_sites(modules_to_steer)
        self._site_keys = [s.key for s in self.sites]
        if (steer_fn is None) == (vectors is None):
            raise ValueError("SteeringVectors needs exactly one of steer_fn or vectors")
        self.policy = as_policy(positions)
        self.scale = check_scale(scale)
        self._vectors = self._match_vectors(vectors) if vectors is not None else dict.fromkeys(self._keys())
        self._operators: dict[str, Operator]
        if steer_fn is not None:
            self._operators = {key: Custom(_tdhook_steer_fn(steer_fn, key)) for key in self._site_keys}
        else:
            op = as_operator(operator)
            self._operators = dict.fromkeys(self._keys(), op)
        self._check_policy(self.policy)
        self.tracker = PositionTracker()
        self.gate = None if condition is None else ConditionGate(condition, self.tracker)
        self.version = 0  # bumped by set_scale and set_vectors: the hooks recast scale * v
        self.traced = False  # set by a hook traced by torch.compile
        self._track = track_positions
        self._tracking: bool | None = None  # whether the installed hooks track positions (None: never installed)
        self._scale_tensors: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._steerers: dict[str, SiteSteerer] = {}  # by site key, in site order
        self._hooks: list[Callable[..., Any]] = []  # one per site, in site order
        self._root_hooks: tuple[Callable[..., Any], ...] = ()
        self._installation: Installation | None = None

    def _keys(self) -> list[str]:
        return list(self._site_keys)

    def _check_policy(self, policy: PositionPolicy) -> None:
        for site, key in zip(self.sites, self._site_keys, strict=True):
            vector = self._vectors[key]
            if site.layout == "NLC":
                continue
            if policy.tokens_only:
                shown = f"positions={policy.spec!r}"
                raise ValueError(
                    f"Site {key!r} is a feature map (layout {site.layout}), which has no token positions: {shown} "
                    "applies to token sequences (NLC) only; use positions='all', 'patches' or 'prefix'"
                )
            if vector is not None and vector.ndim == 2:
                raise ValueError(
                    f"Site {key!r} is a feature map (layout {site.layout}), which has no token positions, but its "
                    f"vector is per position (shape {tuple(vector.shape)}): per-position [L, C] vectors (actadd with "
                    "read='all') apply to token sequences (NLC) only; steer a feature map with a [C] vector"
                )
        tokens = [s for s in self.sites if s.layout == "NLC"]
        if policy.kind == "patches" and tokens and not any(s.prefix_tokens for s in tokens):
            warnings.warn(
                f"positions='patches' with sites that have no prefix tokens (sites {[s.key for s in tokens]}) steers "
                "every token, as 'all' (a class token included, if the model has one): build sites with "
                "tdsteer_timm.sites, or set Site(prefix_tokens=...); tdsteer_timm.check_vector(vector, model) checks "
                "a vector's sites against the model",
                UserWarning,
                stacklevel=4,
            )
        if policy.kind == "prefix" and not any(s.layout == "NLC" and s.prefix_tokens > 0 for s in self.sites):
            raise ValueError(
                "positions='prefix' steers the class and register tokens (Site.prefix_tokens), but no site has any "
                f"(sites {self._keys()}); build sites with tdsteer_timm.sites or set Site(prefix_tokens=...)"
            )

    def _needs_positions(self) -> bool:
        if self._track or self.gate is not None:
            return True
        return self.policy.tracked or any(v is not None and v.ndim == 2 for v in self._vectors.values())

    # -- changes while open: read by the hooks from their next call on -----------------------------
    def set_scale(self, scale: Scale) -> None:
        """Steer with ``scale`` (a float, or one value per batch row) from the next call on.

        A float replaces the value of the scale tensors that compiled graphs read in place, so a
        compiled model does not recompile.
        """
        checked = check_scale(scale)
        was_float = not isinstance(self.scale, Tensor)
        self.scale = checked
        self.version += 1
        for key, tensor in list(self._scale_tensors.items()):
            if was_float and not isinstance(checked, Tensor):
                tensor.fill_(checked)
            else:
                self._scale_tensors[key] = self._make_scale(*key)
        for steerer in self._steerers.values():
            if steerer.vector is not None:
                steerer.scale_tensor = self.scale_tensor(steerer.vector.device, steerer.vector.dtype)

    def scale_tensor(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The scale as a tensor on ``device`` (0-d for a float, ``[B]`` per row), made once per device and dtype."""
        key = (device, dtype)
        tensor = self._scale_tensors.get(key)
        if tensor is None:
            tensor = self._scale_tensors[key] = self._make_scale(device, dtype)
        return tensor

    def _make_scale(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        if not dtype.is_floating_point:
            dtype = torch.float32
        if isinstance(self.scale, Tensor):
            return self.scale.to(device=device, dtype=dtype)
        return torch.full((), self.scale, dtype=dtype, device=device)

    def set_positions(self, positions: PositionsLike | PositionPolicy) -> None:
        """Steer the positions of ``positions`` from the next call on.

        Raises:
            ValueError: An unknown policy, a policy that does not fit a site, or one that needs
                position tracking in a context prepared without it (see ``track_positions``).
        """
        self.policy = self.check_positions(positions)
        self.tracker.set_policy(self.policy)  # drops masks built for the old policy

    def check_positions(self, positions: PositionsLike | PositionPolicy) -> PositionPolicy:
        """The policy :meth:`set_positions` would set, or the error it would raise."""
        policy = as_policy(positions)
        self._check_policy(policy)
        if self._tracking is False and policy.tracked:
            raise ValueError(
                f"positions={positions!r} needs position tracking, which this context was opened without "
                "(its policy did not need it); open it with track_positions=True to change the policy while it is open"
            )
        return policy

    def set_starts(self, starts: Tensor | None) -> None:
        """Per-row first steered positions for ``"continuation"`` (:meth:`PositionTracker.set_starts`)."""
        self.tracker.set_starts(starts)

    def set_vectors(self, vectors: Mapping[Any, Tensor]) -> None:
        """Steer some or all sites with new directions from the next call on.

        Args:
            vectors: ``{site or key: tensor}``; each tensor must have the shape rules of the one it
                replaces (``[C]`` or ``[L, C]`` with the same ``C``). The tensor is used as it is (not
                copied); a compiled graph reads it, so new values do not recompile.

        Raises:
            ValueError: An unknown site, a bad shape, NaN or infinite values, or a ``steer_fn`` context.
        """
        for key, vector in self.check_vectors(vectors).items():
            self._vectors[key] = vector
            steerer = self._steerers.get(key)
            if steerer is not None:
                steerer.set_vector(vector)
        self.version += 1

    def check_vectors(self, vectors: Mapping[Any, Tensor]) -> dict[str, Tensor]:
        """The vectors :meth:`set_vectors` would set, by site key, or the error it would raise."""
        updates = {_key(k): v for k, v in vectors.items()}
        for key, vector in updates.items():
            if key not in self._vectors:
                raise ValueError(f"No site {key!r} in this context (sites {self._keys()})")
            old = self._vectors[key]
            if old is None:
                raise ValueError("This context steers with a steer_fn: it has no vectors to replace")
            check_vector(key, vector)
            if vector.ndim != old.ndim or vector.shape[-1] != old.shape[-1]:
                raise ValueError(
                    f"Vector for site {key!r} must be shaped like the one it replaces ({tuple(old.shape)}), "
                    f"got {tuple(vector.shape)}"
                )
        return updates

    def _match_vectors(
        self, vectors: SteeringVector | Mapping[str, Tensor] | Sequence[Tensor]
    ) -> dict[str, Tensor | None]:
        if isinstance(vectors, SteeringVector):
            vectors = vectors.directions
        if isinstance(vectors, Mapping):
            by_key = {_key(k): v for k, v in vectors.items()}
            missing = [key for key in self._site_keys if key not in by_key]
            if missing:
                raise ValueError(f"No vector given for sites {missing}; vectors cover {sorted(by_key)}")
            matched = {key: by_key[key] for key in self._site_keys}
        else:
            items = list(vectors)
            if len(items) != len(self.sites):
                raise ValueError(f"Got {len(items)} vectors for {len(self.sites)} sites")
            matched = dict(zip(self._site_keys, items, strict=True))
        for key, vector in matched.items():
            check_vector(key, vector)
        return dict(matched)

    # -- installing ---------------------------------------------------------------------------------
    def _hook_module(self, module: HookedModule) -> Installation:
        """tdhook's entry point: install on the root of ``module`` (``factory.prepare(model)``)."""
        root = resolve_submodule_path(module.hook_root, module.relative_path)
        installation = self.install(root)
        try:
            interrupts.deliver()  # a Ctrl-C deferred since install returned
        except BaseException:
            installation.remove()
            raise
        return installation

    def install(self, root: nn.Module) -> Installation:
        """Install the hooks on ``root`` (all or nothing) and return what removes them.

        Raises:
            RuntimeError: This factory is already installed (open) on a model.
            ValueError: A site that does not resolve or is a container the model never calls.
        """
        if self._installation is not None and self._installation.active:
            raise RuntimeError(
                "This SteeringVectors is already open on a model: exit that context first, or make another "
                "SteeringVectors (or tdsteer.steer(...)) for a second, nested context"
            )
        _warn_if_compiled_without_hook_guards()
        self._installation = install(root, self._build, self._report_idle)
        return self._installation

    def _build(self, installation: Installation) -> None:
        root = installation.root
        modules = [resolve(root, site) for site in self.sites]  # every site checked before any hook
        needs_positions = self._needs_positions()
        self._tracking = needs_positions
        device = None
        for vector in self._vectors.values():
            if vector is not None:
                device = vector.device
                break
        self.tracker.bind(device if device is not None else module_device(modules[0]), self.policy)
        # a forward compiled on its own (model.forward = torch.compile(model.forward)) runs under the eager
        # root hooks: hand it the call's start as a tensor from the first call, or it compiles once per length
        self.tracker.traced = hasattr(root.__dict__.get("forward"), "_torchdynamo_orig_callable")
        self.traced = False
        if not self._steerers:  # made once: the same hook functions on every entry, so a compiled graph is reused
            for site, key in zip(self.sites, self._site_keys, strict=True):
                steerer = SiteSteerer(site, self._vectors[key], self._operators[key], self)
                self._steerers[key] = steerer
                self._hooks.append(_input_hook(site, steerer) if site.io == "input" else _output_hook(site, steerer))
            self._root_hooks = (_observe_hook(self.tracker), _end_hook(self.tracker))
        if self.gate is not None:
            self.gate.add_read_hook(installation, root)
        for site, steerer, hook, module in zip(self.sites, self._steerers.values(), self._hooks, modules, strict=True):
            steerer.calls = 0
            installation.add_hook(module, hook, path=site.path, pre=site.io == "input")
        if needs_positions:
            observe, end = self._root_hooks
            installation.add_hook(root, observe, path="", pre=True, first=False)
            if self.gate is not None:
                self.gate.add_begin_hook(installation, root)
            installation.add_hook(root, end, path="", first=False)
            installation.add_generate(self.tracker)

    def _report_idle(self) -> None:
        """On exit: warn about sites that never ran while others did (their module is never called)."""
        self.tracker.set_starts(None)
        steerers = self._steerers
        if self.traced or sys.exc_info()[0] is not None:
            return  # compiled graphs run hooks without counting calls; an exception may have cut a call short
        if self.gate is not None:
            self.gate.report()
        idle = [key for key, s in steerers.items() if s.calls == 0]
        if idle and len(idle) < len(steerers):
            busiest = max(steerers.values(), key=lambda s: s.calls)
            warnings.warn(
                f"Steering sites {idle} never ran while the context was open, while site {busiest.site.key!r} ran "
                f"{busiest.calls} time(s): their modules are not called by the model's forward, so they steered "
                "nothing; check the site paths (model.named_modules())",
                UserWarning,
                stacklevel=4,
            )


def _output_hook(site: Site, steerer: SiteSteerer) -> Callable[..., Any]:
    if site.slot in (None, 0):

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                new = steerer(output[0])
                return None if new is None else (new, *output[1:])
            if isinstance(output, list):
                new = steerer(output[0])
                return None if new is None else [new, *output[1:]]
            return steerer(output)

        return hook

    def slot_hook(module: nn.Module, args: Any, output: Any) -> Any:
        new = steerer(site.select(output))
        return None if new is None else site.replace(output, new)

    return slot_hook


def _input_hook(site: Site, steerer: SiteSteerer) -> Callable[..., Any]:
    slot = site.slot or 0
    name = site.kwarg or "hidden_states"

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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

    return hook


def _observe_hook(tracker: PositionTracker) -> Callable[..., Any]:
    def observe(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tracker.observe_call(kwargs)

    return observe


def _end_hook(tracker: PositionTracker) -> Callable[..., Any]:
    def end(module: nn.Module, args: Any, output: Any) -> None:
        tracker.end_call()

    return end


def _tdhook_steer_fn(steer_fn: Callable[..., Tensor], key: str) -> Callable[[Tensor, Tensor, Scale], Tensor]:
    def fn(h: Tensor, v: Tensor, scale: Scale) -> Tensor:
        return steer_fn(module_key=key, output=h)

    return fn


def _key(site: Any) -> Any:
    """The key of a site given as a :class:`Site` or a path (a path is its own key)."""
    return site.key if isinstance(site, Site) else site


_warned_at_graphs = 0  # the compiled-graph count when the hook-guard warning was last given


def _warn_if_compiled_without_hook_guards() -> None:
    """Warn when torch.compile has compiled graphs with guards on module hooks skipped (again after new graphs)."""
    global _warned_at_graphs
    if "torch._dynamo.utils" not in sys.modules:
        return
    from torch._dynamo import config  # loaded already: only looked at once torch.compile has been used
    from torch._dynamo.utils import counters  # the same module, loaded already

    graphs = counters["stats"].get("unique_graphs", 0)
    if config.skip_nnmodule_hook_guards and graphs > 0 and graphs != _warned_at_graphs:
        _warned_at_graphs = graphs  # again once more graphs have been compiled (another model, after a reset)
        warnings.warn(
            "torch.compile has compiled graphs in this process, and torch._dynamo.config.skip_nnmodule_hook_guards "
            "is True (torch's default): a compiled graph does not notice hooks added or removed after it was "
            "traced, so a model compiled before this context opened is not steered by it (and one compiled inside "
            "a context keeps steering). Set torch._dynamo.config.skip_nnmodule_hook_guards = False before "
            "compiling a model you steer (docs: 'Compiled models')",
            UserWarning,
            stacklevel=4,
        )


def _in_open_tdhook_context(frame: Any) -> bool:
    handle = frame.f_locals.get("self")
    installed = getattr(handle, "_handle", None)
    return isinstance(installed, Installation) and installed.active


interrupts.critical()(SteeringVectors._hook_module)
for _method in (HookingContext.__exit__, HookingContext._abort_enter):
    interrupts.register(_method.__code__, _in_open_tdhook_context)
