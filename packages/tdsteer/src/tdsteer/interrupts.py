"""Ctrl-C while hooks are installed or removed: deferred to the end of that operation.

A ``KeyboardInterrupt`` raised halfway through installing a context's hooks, or halfway through
removing them, would leave some behind. While any steering context is open in the main thread,
tdsteer's own SIGINT handler sits in front of the previous one. When a signal arrives, it looks at
the frames being run: inside one of tdsteer's install or removal functions (registered with
:func:`critical`) it records the signal, and the function delivers it (:func:`deliver`) once it has
finished, so that the exception surfaces with every hook either fully installed and owned by an open
context or fully removed. Anywhere else it hands the signal on to the previous handler at once, so
Ctrl-C inside a ``with`` block behaves as it always does.

Only SIGINT is handled (that is what Ctrl-C sends); Python runs signal handlers in the main thread
only, so contexts opened in other threads need none of this. Installing the handler costs two
``signal.signal`` calls per outermost context (a few microseconds).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Predicate = Callable[[FrameType], bool]

_CRITICAL: dict[CodeType, Predicate] = {}
_pending: list[tuple[int, FrameType | None]] = []
_MAX_DEPTH = 32  # frames searched for a critical one; tdsteer's own call chains are much shorter


class _State:
    depth = 0  # open contexts that hold the handler (main thread only)
    previous: Any = None  # the handler ours replaced, while ours is installed


def _always(frame: FrameType) -> bool:
    return True


def critical(when: Predicate | None = None) -> Callable[[F], F]:
    """Mark a function whose frames defer SIGINT (while ``when(frame)`` is true, or always).

    A function marked without ``when`` must call :func:`deliver` before it returns.
    """

    def decorator(function: F) -> F:
        register(function.__code__, when or _always)
        return function

    return decorator


def register(code: CodeType, when: Predicate) -> None:
    """Defer SIGINT in frames running ``code`` while ``when(frame)`` is true."""
    _CRITICAL[code] = when


def _defers(frame: FrameType | None) -> bool:
    depth = 0
    while frame is not None and depth < _MAX_DEPTH:
        when = _CRITICAL.get(frame.f_code)
        if when is not None and when(frame):
            return True
        frame = frame.f_back
        depth += 1
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    if _defers(frame):
        _pending.append((signum, frame))
        return
    _forward(signum, frame)


def _forward(signum: int, frame: FrameType | None) -> None:
    previous = _State.previous if _State.previous is not None else signal.getsignal(signum)
    if previous is _handler:
        previous = signal.default_int_handler
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.default_int_handler(signum, frame)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def hold() -> None:
    """Count one more open context; the first one installs the deferring handler (main thread only).

    Ctrl-C is deferred inside (the caller delivers it), so that the count and the handler agree.
    """
    if not _main_thread():
        return
    if _State.depth == 0:
        try:
            previous = signal.signal(signal.SIGINT, _handler)
        except (ValueError, OSError):  # not the main interpreter, or no signals here
            previous = None
        if previous is not None and not callable(previous):
            signal.signal(signal.SIGINT, previous)  # ignored or default: nothing raises KeyboardInterrupt
            previous = None
        _State.previous = previous
    _State.depth += 1


def release() -> None:
    """Count one context less; the last one puts the previous handler back (main thread only).

    Ctrl-C is deferred inside (the caller delivers it), so that the count and the handler agree.
    """
    if not _main_thread() or _State.depth == 0:
        return
    _State.depth -= 1
    if _State.depth == 0 and _State.previous is not None:
        previous, _State.previous = _State.previous, None
        current = signal.signal(signal.SIGINT, previous)
        if current is not _handler:  # someone installed their own handler meanwhile: keep theirs
            signal.signal(signal.SIGINT, current)


def deliver() -> None:
    """Raise what the signals deferred so far would have raised (a ``KeyboardInterrupt``), if any."""
    if not _pending:
        return
    signum, frame = _pending[0]
    _pending.clear()
    _forward(signum, frame)


register(hold.__code__, _always)
register(release.__code__, _always)


def holding() -> bool:
    """Whether tdsteer's handler is installed (for tests)."""
    return _State.previous is not None
