"""``tdsteer demo-task``: write the small offline multiple-choice task ``tdsteer_demo_mc`` to a folder."""

from __future__ import annotations

import argparse

from tdsteer.cli import Command
from tdsteer.cli.command import SUMMARIES
from tdsteer_eval.tasks import write_demo_task


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="folder to write tdsteer_demo_mc.yaml and .jsonl into")


def _run(args: argparse.Namespace) -> int:
    path = write_demo_task(args.directory)
    print(f"Wrote {path} (task 'tdsteer_demo_mc'); use --include-path {path.parent}")
    return 0


COMMAND = Command(
    name="demo-task",
    help=SUMMARIES["demo-task"],
    add_arguments=_add_arguments,
    run=_run,
)
