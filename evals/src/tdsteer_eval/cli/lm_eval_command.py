"""``tdsteer eval``: lm-eval's own command line, with the ``tdsteer`` model registered."""

from __future__ import annotations

import argparse
import sys

from lm_eval.__main__ import cli_evaluate

import tdsteer_eval  # noqa: F401  (registers the 'tdsteer' model with lm-eval)
from tdsteer.cli import Command

LM_EVAL_COMMANDS = ("run", "ls", "validate")


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's command line on ``argv`` (``run ...``, ``ls tasks``, ``validate ...``)."""
    saved = sys.argv
    sys.argv = ["tdsteer eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """lm-eval parses its own arguments."""


def _unused(args: argparse.Namespace) -> int:
    raise AssertionError("tdsteer eval runs through run_argv")  # pragma: no cover


COMMAND = Command(
    name="eval",
    help="lm-eval's command line (run, ls, validate) with the 'tdsteer' model registered",
    description=(
        "lm-evaluation-harness's own command line with --model tdsteer available, e.g. tdsteer eval run --model "
        "tdsteer --model_args pretrained=gpt2,vector=v.safetensors,scale=4 --tasks hellaswag"
    ),
    add_arguments=_no_arguments,
    run=_unused,
    run_argv=run_lm_eval,
)
