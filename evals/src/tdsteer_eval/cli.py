"""The ``tdsteer-eval`` command: multiplier sweeps, plus lm-eval's own commands with ``--model tdsteer``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tdsteer_hf.cli import CLIError, join_signed_values, parse_scales

LM_EVAL_COMMANDS = ("run", "ls", "validate")


def _positions(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tdsteer-eval`` (its ``sweep`` and ``demo-task`` commands)."""
    parser = argparse.ArgumentParser(
        prog="tdsteer-eval",
        description=(
            "Evaluate tdsteer steering vectors with lm-evaluation-harness. "
            f"Commands {', '.join(LM_EVAL_COMMANDS)} are lm-eval's own, with the 'tdsteer' model registered "
            "(e.g. tdsteer-eval run --model tdsteer --model_args pretrained=gpt2,vector=v.safetensors,scale=4 "
            "--tasks hellaswag)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("sweep", help="evaluate tasks at several multipliers and write the records as JSON")
    run.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    run.add_argument("--vector", required=True, help="tdsteer steering-vector file (.safetensors)")
    run.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    run.add_argument("--multipliers", required=True, nargs="+", help="scales, comma- or space-separated (e.g. -2,0,2)")
    run.add_argument("--include-path", action="append", default=None, help="folder of local task YAMLs (repeatable)")
    run.add_argument(
        "--include-defaults", action="store_true", help="also load lm-eval's task catalogue with --include-path"
    )
    run.add_argument("--operator", default="add", help="add, ablate, clamp or add_norm (default: add)")
    run.add_argument("--positions", default="all", help="all, prompt, generated, K or from:K (default: all)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:0... (default: cuda if available, else cpu)")
    run.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    run.add_argument("--batch-size", default="1", help="batch size, or 'auto'")
    run.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
    run.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    run.add_argument("-o", "--output", required=True, help="where to write the JSON records")

    demo = commands.add_parser("demo-task", help="write the small offline demo task (tdsteer_demo_mc) to a folder")
    demo.add_argument("directory", help="folder to write tdsteer_demo_mc.yaml and .jsonl into")
    return parser


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from tdsteer_eval.lm import SteeredLM
    from tdsteer_eval.sweep import sweep

    try:
        multipliers = parse_scales(args.multipliers, "--multipliers")
    except CLIError as error:
        parser.error(str(error))
    batch_size: int | str = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = SteeredLM(
        pretrained=args.model,
        vector=args.vector,
        operator=args.operator,
        positions=_positions(args.positions),
        device=device,
        dtype=args.dtype,
        batch_size=batch_size,
    )
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    records = sweep(
        lm,
        args.tasks,
        multipliers,
        include_path=args.include_path,
        include_defaults=True if args.include_defaults else None,
        limit=limit,
        num_fewshot=args.num_fewshot,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    for record in records:
        stderr = "" if record["stderr"] is None else f" ± {record['stderr']:.4f}"
        print(f"{record['multiplier']:>8g}  {record['task']}  {record['metric']}: {record['value']:.4f}{stderr}")
    print(f"Wrote {len(records)} records to {output}")
    return 0


def _lm_eval(argv: list[str]) -> int:
    from lm_eval.__main__ import cli_evaluate

    import tdsteer_eval  # noqa: F401  (registers the 'tdsteer' model with lm-eval)

    saved = sys.argv
    sys.argv = ["tdsteer-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tdsteer-eval``.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (``0`` on success).

    Examples:
        >>> main(["demo-task", "/tmp/tdsteer-demo-task"])  # doctest: +SKIP
        0

        From a shell::

            tdsteer-eval demo-task tasks/
            tdsteer-eval sweep --model gpt2 --vector honesty.safetensors --tasks tdsteer_demo_mc \\
                --multipliers -2,0,2 --include-path tasks/ -o sweep.json
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in LM_EVAL_COMMANDS:
        return _lm_eval(args_list)
    parser = build_parser()
    args = parser.parse_args(join_signed_values(args_list, ("--multipliers",)))
    if args.command == "sweep":
        return _sweep(args, parser)
    if args.command == "demo-task":
        from tdsteer_eval.tasks import write_demo_task

        path = write_demo_task(args.directory)
        print(f"Wrote {path} (task 'tdsteer_demo_mc'); use --include-path {path.parent}")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
