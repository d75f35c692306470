"""Operators: how a steering vector changes an activation.

Every operator works on channel-last activations ``h [..., C]`` with a vector ``v`` broadcastable to
``h`` and a scale that is a float or a tensor broadcastable to ``h[..., :1]`` (one value per batch
row). ``mask`` is ``None`` (every position) or a tensor broadcastable to ``h[..., :1]`` that is 1
where the operator applies and 0 elsewhere; positions outside the mask come back unchanged.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Scale = float | Tensor
_EPS = 1e-12


@runtime_checkable
class Operator(Protocol):
    """Protocol of an operator: ``op(h, v, scale, mask) -> new h``."""

    def __call__(self, h: Tensor, v: Tensor, scale: Scale, mask: Tensor | None) -> Tensor: ...


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _masked(delta: Tensor, mask: Tensor | None) -> Tensor:
    return delta if mask is None else delta * mask


class Add:
    """``h + scale * v``: activation addition (CAA, ActAdd).

    Examples:
        >>> import torch
        >>> Add()(torch.zeros(1, 2, 3), torch.ones(3), 2.0, None)[0, 0].tolist()
        [2.0, 2.0, 2.0]
    """

    name = "add"

    def __call__(self, h: Tensor, v: Tensor, scale: Scale, mask: Tensor | None) -> Tensor:
        return h + _masked(v * scale, mask)


class Ablate:
    """Directional ablation: remove ``scale`` times the component of ``h`` along ``v``.

    With ``scale=1`` the result has zero projection on ``v``.
    """

    name = "ablate"

    def __call__(self, h: Tensor, v: Tensor, scale: Scale, mask: Tensor | None) -> Tensor:
        u = _unit(v)
        projection = (h * u).sum(-1, keepdim=True)
        return h - _masked(projection * scale, mask) * u


class Clamp:
    """Set the projection of ``h`` on the direction of ``v`` to a value.

    Args:
        value: Target projection on the unit direction. ``None`` (the default, used by
            ``operator="clamp"``) takes ``scale * |v|``: the projection that ``scale * v`` has.
    """

    name = "clamp"

    def __init__(self, value: float | None = None) -> None:
        self.value = value

    def __call__(self, h: Tensor, v: Tensor, scale: Scale, mask: Tensor | None) -> Tensor:
        u = _unit(v)
        projection = (h * u).sum(-1, keepdim=True)
        target = v.norm(dim=-1, keepdim=True) * scale if self.value is None else self.value
        return h + _masked(target - projection, mask) * u

    def __repr__(self) -> str:
        return f"Clamp(value={self.value!r})"


class AddNorm:
    """Add ``scale * v``, then rescale each token to its original norm (repeng-style)."""

    name = "add_norm"

    def __call__(self, h: Tensor, v: Tensor, scale: Scale, mask: Tensor | None) -> Tensor:
        steered = h + _masked(v * scale, mask)
        ratio = h.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        return steered * ratio.to(steered.dtype)


class Custom:
    """Wrap ``fn(h, v, scale) -> new h``; the mask is applied around it.

    Examples:
        >>> import torch
        >>> op = Custom(lambda h, v, s: h * 0)
        >>> op(torch.ones(1, 2, 2), torch.ones(2), 1.0, torch.tensor([[[1.0], [0.0]]]))[0].tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """

    name = "custom"

    def __init__(self, fn: Callable[[Tensor, Tensor, Scale], Tensor]) -> None:
        self.fn = fn

    def __call__(self, h: Tensor, v: Tensor, scale: Scale, mask: Tensor | None) -> Tensor:
        out = self.fn(h, v, scale)
        if not isinstance(out, Tensor) or out.shape != h.shape:
            raise ValueError(
                f"Custom operator {self.fn!r} must return a tensor shaped like the activation {tuple(h.shape)}, "
                f"got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out if mask is None else torch.where(mask.bool(), out, h)

    def __repr__(self) -> str:
        return f"Custom({self.fn!r})"


OPERATORS: dict[str, Callable[[], Operator]] = {
    "add": Add,
    "ablate": Ablate,
    "project_out": Ablate,
    "clamp": Clamp,
    "add_norm": AddNorm,
}


def register_operator(name: str) -> Callable[[Callable[[], Operator]], Callable[[], Operator]]:
    """Register an operator class (or zero-argument factory) under ``name``.

    Examples:
        >>> @register_operator("double")
        ... class Double:
        ...     def __call__(self, h, v, scale, mask):
        ...         return h * 2
    """

    def decorator(factory: Callable[[], Operator]) -> Callable[[], Operator]:
        OPERATORS[name] = factory
        return factory

    return decorator


def as_operator(operator: str | Operator | Callable[..., Tensor]) -> Operator:
    """Resolve an operator: a registered name, an operator object (an instance whose
    ``__call__(h, v, scale, mask)`` handles the mask itself), or a function or callable object
    ``fn(h, v, scale) -> h`` (wrapped in :class:`Custom`, which applies the mask around it).

    Examples:
        >>> class Double:
        ...     def __call__(self, h, v, scale):
        ...         return 2 * h
        >>> type(as_operator(Double())).__name__
        'Custom'
        >>> as_operator(Ablate)
        Traceback (most recent call last):
        TypeError: operator=Ablate is a class: pass an instance (Ablate()) or a registered name
    """
    if isinstance(operator, str):
        try:
            return OPERATORS[operator]()
        except KeyError:
            raise ValueError(
                f"Unknown operator {operator!r}; use one of {', '.join(sorted(OPERATORS))}, "
                "an Operator object, or a callable fn(h, v, scale)"
            ) from None
    if isinstance(operator, type):
        raise TypeError(
            f"operator={operator.__name__} is a class: pass an instance ({operator.__name__}()) or a registered name"
        )
    if isinstance(operator, (types.FunctionType, types.MethodType, functools.partial)):
        return Custom(operator)
    if callable(operator):
        if _positional_arity(operator) == 3:
            return Custom(operator)  # type: ignore[arg-type]  # an object with __call__(h, v, scale)
        return operator  # an object with __call__(h, v, scale, mask)
    raise TypeError(f"operator must be a name, an Operator or a callable, got {type(operator).__name__}")


def _positional_arity(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` takes (``None``: unknown, or any number)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)
