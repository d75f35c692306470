"""``tdsteer sweep``: lm-eval tasks on a steered model at several scales (or at every layer), into a
results folder with ``results.json``, CSV files, plots and ``report.md``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from tdsteer.checks import CHECKS
from tdsteer.cli import Command, parse_device
from tdsteer.cli.command import SUMMARIES
from tdsteer.cli.messages import PROG
from tdsteer_eval.cli.sweep_checks import SweepPlan, check_model_args, check_sweep, unexpected_argument
from tdsteer_eval.layers import layer_sweep
from tdsteer_eval.lm import OPERATOR_NAMES, POSITIONS, SteeredLM
from tdsteer_eval.results import check_output
from tdsteer_eval.runner import run_sweep
from tdsteer_hf.architectures import DEFAULT_KIND, SITE_KINDS
from tdsteer_hf.data import contrastive_batches

DTYPES = ("auto", "float32", "bfloat16", "float16")
INTERRUPTED = 130  # the exit status of an interrupted command (tdsteer's and the shell's)
READS = ("last", "answer", "mean")
FIT_METHODS = ("mean_diff", "pca_diff", "pca_center", "probe")  # what an activation cache fits from its rows


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and vector")
    model.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    model.add_argument("--vector", default=None, help="steering vector: tdsteer .safetensors or lm-eval steered .pt")
    model.add_argument("--sites", default=None, help="steer only these sites of the vector (comma-separated keys)")
    model.add_argument("--operator", default="add", help=f"{', '.join(OPERATOR_NAMES)} (default: add)")
    model.add_argument("--positions", default="all", help=f"{', '.join(POSITIONS)} (default: all)")
    model.add_argument(
        "--check",
        choices=CHECKS,
        default="warn",
        help="when the vector was made for another model type (default: warn)",
    )
    model.add_argument("--assistant-marker", default=None, help="for --positions assistant: text opening the reply")
    model.add_argument(
        "--condition",
        default=None,
        help="condition file (tdsteer extract --condition): steer only the items meeting it",
    )
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:0... (default: cuda if available)")
    model.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (default: auto, the checkpoint's)")
    model.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    model.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true", help="run the model's code")
    model.add_argument(
        "--model-args",
        "--model_args",
        default=None,
        help="more HFLM arguments: k=v,k=v or JSON (parallelize=True); not those with an option of their own",
    )
    layers = parser.add_argument_group("layer sweep (instead of --vector)")
    layers.add_argument(
        "--layers",
        default=None,
        help="fit and sweep one vector per layer: all, 0,-1, or a slice without its end (2:10 is 2 to 9)",
    )
    layers.add_argument("--pairs", default=None, help="contrastive data for --layers (CAA JSON, pairs, triples)")
    layers.add_argument("--kind", choices=SITE_KINDS, default=DEFAULT_KIND, help="site kind (default: resid_post)")
    layers.add_argument(
        "--method", choices=FIT_METHODS, default="mean_diff", help="fit of each layer's vector (default: mean_diff)"
    )
    layers.add_argument("--read", choices=READS, default="last", help="token read of --pairs (default: last)")
    run = parser.add_argument_group("evaluation (lm-eval's options)")
    run.add_argument("--tasks", required=True, nargs="+", help="task names, comma- or space-separated")
    run.add_argument(
        "--scales",
        "--multipliers",
        required=True,
        nargs="+",
        help="scales, each once, e.g. -4,-2,0,2,4 (include 0, the baseline of capability retention)",
    )
    run.add_argument("--include-path", "--include_path", action="append", default=None, help="task YAML folder")
    run.add_argument("--include-defaults", action="store_true", help="load lm-eval's catalogue up front")
    run.add_argument("--metadata", default=None, help='task metadata, JSON or k=v (e.g. \'{"caa_path": "x.json"}\')')
    run.add_argument("--batch-size", "--batch_size", default="1", help="batch size, or 'auto' (default: 1)")
    run.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
    run.add_argument("--num-fewshot", "--num_fewshot", type=int, default=None, help="few-shot examples per prompt")
    run.add_argument("--seed", type=int, default=None, help="one seed for python, numpy, torch and few-shot sampling")
    run.add_argument(
        "--apply-chat-template",
        "--apply_chat_template",
        nargs="?",
        const=True,
        default=False,
        help="format prompts with the tokenizer's chat template (optionally a template name)",
    )
    run.add_argument("--gen-kwargs", "--gen_kwargs", default=None, help="generation arguments, k=v,k=v")
    run.add_argument("--log-samples", "--log_samples", action="store_true", help="also write per-sample records")
    run.add_argument(
        "-o", "--output-path", "--output_path", required=True, help="results folder (resumed if it exists)"
    )


def load_lm(plan: SweepPlan, args: argparse.Namespace) -> SteeredLM:
    """Load the model once, steered by the plan's vector (a layer sweep: a zero placeholder, replaced
    per layer)."""
    vector: Any = args.vector
    if vector is None:
        assert plan.hidden_size is not None and plan.layer_sites
        vector = {plan.layer_sites[0].path: torch.zeros(plan.hidden_size)}
    kwargs = dict(plan.model_args)
    # the device of the inputs; with parallelize=True accelerate places the layers (device_map)
    kwargs.setdefault("device", str(parse_device(args.device)))
    try:
        return SteeredLM(
            pretrained=plan.model,
            vector=vector,
            scale=plan.scales[0],
            operator=args.operator,
            positions=plan.positions,
            sites=plan.vector.keys() if plan.vector is not None else None,
            check=args.check,
            assistant_marker=args.assistant_marker,
            condition=args.condition,
            batch_size=int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size,
            **kwargs,
        )
    except TypeError as error:
        refused = unexpected_argument(error, check_model_args(args.model_args), "--model-args")
        if refused is None:
            raise
        raise refused from None


def _run(args: argparse.Namespace) -> int:
    parse_device(args.device)
    plan = check_sweep(args)  # every option, before the model loads
    check_output(plan.output, plan.provenance)
    lm = load_lm(plan, args)
    leader = lm.rank == 0
    try:
        return _sweep(lm, plan, args, leader)
    except KeyboardInterrupt:
        if leader:
            print(
                f"{PROG}: interrupted; the finished runs are kept in {plan.output}: run the same command again to "
                "resume the sweep",
                file=sys.stderr,
            )
        return INTERRUPTED


def _sweep(lm: SteeredLM, plan: SweepPlan, args: argparse.Namespace, leader: bool) -> int:
    progress = print if leader else None
    if plan.vector is not None:
        data = run_sweep(
            lm,
            plan.tasks,
            plan.scales,
            plan.output,
            manager=plan.manager,
            options=plan.options,
            provenance=plan.provenance,
            progress=progress,
        )
    else:
        batches = contrastive_batches(
            lm.tokenizer,
            plan.pairs,
            batch_size=8,
            read="answer" if args.read == "answer" else "last",
            padding_side="right",
            chat_template=bool(args.apply_chat_template),
        )
        data = layer_sweep(
            lm,
            batches,
            plan.layer_sites,
            plan.tasks,
            plan.scales,
            plan.output,
            manager=plan.manager,
            method=args.method,
            read=args.read,
            options=plan.options,
            provenance=plan.provenance,
            progress=progress,
        )
    if leader:
        best = data["summary"].get("best_layer") if isinstance(data["summary"], dict) else None
        extra = f"; best layer {best['layer']}" if best else ""
        print(f"Wrote {plan.output / 'results.json'} and {plan.output / 'report.md'}{extra}")
    return 0


COMMAND = Command(
    name="sweep",
    help=SUMMARIES["sweep"],
    description=(
        "Evaluate lm-eval tasks on a model steered by a vector at each scale, or fit a vector per layer from "
        "--pairs (one pass over the data) and sweep each. Writes results.json (provenance, per-item propensities, "
        "steerability per task), metrics.csv, items.csv, PNG plots and report.md into --output-path; a rerun "
        "with the same settings resumes. Every option is checked before the model loads."
    ),
    add_arguments=_add_arguments,
    run=_run,
    signed_options=("--scales", "--multipliers", "--layers"),
)
