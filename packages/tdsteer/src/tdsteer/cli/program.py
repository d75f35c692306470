"""The ``tdsteer`` program: one parser over the installed subcommands, and the error-to-exit-code policy.

User errors (a missing file, a layer out of range, a vector made for another model...) end with one
line on stderr and exit status 2, never a traceback; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from tdsteer.cli.command import GROUP, PROVIDED_BY, SUMMARIES, Command, join_signed_values, versions
from tdsteer.cli.messages import PROG, CLIError, one_line, warn
from tdsteer.errors import SteeringVectorFileError, UnknownArchitectureError

#: Exceptions that are the user's doing: one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    SteeringVectorFileError,
    UnknownArchitectureError,
    ValueError,
    IndexError,
    OSError,
)
USAGE_ERROR = 2

#: The core's own command, listed like the others: ``tdsteer --help`` does not import torch.
INFO = Command.listed("info", SUMMARIES["info"], "tdsteer.cli.info:COMMAND")


def installed_commands() -> dict[str, Command]:
    """The core's commands and those of every installed distribution, by name.

    The commands of the tdsteer distributions are listed without importing them (:data:`SUMMARIES`);
    another distribution's entry point is loaded now for its help line, and left out with a warning
    when it cannot be (a broken install).
    """
    commands = {INFO.name: INFO}
    for entry in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        distribution = entry.dist.name if entry.dist is not None else PROVIDED_BY.get(entry.name, "tdsteer")
        command = Command.listed(entry.name, SUMMARIES.get(entry.name, ""), entry.value, distribution)
        if entry.name not in SUMMARIES:
            try:
                command = command.resolve()
            except CLIError as error:
                warn(str(error) + "; skipped")
                continue
        commands.setdefault(command.name, command)
    return commands


def build_parser(commands: dict[str, Command], chosen: Command | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``tdsteer`` over ``commands``.

    Args:
        commands: The installed commands, by name; each is listed with its help line.
        chosen: The command to run, resolved (:meth:`Command.resolve`): only its options are added,
            so that parsing imports no other command's module.

    Returns:
        The parser.
    """
    missing = sorted({dist for name, dist in PROVIDED_BY.items() if name not in commands})
    epilog = "Run 'tdsteer COMMAND --help' for the options of a command."
    if missing:
        epilog += f" More commands come with {', '.join(missing)}."
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Extract, apply, inspect and evaluate activation-steering vectors (tdsteer).",
        epilog=epilog,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=versions())
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(commands, key=lambda n: (n != "info", n)):
        command = chosen if chosen is not None and chosen.name == name else commands[name]
        origin = "" if command.distribution == "tdsteer" else f" [{command.distribution}]"
        sub = subparsers.add_parser(
            name,
            help=command.help + origin,
            description=command.description or command.help,
            allow_abbrev=False,
            add_help=command.run_argv is None,
        )
        if command is chosen and command.run_argv is None:
            command.add_arguments(sub)
    return parser


@contextmanager
def console() -> Iterator[None]:
    """Python warnings as one-line ``tdsteer: warning: ...`` messages; deprecation noise hidden."""

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        warn(str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.showwarning = show
        yield


def _not_installed(name: str) -> CLIError:
    distribution = PROVIDED_BY[name]
    return CLIError(f"'tdsteer {name}' comes with {distribution}, which is not installed: pip install {distribution}")


def dispatch(argv: Sequence[str], commands: dict[str, Command] | None = None) -> int:
    """Parse ``argv`` and run its command (errors propagate; :func:`main` turns them into exit codes).

    Only the chosen command's module is imported; ``tdsteer --help`` and ``--version`` import none.
    """
    commands = installed_commands() if commands is None else commands
    arguments = [a for a in argv if a not in ("--debug", "--traceback")]
    name = next((a for a in arguments if not a.startswith("-")), None)
    if name is not None and name not in commands and name in PROVIDED_BY:
        raise _not_installed(name)
    command = commands[name].resolve() if name is not None and name in commands else None
    if name is not None and command is not None and command.run_argv is not None:
        return command.run_argv(arguments[arguments.index(name) + 1 :])
    if command is not None and command.signed_options:
        arguments = join_signed_values(arguments, command.signed_options)
    args = build_parser(commands, command).parse_args(arguments)
    return (command or commands[args.command].resolve()).run(args)


def _leave_process_group(*, wait: bool) -> None:
    """Under a launcher, leave the process group a command's libraries joined and left open."""
    if "torch.distributed" not in sys.modules:
        return  # no command loaded torch: there is no group
    from tdsteer.distributed import leave_process_group  # imports torch, which is loaded already

    leave_process_group(wait=wait)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tdsteer``.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: ``0`` on success, ``2`` for a usage or user error (one line on stderr),
        ``130`` when interrupted.

    Examples:
        >>> main(["info", "--vector", "/nonexistent.safetensors"])  # doctest: +SKIP
        2
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments or "--traceback" in arguments
    try:
        with console():
            status = dispatch(arguments)
        _leave_process_group(wait=status == 0)
        return status
    except SystemExit as exit_:  # argparse: --help, --version, usage errors
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else USAGE_ERROR)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`tdsteer info ... | head -1`): not an error
        # point stdout at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
