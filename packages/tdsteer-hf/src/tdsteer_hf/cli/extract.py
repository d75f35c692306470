"""``tdsteer extract``: a steering vector of a Hugging Face model from a file of contrastive pairs."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

import tdsteer
from tdsteer import distributed as parallel
from tdsteer.aggregators import METHODS
from tdsteer.cli import CLIError, Command, output_file, parse_device, parse_layers, positive_int, save_extracted
from tdsteer.cli.command import SUMMARIES
from tdsteer_hf.architectures import DEFAULT_KIND, SITE_KINDS
from tdsteer_hf.cli.conditions import add_condition_options, check_condition_options, fit_condition
from tdsteer_hf.cli.loading import add_model_options, load_model, load_tokenizer, transformers_console
from tdsteer_hf.data import contrastive_batches
from tdsteer_hf.model_inputs import TextTooLongError
from tdsteer_hf.pair_files import holds_caa_items, read_pairs
from tdsteer_hf.sites import describe

READS = ("last", "answer", "mean", "all")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--pairs", required=True, help="contrastive data file (.json, .jsonl, .tsv)")
    parser.add_argument("--layers", default=None, help="layers: 6,7 or -1 or 2:5 or all (default: the middle layer)")
    parser.add_argument(
        "--kind",
        choices=SITE_KINDS,
        default=DEFAULT_KIND,
        help="activation read at each layer (default: resid_post, the block's output)",
    )
    parser.add_argument(
        "--method", choices=sorted(METHODS), default="mean_diff", help="aggregation method (default: mean_diff)"
    )
    parser.add_argument(
        "--read",
        choices=READS,
        default=None,
        help=(
            "token read: last (last token), answer (the answer token of CAA records and prompt/completion "
            "records), mean (mean over tokens), all (every token, for --method actadd) (default: answer for "
            "CAA records, whose last token is the parenthesis after the answer letter; last otherwise and with "
            "--condition)"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="format the texts with the tokenizer's chat template (default: no)",
    )
    parser.add_argument("--max-length", type=int, default=None, help="keep at most this many tokens per text")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)"
    )
    add_condition_options(parser)
    parser.add_argument("-o", "--output", required=True, help="where to write the vector (.safetensors)")


def _run(args: argparse.Namespace) -> int:
    positive_int("--batch-size", args.batch_size)
    if args.max_length is not None:
        positive_int("--max-length", args.max_length)
    layers = parse_layers(args.layers)  # everything the user gave is checked before the model loads
    if args.condition:
        args.read = args.read or "last"  # a condition reads the prompt, CAA items included
        check_condition_options(args)
    elif args.held_out:
        raise CLIError("--held-out measures a condition's accuracy: it goes with --condition")
    output_file(args.output)
    parse_device(args.device)
    records = read_pairs(args.pairs)
    if args.read is None:
        args.read = "answer" if holds_caa_items(records) else "last"
    if getattr(METHODS[args.method], "per_token", False) and args.read != "all":
        raise CLIError(f"--method {args.method} builds one vector per token position: add --read all")
    # Under torchrun each rank reads its shard of the pairs; the states are all-reduced once.
    with parallel.process_group():
        return _extract(args, records, layers)


def _batches(args: argparse.Namespace, tokenizer: Any, records: list[Any], model: Any) -> Any:
    """This rank's batches (none for an empty shard), checked against the model's positions."""
    if not records:
        return []
    try:
        return contrastive_batches(
            tokenizer,
            records,
            batch_size=args.batch_size,
            read="answer" if args.read == "answer" else "last",
            padding_side="right",
            chat_template=args.chat_template,
            max_length=args.max_length,
            model=model,
        )
    except TextTooLongError as error:  # the adapter's rule, in the command line's words
        raise CLIError(
            f"pairs file {args.pairs!r} holds a text of {error.longest} tokens but the model takes at most "
            f"{error.limit} positions; pass --max-length {error.limit} to keep the last {error.limit} tokens of "
            "each text"
        ) from None


def _extract(args: argparse.Namespace, records: list[Any], layers: list[Any] | None) -> int:
    device = args.device if args.device is not None or not parallel.active() else str(parallel.local_device())
    with transformers_console():
        model = load_model(args.model, dtype=args.dtype, device=device)
    description = describe(model)
    records_of_kind = description.of_kind(args.kind)
    chosen = [len(records_of_kind) // 2] if layers is None else layers
    indices = tdsteer.take_indices(len(records_of_kind), chosen, what="layer")
    sites = [records_of_kind[i].site for i in indices]
    with transformers_console():
        tokenizer = load_tokenizer(args.model)
    if args.chat_template and not getattr(tokenizer, "chat_template", None):
        raise CLIError(f"--chat-template: the tokenizer of {args.model!r} has no chat template; drop --chat-template")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.condition:
        batches_of = partial(_batches, args, tokenizer, model=model)
        return fit_condition(args, model, batches_of, records, sites, indices, progress=progress)
    failure: Exception | None = None
    try:  # a shard's own problem (a bad record, a long text) must fail every rank, not leave them waiting
        batches = _batches(args, tokenizer, parallel.shard(records), model)
    except Exception as error:  # noqa: BLE001 - shared with every rank by agree() and raised there
        failure, batches = error, []
    parallel.agree(failure)
    vector = tdsteer.extract(
        model, batches, sites, method=args.method, read=args.read, progress=progress, model_name=args.model
    )
    failure = None
    if parallel.is_main():
        try:
            save_extracted(
                vector,
                args.output,
                read=args.read,
                data=f"{vector.metadata['num_examples']} examples",
                site_kind=args.kind,
                layers=indices,
                chat_template=bool(args.chat_template),
                data_file=str(args.pairs),
                ranks=parallel.rank_and_size()[1],
            )
        except Exception as error:  # noqa: BLE001 - shared with every rank by agree() and raised there
            failure = error
    parallel.agree(failure)
    return 0


COMMAND = Command(
    name="extract",
    help=SUMMARIES["extract"],
    description=(
        "Compute a steering vector from contrastive pairs. --pairs takes a CAA JSON/JSONL file (records with "
        "question, answer_matching_behavior, answer_not_matching_behavior), a JSON/JSONL file of "
        '{"positive", "negative"} or {"prompt", "positive", "negative"} records, or a tab-separated file '
        "with two (positive, negative) or three (prompt, positive, negative) columns."
    ),
    add_arguments=_add_arguments,
    run=_run,
    signed_options=("--layers",),
)
