"""``tdsteer sweep``: lm-eval tasks at several multipliers, the records written as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdsteer.cli import Command, parse_device, parse_positions, parse_scales
from tdsteer_eval.lm import SteeredLM
from tdsteer_eval.sweep import sweep


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    parser.add_argument("--vector", required=True, help="tdsteer steering-vector file (.safetensors)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument(
        "--multipliers", required=True, nargs="+", help="scales, comma- or space-separated (e.g. -2,0,2)"
    )
    parser.add_argument("--include-path", action="append", default=None, help="folder of local task YAMLs (repeatable)")
    parser.add_argument(
        "--include-defaults", action="store_true", help="also load lm-eval's task catalogue with --include-path"
    )
    parser.add_argument("--operator", default="add", help="add, ablate, clamp or add_norm (default: add)")
    parser.add_argument("--positions", default="all", help="all, prompt, generated, K or from:K (default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--batch-size", default="1", help="batch size, or 'auto'")
    parser.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    parser.add_argument("-o", "--output", required=True, help="where to write the JSON records")


def _run(args: argparse.Namespace) -> int:
    multipliers = parse_scales(args.multipliers, "--multipliers")
    positions = parse_positions(args.positions)
    device = parse_device(args.device)
    batch_size: int | str = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    lm = SteeredLM(
        pretrained=args.model,
        vector=args.vector,
        operator=args.operator,
        positions=positions,
        device=str(device),
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


COMMAND = Command(
    name="sweep",
    help="evaluate lm-eval tasks at several multipliers and write the records as JSON",
    add_arguments=_add_arguments,
    run=_run,
    signed_options=("--multipliers",),
)
