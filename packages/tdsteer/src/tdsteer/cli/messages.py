"""The program's name, its user-error type and its one-line console messages: what every part of
``tdsteer`` reports through, kept free of heavy imports so that the program starts fast."""

from __future__ import annotations

import json
import sys
from typing import TextIO

PROG = "tdsteer"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2 (``--debug`` shows the traceback)."""


def one_line(text: object) -> str:
    """``text`` on one line (runs of white space, newlines included, become one space)."""
    return " ".join(str(text).split())


def quote(text: str) -> str:
    """``text`` as a JSON string literal, so that spaces and newlines show."""
    return json.dumps(text, ensure_ascii=False)


def warn(message: str, file: TextIO | None = None) -> None:
    """Print a one-line warning on stderr as ``tdsteer: warning: ...``."""
    print(f"{PROG}: warning: {one_line(message)}", file=file or sys.stderr)
