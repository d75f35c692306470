"""Subcommands of ``tdsteer``: the :class:`Command` record and who provides which command.

Each installed distribution adds its subcommands under the entry-point group ``tdsteer.commands``
(``extract = "tdsteer_hf.cli.extract:COMMAND"``); the core owns the program and ``info``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

GROUP = "tdsteer.commands"

#: Subcommands of the tdsteer distributions, and which one to install for each: the message for a
#: command that is not installed names its distribution.
PROVIDED_BY: dict[str, str] = {
    "extract": "tdsteer-hf",
    "generate": "tdsteer-hf",
    "demo": "tdsteer-eval",
    "extract-images": "tdsteer-timm",
    "eval": "tdsteer-eval",
    "sweep": "tdsteer-eval",
    "demo-task": "tdsteer-eval",
}

#: The distributions released together; ``tdsteer --version`` prints each one's version.
DISTRIBUTIONS: tuple[str, ...] = ("tdsteer", "tdsteer-hf", "tdsteer-timm", "tdsteer-eval")


@dataclass(frozen=True)
class Command:
    """One ``tdsteer`` subcommand.

    Args:
        name: The word after ``tdsteer``.
        help: One line for ``tdsteer --help``.
        add_arguments: Adds the command's options to its parser.
        run: Runs the parsed command; returns the exit status.
        description: Longer text for ``tdsteer NAME --help`` (default: ``help``).
        signed_options: Options whose value may start with a minus sign (``--scale -4,0,4``).
        run_argv: For a command that parses its own arguments (lm-eval's): called with the raw
            arguments after the command name instead of ``add_arguments`` / ``run``.
        distribution: The distribution that provides it (filled in at discovery).

    Examples:
        >>> Command("hello", "say hello", lambda parser: None, lambda args: 0).name
        'hello'
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    signed_options: tuple[str, ...] = ()
    run_argv: Callable[[list[str]], int] | None = None
    distribution: str = "tdsteer"


def versions() -> str:
    """``tdsteer X, tdsteer-hf Y, ...``: each distribution's version, or that it is not installed."""
    parts = []
    for name in DISTRIBUTIONS:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)
