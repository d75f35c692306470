"""Checks of what a steering context is given: the scale and the vectors.

A vector's values are checked for NaN and infinities once per tensor and in-place version, so
reopening a context with the same tensors does not read them again.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tdsteer.operators import Scale


def check_scale(scale: Scale) -> Scale:
    """A valid scale: a finite float, or a finite 1-D tensor (one value per batch row), detached.

    Raises:
        TypeError: Not a number or a tensor.
        ValueError: NaN or infinite values, or a tensor with more than one dimension.

    Examples:
        >>> check_scale(2)
        2.0
        >>> check_scale(float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: scale must be finite, got nan
    """
    if isinstance(scale, Tensor):
        if scale.ndim > 1:
            raise ValueError(f"scale must be a float or a 1-D tensor with one value per batch row, got {scale.shape}")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("scale contains NaN or infinite values")
        return scale.detach()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


# (id(tensor), weak reference, in-place version) of the vectors already checked for NaN: re-opening a
# context with the same tensors skips the check, which reads the whole tensor
_FINITE: dict[int, tuple[weakref.ref[Tensor], int]] = {}


def check_vector(key: str, vector: Any) -> None:
    """Refuse a vector that is not a finite ``[C]`` or ``[L, C]`` tensor (``ValueError`` naming the site)."""
    if not isinstance(vector, Tensor) or vector.ndim not in (1, 2):
        raise ValueError(f"Vector for site {key!r} must be a tensor [C] or [L, C], got {_describe(vector)}")
    seen = _FINITE.get(id(vector))
    if seen is not None and seen[0]() is vector and seen[1] == vector._version:
        return
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"Vector for site {key!r} contains NaN or infinite values")
    _FINITE[id(vector)] = (weakref.ref(vector, _forget(id(vector))), vector._version)


def _forget(ident: int) -> Callable[[weakref.ref[Tensor]], None]:
    def callback(_: weakref.ref[Tensor]) -> None:
        _FINITE.pop(ident, None)

    return callback


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
