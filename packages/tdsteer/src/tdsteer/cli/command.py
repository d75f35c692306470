"""Subcommands of ``tdsteer``: the :class:`Command` record, who provides which command, and when a
command's module is imported.

Each installed distribution adds its subcommands under the entry-point group ``tdsteer.commands``
(``extract = "tdsteer_hf.cli.extract:COMMAND"``); the core owns the program and ``info``. Loading an
entry point imports its whole distribution (torch, transformers, timm, lm-eval: seconds), so the
program lists the commands of the tdsteer distributions from :data:`SUMMARIES` and loads a command
only when it is the one to run (:meth:`Command.resolve`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from typing import NoReturn

from tdsteer.cli.messages import CLIError

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

#: The ``help`` line of each command of the tdsteer distributions, for ``tdsteer --help`` without
#: importing them; each command's own record takes its line from here.
SUMMARIES: dict[str, str] = {
    "info": "describe a vector file, a model (with an adapter installed), and whether they fit",
    "extract": "compute a steering vector of a text model from contrastive pairs and save it",
    "generate": "generate text with a steering vector applied",
    "demo": "the whole job offline: pairs -> vector -> steered text -> behaviour and perplexity report",
    "extract-images": "extract a steering vector from two folders of images with a timm model",
    "eval": "lm-eval's command line (run, ls, validate) with the 'tdsteer' model and tdsteer's tasks",
    "sweep": "evaluate lm-eval tasks at several scales (or layers) into a results folder with plots and a report",
    "demo-task": "write the small offline demo task (tdsteer_demo_mc) to a folder",
}

#: The distributions released together; ``tdsteer --version`` prints each one's version.
DISTRIBUTIONS: tuple[str, ...] = ("tdsteer", "tdsteer-hf", "tdsteer-timm", "tdsteer-eval")

_SIGNED_VALUE = re.compile(r"^-[\d.:]")
_NUMBER = re.compile(r"^-?\d+(\.\d*)?$")


def _not_loaded(*_: object) -> NoReturn:
    raise RuntimeError("a listed command runs through Command.resolve(), which loads its module")


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
        entry_point: For a command listed before its module is imported (:meth:`listed`): where
            its full record is, ``module:attribute``; ``None`` for a full record.

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
    entry_point: str | None = None

    @classmethod
    def listed(cls, name: str, help: str, entry_point: str, distribution: str = "tdsteer") -> Command:
        """A command known by its name and help line only, its module not imported yet.

        Args:
            name: The word after ``tdsteer``.
            help: One line for ``tdsteer --help``.
            entry_point: ``module:attribute`` of its full record.
            distribution: The distribution that provides it.

        Returns:
            A record for the listing; :meth:`resolve` gives the one to run.

        Examples:
            >>> listed = Command.listed("info", SUMMARIES["info"], "tdsteer.cli.info:COMMAND")
            >>> listed.resolve().description.startswith("Describe what a vector file holds")
            True
        """
        return cls(name, help, _not_loaded, _not_loaded, distribution=distribution, entry_point=entry_point)

    def resolve(self) -> Command:
        """The full record: this one, or for a listed command the one at its entry point (imported now).

        Returns:
            A record whose ``add_arguments``, ``run`` and ``run_argv`` can be called, with this
            record's ``distribution``.

        Raises:
            CLIError: The entry point cannot be loaded (a broken install) or is not a :class:`Command`.
        """
        if self.entry_point is None:
            return self
        entry = metadata.EntryPoint(name=self.name, value=self.entry_point, group=GROUP)
        try:
            loaded = entry.load()
        except Exception as error:  # noqa: BLE001 - a broken install is one line, like any user error
            raise CLIError(f"cannot load the {self.name!r} command ({self.entry_point}): {error}") from error
        if not isinstance(loaded, Command):
            raise CLIError(f"entry point {self.name!r} ({self.entry_point}) is not a tdsteer.cli.Command")
        return replace(loaded, distribution=self.distribution)


def join_signed_values(argv: list[str], options: Sequence[str]) -> list[str]:
    """``--scale -4,0,4`` -> ``--scale=-4,0,4`` for ``options``: argparse would take ``-4,0,4`` for an option.

    Examples:
        >>> join_signed_values(["--scale", "-4,0,4", "--prompt", "hi"], ["--scale"])
        ['--scale=-4,0,4', '--prompt', 'hi']
    """
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if (
            token in options
            and following is not None
            and _SIGNED_VALUE.match(following)
            and not _NUMBER.match(following)  # argparse reads a lone negative number as a value itself
        ):
            out.append(f"{token}={following}")
            index += 2
            continue
        out.append(token)
        index += 1
    return out


def versions() -> str:
    """``tdsteer X, tdsteer-hf Y, ...``: each distribution's version, or that it is not installed."""
    parts = []
    for name in DISTRIBUTIONS:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)
