"""The one rule for layer indices, used by every adapter."""

from __future__ import annotations

from collections.abc import Sequence

IndexSpec = int | Sequence[int] | slice | range | None


def take_indices(count: int, indices: IndexSpec = None, *, what: str = "layer") -> list[int]:
    """Resolve ``indices`` against ``count`` items; negative indices count from the end.

    Args:
        count: Number of items (layers, blocks, stages).
        indices: ``None`` for all, an int for one item, a sequence of ints, a ``slice`` or ``range``.
        what: Name of the items, used in error messages.

    Returns:
        Non-negative indices, in the order given, without duplicates.

    Raises:
        IndexError: An index is outside ``[-count, count)``; the message names the valid range.

    Examples:
        >>> take_indices(12, -1)
        [11]
        >>> take_indices(12, [0, -2])
        [0, 10]
        >>> take_indices(4, slice(1, None))
        [1, 2, 3]
    """
    if count <= 0:
        raise IndexError(f"The model has no {what}s to index")
    if indices is None:
        return list(range(count))
    if isinstance(indices, slice):
        return list(range(count))[indices]
    if isinstance(indices, bool):
        raise TypeError(f"{what} index must be an int, got a bool")
    raw = [indices] if isinstance(indices, int) else list(indices)
    resolved: list[int] = []
    for index in raw:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{what} indices must be ints, got {index!r}")
        if not -count <= index < count:
            raise IndexError(
                f"{what} index {index} is out of range: the model has {count} {what}s, "
                f"so valid indices are 0..{count - 1} or -{count}..-1"
            )
        value = index % count
        if value not in resolved:
            resolved.append(value)
    return resolved
