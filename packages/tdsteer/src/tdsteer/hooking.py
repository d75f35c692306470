"""Installing and removing a steering context's hooks: all or nothing, in any exit order.

An :class:`Installation` is what one open context put on the model: forward hooks on its sites, a
pre-hook and a hook on the root (position tracking), and an entry in the model's ``generate``
dispatcher. Its rules:

* **Before the model's other hooks.** Site hooks go in front of every hook that is not tdsteer's, so
  that whatever reads a module's output through a hook (Hugging Face's ``output_hidden_states``
  recorders, activation recorders) sees the steered activation; among tdsteer's own hooks they keep
  the order the contexts were opened in, so an inner context applies after an outer one.
* **Any exit order.** ``generate`` is wrapped once per model by a dispatcher that holds a list of the
  open contexts' trackers; each context adds and removes its own entry, and the last one out puts the
  model's own ``generate`` back.
* **All or nothing.** A failure halfway through installing removes what was installed, found by a
  mark on each hook function rather than by handles that may not have been returned yet; Ctrl-C is
  deferred while hooks are installed or removed (:mod:`tdsteer.interrupts`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from tdhook.runtime import HookProgram, HookSpec
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from tdsteer import interrupts
from tdsteer.positions import PositionTracker
from tdsteer.sites import Site

Hook = Callable[..., Any]
_SIMPLE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MISSING: Any = object()


# -- modules --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _segments(path: str) -> tuple[str, ...] | None:
    return tuple(path.split(".")) if _SIMPLE_PATH.fullmatch(path) else None


def resolve(root: nn.Module, site: Site) -> nn.Module:
    """The module of ``site`` below ``root``, refusing containers that are never called.

    Dotted paths are walked through ``_modules`` directly (the common case, a few dictionary lookups);
    anything else goes through :meth:`Site.module` and tdhook's path grammar.

    Raises:
        ValueError: The path does not resolve, or names a container (``ModuleList``, ``ModuleDict``,
            any module without a ``forward`` of its own), whose hooks would never run.
    """
    module: nn.Module | None = root
    segments = None if isinstance(root, DistributedDataParallel) else _segments(site.path)
    if segments is None or not site.path:
        module = site.module(root)
    else:
        for name in segments:
            module = module._modules.get(name) if module is not None else None
        if module is None:
            module = site.module(root)  # its error names the site and the missing part
    if type(module).forward is nn.Module.forward:  # ModuleList, ModuleDict, ParameterList, ...
        raise ValueError(_container_message(site, module))
    return module


def _container_message(site: Site, module: nn.Module) -> str:
    children = list(module._modules)
    kind = type(module).__name__
    if children:
        first = children[0]
        example = f"{site.path}.{first}" if _segments(first) else f"{site.path}[{first!r}]"
        hint = f"use one of its {len(children)} blocks instead, e.g. {example!r}"
    else:
        hint = "use a module that the model calls"
    return (
        f"Site {site.key!r} is a {kind}, a container that the model never calls: hooks on it never run, "
        f"so it would be neither read nor steered; {hint} (adapters build block sites: tdsteer_hf.sites(model, layers=...), "
        "tdsteer_timm.sites(model, layers))"
    )


def module_device(module: nn.Module) -> Any:
    """The device of ``module``'s first parameter or buffer, or ``None`` when it has neither."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


# -- hooks ----------------------------------------------------------------------------------------


class Installation:
    """The hooks and ``generate`` entry one open context put on a model; :meth:`remove` takes them off.

    Args:
        root: The model.
        on_remove: Called once, after everything is removed (warnings about sites that never ran).
    """

    def __init__(self, root: nn.Module, on_remove: Callable[[], None] | None = None) -> None:
        self.root = root
        self.handles: list[RemovableHandle] = []
        self.modules: list[nn.Module] = []
        self.specs: list[tuple[str, bool, bool]] = []  # (path, pre, first) of each hook, for program
        self.tracker: PositionTracker | None = None
        self.on_remove = on_remove
        self.active = True
        interrupts.hold()

    def add_hook(self, module: nn.Module, hook: Hook, *, path: str, pre: bool = False, first: bool = True) -> None:
        """Register ``hook`` (marked as this installation's) on ``module``.

        Args:
            path: The module's path, for :attr:`program`.
            pre: A forward pre-hook with keyword arguments instead of a forward hook.
            first: Place it before the module's hooks that are not tdsteer's, after tdsteer's own.
        """
        hook._tdsteer_owner = self  # type: ignore[attr-defined]
        self.modules.append(module)
        if pre:
            handle = module.register_forward_pre_hook(hook, prepend=first, with_kwargs=True)
            hooks = module._forward_pre_hooks
        else:
            handle = module.register_forward_hook(hook, prepend=first)
            hooks = module._forward_hooks
        self.handles.append(handle)
        self.specs.append((path, pre, first))
        if first:
            _after_own(hooks, handle.id)

    def add_generate(self, tracker: PositionTracker) -> None:
        """Add ``tracker`` to the model's ``generate`` dispatcher (installing it if needed)."""
        self.tracker = tracker
        _push_generate(self.root, tracker)

    @property
    def program(self) -> Any:
        """tdhook's view of what was installed: one hook spec per hook, in installation order."""
        return HookProgram(
            tuple(HookSpec(path, "steer", "fwd_pre_kwargs" if pre else "fwd", first) for path, pre, first in self.specs)
        )

    @interrupts.critical(when=lambda frame: bool(frame.f_locals["self"].active))
    def remove(self) -> None:
        """Remove every hook and the ``generate`` entry; safe to call again (does nothing then)."""
        try:
            if not self.active:
                return
            for handle in self.handles:
                handle.remove()
            if len(self.handles) < len(self.modules):  # a registration cut short before its handle was kept
                self._sweep()
            if self.tracker is not None:
                _pop_generate(self.root, self.tracker)
            interrupts.release()
            self.active = False  # from here on nothing is left to protect: Ctrl-C is raised at once
            if self.on_remove is not None:
                self.on_remove()
        finally:
            interrupts.deliver()

    def _sweep(self) -> None:
        """Remove this installation's hooks by their mark (those whose handle was never recorded)."""
        for module in self.modules:
            for hooks, extra in (
                (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
                (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
            ):
                for key in [k for k, f in hooks.items() if getattr(f, "_tdsteer_owner", None) is self]:
                    del hooks[key]
                    for table in extra:
                        table.pop(key, None)


def _after_own(hooks: dict[int, Hook], key: int) -> None:
    """Move tdsteer's earlier hooks in front of the one just prepended (``key``), in their order."""
    own = [k for k, f in hooks.items() if k != key and getattr(f, "_tdsteer_owner", None) is not None]
    for earlier in reversed(own):
        hooks.move_to_end(earlier, last=False)  # type: ignore[attr-defined]


@interrupts.critical()
def install(
    root: nn.Module, build: Callable[[Installation], None], on_remove: Callable[[], None] | None
) -> Installation:
    """Run ``build`` on a fresh :class:`Installation` of ``root``: all of it, or nothing on any error.

    Returns:
        The installation (its :meth:`~Installation.remove` undoes it).
    """
    installation: Installation | None = None
    try:
        installation = Installation(root, on_remove)
        build(installation)
        interrupts.deliver()
        return installation
    except BaseException:
        try:
            if installation is not None:
                installation.on_remove = None
                _undo(installation)
        finally:
            interrupts.deliver()  # nothing deferred here may wait for a later context
        raise


def _undo(installation: Installation) -> None:
    """Remove a partial installation, whatever step it stopped at (retried once if interrupted).

    Modules are recorded and hooks marked before each registration, and the tracker before it is
    pushed, so a step cut short between registering and recording leaves nothing :meth:`remove` misses.
    """
    for _ in range(2):
        try:
            installation.remove()
            return
        except BaseException:  # a second interrupt: try once more, then give up
            continue


# -- generate -------------------------------------------------------------------------------------


def _push_generate(model: nn.Module, tracker: PositionTracker) -> None:
    current = model.__dict__.get("generate", _MISSING)
    trackers: list[PositionTracker] | None = getattr(current, "_tdsteer_trackers", None)
    if trackers is not None:
        trackers.append(tracker)
        return
    bound = getattr(model, "generate", None)
    if bound is None or not callable(bound):
        return
    trackers = [tracker]

    def generate(*args: Any, **kwargs: Any) -> Any:
        with ExitStack() as stack:
            for each in list(trackers):
                stack.enter_context(each.generation(args, kwargs))
            return bound(*args, **kwargs)

    generate.__doc__ = getattr(bound, "__doc__", None)
    generate._tdsteer_trackers = trackers  # type: ignore[attr-defined]
    generate._tdsteer_previous = current  # type: ignore[attr-defined]
    object.__setattr__(model, "generate", generate)


def _pop_generate(model: nn.Module, tracker: PositionTracker) -> None:
    current = model.__dict__.get("generate", _MISSING)
    trackers: list[PositionTracker] | None = getattr(current, "_tdsteer_trackers", None)
    if trackers is None:
        return  # replaced by someone else meanwhile: leave theirs alone
    for index, each in enumerate(trackers):
        if each is tracker:
            del trackers[index]
            break
    if not trackers:
        previous = current._tdsteer_previous  # type: ignore[attr-defined]
        if previous is _MISSING:
            model.__dict__.pop("generate", None)
        else:
            object.__setattr__(model, "generate", previous)


def generate_trackers(model: nn.Module) -> Iterator[PositionTracker]:
    """The trackers of the open contexts that wrap ``model.generate`` (for tests)."""
    yield from getattr(model.__dict__.get("generate"), "_tdsteer_trackers", ())
