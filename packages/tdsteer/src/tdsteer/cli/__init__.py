"""The ``tdsteer`` command: the program, the shared argument types, and the :class:`Command` record
through which each installed distribution adds its subcommands (entry-point group ``tdsteer.commands``).

Examples:
    From a shell::

        tdsteer --help                      # the subcommands of every installed distribution
        tdsteer --version                   # the versions of tdsteer, tdsteer-hf, tdsteer-timm, tdsteer-eval
        tdsteer info --vector v.safetensors # needs no adapter
"""

from tdsteer.cli.arguments import (
    CLIError,
    add_check_option,
    join_signed_values,
    one_line,
    output_file,
    parse_device,
    parse_layers,
    parse_positions,
    parse_scales,
    positive_int,
    quote,
    save_extracted,
    warn,
)
from tdsteer.cli.command import Command
from tdsteer.cli.program import USER_ERRORS, console, dispatch, installed_commands, main
from tdsteer.cli.sources import MAYBE, NO, SURE, ModelSource, OpenedModel

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
