"""``tdsteer eval``: lm-eval's own command line, with the ``tdsteer`` model registered and the shipped
tasks on the include path."""

from __future__ import annotations

import argparse

from lm_eval._cli.harness import HarnessCLI
from lm_eval.utils import setup_logging

import tdsteer_eval  # noqa: F401  (registers the 'tdsteer' model with lm-eval)
from tdsteer.cli import Command
from tdsteer.cli.command import SUMMARIES
from tdsteer_eval.cli.sweep_checks import unexpected_argument
from tdsteer_eval.lm import OPERATOR_NAMES
from tdsteer_eval.runner import quiet_git
from tdsteer_eval.task_data import SHIPPED_TASKS, include_paths

MODEL_HELP = f"""
tdsteer model: --model tdsteer --model_args pretrained=NAME,vector=FILE[,...]
  pretrained=NAME      model id or local directory; HFLM's arguments pass through (dtype=, revision=,
                       trust_remote_code=True, parallelize=True for a model spread over devices)
  vector=FILE          steering vector: a tdsteer .safetensors file, or an lm-eval steered .pt file
  scale=X              multiplier of the vector (default 1; 0 is the unsteered model)
  operator=NAME        {", ".join(OPERATOR_NAMES)} (default add)
  positions=POLICY     all (default), continuation (the tokens that score the answer, or the last
                       prompt token and the generated ones), assistant (from the end of the chat
                       template's user turn: CAA), prompt, generated, K or from:K
  sites=A|B            steer only these sites of the vector (separated by |)
  check=warn           when the vector was made for another model type: warn, error or ignore
  assistant_marker=T   for positions=assistant: the text that opens the assistant turn
  condition=FILE       steer only the items whose context meets this condition (tdsteer extract --condition)
Shipped tasks, always included: {", ".join(SHIPPED_TASKS)} (data files: --metadata
'{{"caa_path": ..., "mwe_path": ..., "text_path": ...}}'). Data parallel: accelerate launch -m tdsteer eval run ...
"""


def harness() -> HarnessCLI:
    """lm-eval's command line, its ``run`` help extended with the ``tdsteer`` model's arguments."""
    cli = HarnessCLI()
    run_parser = cli._subparsers.choices["run"]
    run_parser.epilog = (run_parser.epilog or "") + MODEL_HELP
    return cli


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's command line on ``argv`` (``run ...``, ``ls tasks``, ``validate ...``).

    The shipped tasks' folder is put first on ``--include_path`` (several folders may be given,
    separated by ``os.pathsep``).

    Returns:
        ``0`` (lm-eval raises or exits on failure).

    Raises:
        CLIError: The model refuses an argument of ``--model_args``.
    """
    setup_logging()  # as lm-eval's own entry point does
    cli = harness()
    arguments = list(argv)
    commands = cli._subparsers.choices
    if arguments and arguments[0] not in commands and arguments[0] not in ("-h", "--help"):
        arguments.insert(0, "run")  # lm-eval's legacy form: no subcommand means run
    if arguments == ["run"]:
        commands["run"].print_help()
        return 0
    args = cli._parser.parse_args(arguments)
    if hasattr(args, "include_path"):
        args.include_path = include_paths(args.include_path)
    try:
        with quiet_git():  # no "fatal: not a git repository" outside a repository
            cli.execute(args)
    except TypeError as error:
        refused = unexpected_argument(error, getattr(args, "model_args", None) or {}, "--model_args")
        if refused is None:
            raise
        raise refused from None
    return 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """lm-eval parses its own arguments."""


def _unused(args: argparse.Namespace) -> int:
    raise AssertionError("tdsteer eval runs through run_argv")  # pragma: no cover


COMMAND = Command(
    name="eval",
    help=SUMMARIES["eval"],
    description=(
        "lm-evaluation-harness's own command line with --model tdsteer available and the tasks shipped with "
        "tdsteer-eval included, e.g. tdsteer eval run --model tdsteer --model_args "
        "pretrained=gpt2,vector=v.safetensors,scale=4,positions=continuation --tasks tdsteer_caa_ab. "
        "'tdsteer eval run --help' lists the tdsteer model arguments."
    ),
    add_arguments=_no_arguments,
    run=_unused,
    run_argv=run_lm_eval,
)
