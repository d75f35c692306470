"""The ``tdsteer`` subcommands of tdsteer-eval (``eval``, ``sweep``, ``demo-task``) and the
``tdsteer-eval`` alias.

``tdsteer-eval X ...`` is ``tdsteer X ...``, except that lm-eval's own commands (``run``, ``ls``,
``validate``) go to ``tdsteer eval``: ``tdsteer-eval run --model tdsteer ...`` keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tdsteer.cli import main as tdsteer_main

#: lm-eval's own commands, which ``tdsteer-eval`` hands to ``tdsteer eval`` (named here, so that the
#: alias imports lm-eval's command line only when one of them runs).
LM_EVAL_COMMANDS = ("run", "ls", "validate")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tdsteer-eval``, an alias of ``tdsteer`` for the evaluation commands.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (``0`` on success, ``2`` for a user error).

    Examples:
        From a shell::

            tdsteer-eval demo-task tasks/
            tdsteer-eval sweep --model gpt2 --vector honesty.safetensors --tasks tdsteer_demo_mc \\
                --multipliers -2,0,2 --include-path tasks/ -o runs/honesty
            tdsteer-eval run --model tdsteer --model_args pretrained=gpt2,vector=v.safetensors --tasks hellaswag
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in LM_EVAL_COMMANDS:
        arguments = ["eval", *arguments]
    return tdsteer_main(arguments)
