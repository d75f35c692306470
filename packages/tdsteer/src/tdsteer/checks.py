"""The one rule for ``warn`` / ``error`` / ``ignore`` options (``check=`` of :func:`tdsteer.steer`,
``--check`` on the command line, ``check=`` of :meth:`tdsteer.SteeringVector.validate`)."""

from __future__ import annotations

import warnings
from typing import Literal

Check = Literal["warn", "error", "ignore"]
CHECKS: tuple[str, ...] = ("warn", "error", "ignore")


def as_check(value: object, *, what: str = "check") -> Check:
    """Validate a ``warn`` / ``error`` / ``ignore`` option.

    Args:
        value: The value given.
        what: The option's name, for the error message.

    Returns:
        The value, typed.

    Raises:
        ValueError: ``value`` is not one of the three.

    Examples:
        >>> as_check("warn")
        'warn'
    """
    if value not in CHECKS:
        raise ValueError(f"{what} must be 'warn', 'error' or 'ignore', got {value!r}")
    return value  # type: ignore[return-value]


def report(check: Check, message: str, *, stacklevel: int = 3) -> None:
    """Act on a failed check: raise ``ValueError(message)``, warn with it, or do nothing.

    Examples:
        >>> report("ignore", "the vector was made for another model")
    """
    if as_check(check) == "error":
        raise ValueError(message)
    if check == "warn":
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
