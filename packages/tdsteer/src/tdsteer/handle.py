"""``tdsteer.steer`` and the :class:`SteeringHandle` it returns: a steering context that can change while open."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from tdsteer import interrupts
from tdsteer.checks import Check
from tdsteer.conditions import Condition
from tdsteer.hooking import Installation
from tdsteer.operators import Operator, Scale
from tdsteer.policies import PositionPolicy, PositionsLike
from tdsteer.positions import check_starts
from tdsteer.sites import Site, SiteLike, as_site, as_sites
from tdsteer.steering import SteeringVectors
from tdsteer.steering_inputs import check_scale
from tdsteer.vector import SteeringVector

_UNSET: Any = object()


class SteeringHandle:
    """What :func:`steer` returns: a steering context that can change while it is open.

    ``with handle as model:`` installs the hooks and yields the model (``handle.open()`` and
    ``handle.close()`` do the same outside a ``with`` block); ``handle.set(...)`` changes
    the scale, the vectors, the position policy or the per-row starts of the next calls, open or not,
    without re-installing hooks (and without recompiling a compiled model). On exit, and on any
    exception (Ctrl-C included), every hook is removed and the starts are cleared. A handle can be
    opened again after it has closed, but not twice at once. :func:`steer` has an example.

    Args:
        model: The model to steer.
        factory: The :class:`SteeringVectors` that hooks it.
    """

    def __init__(self, model: nn.Module, factory: SteeringVectors) -> None:
        self.model = model
        self.factory = factory
        self._installation: Installation | None = None

    @property
    def scale(self) -> Scale:
        """The scale of the next calls."""
        return self.factory.scale

    @property
    def starts(self) -> Tensor | None:
        """The per-row starts of the next calls (``positions="continuation"``), or ``None``."""
        return self.factory.tracker.starts

    @property
    def condition_met(self) -> Tensor | None:
        """With a condition: ``[B]`` bool, which rows of the latest sequence it steers (``None``
        before one was read); :attr:`condition_scores` holds their cosine similarities."""
        gate = self.factory.gate
        return None if gate is None else gate.met

    @property
    def condition_scores(self) -> Tensor | None:
        """With a condition: ``[B]`` the latest sequence's scores (see :attr:`condition_met`)."""
        gate = self.factory.gate
        return None if gate is None else gate.scores

    @property
    def is_open(self) -> bool:
        """Whether the handle's hooks are installed."""
        return self._installation is not None

    def set(
        self,
        *,
        scale: Scale = _UNSET,
        positions: PositionsLike | PositionPolicy = _UNSET,
        starts: Tensor | None = _UNSET,
        vector: SteeringVector | Mapping[Any, Tensor] = _UNSET,
    ) -> None:
        """Change the steering of the next calls.

        Args:
            scale: A new scale (a finite float, or one value per batch row).
            positions: A new position policy (from one that needs no tracking to one that does only
                when the handle was made with ``track_positions=True``).
            starts: ``[B]`` absolute first steered position of each row for ``"continuation"``
                (``None`` clears them); see :meth:`tdsteer.positions.PositionTracker.set_starts`.
            vector: New directions for some or all of the sites (a :class:`~tdsteer.SteeringVector`
                or ``{site or key: tensor}``), shaped like the ones they replace; used as they are,
                not copied.

        Raises:
            TypeError, ValueError: A bad value; nothing is changed then.

        Examples:
            >>> import torch, tdsteer
            >>> model = torch.nn.Sequential(torch.nn.Identity())
            >>> handle = tdsteer.steer(model, {"0": torch.ones(2)})
            >>> with handle:
            ...     handle.set(scale=3.0, vector={"0": torch.tensor([1.0, -1.0])})
            ...     model(torch.zeros(1, 2)).tolist()
            [[3.0, -3.0]]
        """
        factory = self.factory
        # everything is checked before anything changes
        checked_scale = check_scale(scale) if scale is not _UNSET else _UNSET
        policy = factory.check_positions(positions) if positions is not _UNSET else _UNSET
        updates = _UNSET
        if vector is not _UNSET:
            if not isinstance(vector, (SteeringVector, Mapping)):
                raise TypeError(
                    f"handle.set(vector=...) takes a SteeringVector or a mapping site -> tensor, got "
                    f"{type(vector).__name__}; for one site: handle.set(vector={{site_key: tensor}})"
                )
            updates = factory.check_vectors(vector.directions if isinstance(vector, SteeringVector) else vector)
        if starts is not _UNSET:
            check_starts(starts)
        if policy is not _UNSET:
            factory.set_positions(policy)
        if updates is not _UNSET:
            factory.set_vectors(updates)
        if checked_scale is not _UNSET:
            factory.set_scale(checked_scale)
        if starts is not _UNSET:
            factory.set_starts(starts)

    @interrupts.critical()
    def __enter__(self) -> nn.Module:
        if self._installation is not None:
            raise RuntimeError(
                "This steering context is already open: exit it first, or make a new one with tdsteer.steer(...) "
                "to nest a second context"
            )
        try:
            self._installation = self.factory.install(self.model)
            interrupts.deliver()  # a Ctrl-C deferred since install returned
        except BaseException:
            try:
                self._close()
            finally:
                interrupts.deliver()  # nothing deferred here may wait for a later context
            raise
        return self.model

    @interrupts.critical(when=lambda frame: frame.f_locals["self"]._installation is not None)
    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            self._close()
        finally:
            interrupts.deliver()

    def open(self) -> SteeringHandle:
        """Install the hooks until :meth:`close`: steering outside a ``with`` block (a notebook, a
        demo server), as repeng's ``set_control`` or steering-vectors' ``patch_activations``.

        Returns:
            The handle, for ``handle = tdsteer.steer(model, vector).open()``.

        Raises:
            RuntimeError: The handle is already open.

        Examples:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
            >>> handle = steer(model, {"0": torch.ones(2)}, scale=3.0).open()
            >>> handle.is_open
            True
            >>> handle.close(); handle.is_open
            False
        """
        self.__enter__()
        return self

    def close(self) -> None:
        """Remove the hooks :meth:`open` installed (a no-op when the handle is not open)."""
        self.__exit__(None, None, None)

    def _close(self) -> None:
        installation = self._installation
        if installation is not None:
            installation.remove()
            self._installation = None


def steer(
    model: nn.Module,
    vector: SteeringVector | Mapping[Any, Tensor],
    *,
    scale: Scale = 1.0,
    operator: str | Operator | Callable[..., Tensor] = "add",
    positions: PositionsLike | PositionPolicy = "all",
    sites: Sequence[SiteLike] | None = None,
    check: Check = "warn",
    track_positions: bool | None = None,
    condition: Condition | None = None,
) -> SteeringHandle:
    """Steer ``model`` with ``vector`` while the ``with`` block runs.

    Every call of the model inside the block (forward, ``generate``) is steered; on exit, and on any
    exception, every hook is removed. Contexts nest: the inner context's operator applies after the
    outer one's. Keep the returned :class:`SteeringHandle` to change the steering while it is open.

    Args:
        model: The model to steer (the same root the vector's site paths are relative to).
        vector: A :class:`~tdsteer.SteeringVector`, or a mapping ``{site or path: tensor}``.
        scale: Float multiplier, or a 1-D tensor with one value per batch row (a whole multiplier
            sweep in one batch).
        operator: ``"add"`` (``h + scale*v``), ``"ablate"`` (remove the projection on ``v``),
            ``"clamp"`` (set the projection to that of ``scale*v``), ``"add_norm"`` (add, then restore
            each token's norm), an operator object (:mod:`tdsteer.operators`) or a callable
            ``fn(h, v, scale) -> h``.
        positions: ``"all"``, ``"prompt"``, ``"generated"``, ``"continuation"``, an int ``k`` or
            ``"from:k"`` (real positions ``>= k``, counted from each row's first non-padding token).
            ``"continuation"`` steers each row from its start on, set per batch with
            ``handle.set(starts=...)``; without starts it steers, inside ``generate``, the last prompt
            token and the generated tokens, and nothing in a plain forward call. Windows, written
            as slices: ``"generated:a:b"`` (generated tokens ``a..b-1``; ``"generated:0:8"`` the
            first 8) and ``"prompt:a:b"`` (of each row's real prompt tokens; ``"prompt:-1:"`` its
            last). Every policy means the same with and without a KV cache. For image models, ``"patches"`` steers the token
            positions from each site's ``prefix_tokens`` on (every position of a feature map) and
            ``"prefix"`` the class and register tokens before them.
        sites: Steer only these sites of the vector.
        check: For a :class:`~tdsteer.SteeringVector`: what to do when it was made for another model
            type (``"warn"``, ``"error"`` or ``"ignore"``); see :meth:`SteeringVector.validate`.
        track_positions: Track positions even when ``positions`` does not need it, so that
            ``handle.set(positions=...)`` may leave ``"all"`` while open (``None``: when needed).
        condition: Steer only the rows whose prompt meets this :class:`~tdsteer.Condition`
            (conditional activation steering, CAST): decided per row on the first call of each
            sequence, kept while it continues (:mod:`tdsteer.conditions`).

    Returns:
        A :class:`SteeringHandle`; ``with`` it yields the model itself, steered until the block ends.

    Raises:
        ValueError: A bad scale (NaN or infinite included), vector, operator or policy; on entering the
            context, a site that does not resolve or that names a container the model never calls
            (``transformer.h`` rather than ``transformer.h.3``).
        RuntimeError: On entering, the same handle is already open.

    Examples:
        >>> import torch
        >>> import tdsteer
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
        >>> x = torch.randn(2, 3)
        >>> with tdsteer.steer(model, {"0": torch.ones(3)}, scale=-1.0):
        ...     y = model[0](x)
        >>> torch.allclose(y, model[0](x) - 1)
        True

        Per-row starts and a new scale while open:

        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> x = torch.zeros(2, 3, 1)  # two rows of three tokens, one channel
        >>> handle = tdsteer.steer(model, {"0": torch.ones(1)}, positions="continuation")
        >>> with handle:
        ...     handle.set(starts=torch.tensor([1, 2]))  # row 0 from position 1 on, row 1 from 2 on
        ...     once = model(x)
        ...     handle.set(scale=2.0)
        ...     twice = model(x)
        >>> once[..., 0].tolist(), twice[..., 0].tolist()
        ([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], [[0.0, 2.0, 2.0], [0.0, 0.0, 2.0]])
    """
    if isinstance(vector, SteeringVector):
        chosen = vector if sites is None else vector.select(sites)
        chosen.validate(model, check=check)
        site_list: list[Site] = list(chosen.sites.values())
        tensors: dict[str, Tensor] = dict(chosen.directions)
    elif isinstance(vector, Mapping):
        site_list = as_sites(list(vector.keys()))
        tensors = {site.key: v for site, v in zip(site_list, vector.values(), strict=True)}
        if sites is not None:
            wanted = {as_site(s).key for s in sites}
            site_list = [s for s in site_list if s.key in wanted]
    else:
        raise TypeError(f"vector must be a SteeringVector or a mapping of site -> tensor, got {type(vector).__name__}")
    if condition is not None:
        condition.to_vector().validate(model, check=check)
    factory = SteeringVectors(
        site_list,
        vectors=tensors,
        scale=scale,
        operator=operator,
        positions=positions,
        track_positions=track_positions,
        condition=condition,
    )
    return SteeringHandle(model, factory)
