"""The ``tdsteer`` command: the program, the shared argument types, and the :class:`Command` record
through which each installed distribution adds its subcommands (entry-point group ``tdsteer.commands``).

The names below are imported on first use: the program itself imports no command, and no torch,
until a command runs.

Examples:
    From a shell::

        tdsteer --help                      # the subcommands of every installed distribution
        tdsteer --version                   # the versions of tdsteer, tdsteer-hf, tdsteer-timm, tdsteer-eval
        tdsteer info --vector v.safetensors # needs no adapter
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tdsteer.cli.arguments import (
        add_check_option,
        output_file,
        parse_device,
        parse_layers,
        parse_positions,
        parse_scales,
        positive_int,
        save_extracted,
    )
    from tdsteer.cli.command import Command, join_signed_values
    from tdsteer.cli.messages import CLIError, one_line, quote, warn
    from tdsteer.cli.program import USER_ERRORS, console, dispatch, installed_commands, main
    from tdsteer.cli.sources import MAYBE, NO, SURE, ModelSource, OpenedModel
else:
    from tdsteer._lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = [
    "MAYBE",
    "NO",
    "SURE",
    "USER_ERRORS",
    "CLIError",
    "Command",
    "ModelSource",
    "OpenedModel",
    "add_check_option",
    "console",
    "dispatch",
    "installed_commands",
    "join_signed_values",
    "main",
    "one_line",
    "output_file",
    "parse_device",
    "parse_layers",
    "parse_positions",
    "parse_scales",
    "positive_int",
    "quote",
    "save_extracted",
    "warn",
]
