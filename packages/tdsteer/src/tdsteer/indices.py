"""The one rule for layer indices, used by every adapter and by the command line's ``--layers``.

An int is *one* index and negative indices count from the end (Python's rule). timm's
``feature_take_indices`` reads an int ``n`` as "the last n" instead; tdsteer does not: ask for the
last two layers with ``slice(-2, None)`` (``--layers -2:``).
"""

from __future__ import annotations

from collections.abc import Sequence

IndexItem = int | slice | range
IndexSpec = int | slice | range | Sequence[IndexItem] | None


def _check_slice(count: int, item: slice | range, what: str) -> list[int]:
    for bound in (item.start, item.stop):
        if bound is not None and not -count <= bound <= count:
            raise IndexError(
                f"{what} slice {_show(item)} is out of range: the model has {count} {what}s, "
                f"so slice bounds lie in -{count}..{count}"
            )
    picked = list(range(count))[slice(item.start, item.stop, item.step)]
    if not picked:
        raise IndexError(f"{what} slice {_show(item)} selects no {what} (the model has {count}, 0..{count - 1})")
    return picked


def _show(item: slice | range) -> str:
    def text(bound: int | None) -> str:
        return "" if bound is None else str(bound)

    step = "" if item.step in (None, 1) else f":{item.step}"
    return f"{text(item.start)}:{text(item.stop)}{step}"


def take_indices(count: int, indices: IndexSpec = None, *, what: str = "layer") -> list[int]:
    """Resolve ``indices`` against ``count`` items; negative indices count from the end.

    Args:
        count: Number of items (layers, blocks, stages).
        indices: ``None`` for all; an int for one item; a ``slice`` or ``range`` for a span; or a
            sequence of ints, slices and ranges.
        what: Name of the items, used in error messages.

    Returns:
        Non-negative indices, in the order given, without duplicates.

    Raises:
        IndexError: An index is outside ``[-count, count)``, a slice bound outside
            ``[-count, count]``, or a slice selects nothing; the message names the valid range.
        TypeError: An index is not an int.

    Examples:
        >>> take_indices(12, -1)
        [11]
        >>> take_indices(12, [0, -2])
        [0, 10]
        >>> take_indices(4, slice(1, None))
        [1, 2, 3]
        >>> take_indices(6, [0, slice(-2, None)])
        [0, 4, 5]
    """
    if count <= 0:
        raise IndexError(f"The model has no {what}s to index")
    if indices is None:
        return list(range(count))
    if isinstance(indices, bool):
        raise TypeError(f"{what} index must be an int, got a bool")
    if isinstance(indices, (int, slice, range)):
        raw: list[object] = [indices]
    elif isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise TypeError(
            f"{what} indices must be an int, a slice, a range or a list of them, got {indices!r}"
            + ("; parse text with tdsteer.parse_indices" if isinstance(indices, str) else "")
        )
    else:
        raw = list(indices)
    resolved: list[int] = []
    for item in raw:
        if isinstance(item, (slice, range)):
            picked = _check_slice(count, item, what)
        elif isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{what} indices must be ints or slices, got {item!r}")
        elif not -count <= item < count:
            raise IndexError(
                f"{what} index {item} is out of range: the model has {count} {what}s, "
                f"so valid indices are 0..{count - 1} or -{count}..-1"
            )
        else:
            picked = [item % count]
        resolved.extend(i for i in picked if i not in resolved)
    return resolved


def parse_indices(text: str, *, what: str = "layer") -> list[IndexItem] | None:
    """Parse the text form of an index spec (``--layers``) into what :func:`take_indices` takes.

    Args:
        text: ``"all"``, or comma-separated items, each an index (``6``, ``-1``) or a Python slice
            (``2:5``, ``-2:``, ``::2``).
        what: Name of the items, used in error messages.

    Returns:
        ``None`` for ``"all"``, else a list of ints and slices.

    Raises:
        ValueError: The text is malformed or empty; the message shows the accepted forms.

    Examples:
        >>> parse_indices("6,7"), parse_indices("-2:"), parse_indices("all")
        ([6, 7], [slice(-2, None, None)], None)
    """
    stripped = text.strip()
    if stripped.lower() == "all":
        return None
    items: list[IndexItem] = []
    for part in (piece.strip() for piece in stripped.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                bounds = [int(bound) if bound.strip() else None for bound in part.split(":")]
                if len(bounds) > 3:
                    raise ValueError(part)
                items.append(slice(*bounds))
            else:
                items.append(int(part))
        except ValueError:
            raise ValueError(
                f"{what}s {text!r}: {part!r} is not an index or a slice; use e.g. 6,7 or -1 or 2:5 or all"
            ) from None
    if not items:
        raise ValueError(f"{what}s {text!r} names no {what}; use e.g. 6,7 or -1 or 2:5 or all")
    return items
