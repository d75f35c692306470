"""``tdsteer extract --condition``: fit a condition for conditional steering (``tdsteer.Condition``)
from a pairs file whose positive texts should trigger it, and save it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tdsteer
from tdsteer import distributed as parallel
from tdsteer.cli import CLIError


def add_condition_options(parser: argparse.ArgumentParser) -> None:
    """``--condition`` and ``--held-out`` of ``tdsteer extract``."""
    parser.add_argument(
        "--condition",
        action="store_true",
        help=(
            "fit a condition for conditional steering instead (tdsteer.Condition.fit: positive texts are the "
            "prompts that should trigger it, negative ones those that should not; --read last or mean; of several "
            "--layers, the one that separates best); use it with tdsteer generate --condition"
        ),
    )
    parser.add_argument(
        "--held-out",
        type=float,
        default=0.0,
        help="with --condition: the share of the pairs kept out of the fit to measure its accuracy (default: 0)",
    )


def check_condition_options(args: argparse.Namespace) -> None:
    """Refuse, before the model loads, what ``--condition`` cannot do."""
    if args.read not in ("last", "mean"):
        raise CLIError(f"--condition reads one row per prompt: use --read last or --read mean, not {args.read!r}")
    if args.method != "mean_diff":
        raise CLIError(f"--condition fits a mean difference and a threshold; drop --method {args.method}")
    if not 0 <= args.held_out < 1:
        raise CLIError(f"--held-out is a share of the pairs, from 0 up to (not including) 1; got {args.held_out:g}")
    if parallel.launched():
        raise CLIError("--condition fits in one process: run it without torchrun")


def split_held_out(records: list[Any], share: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """``records`` in a seeded random order, split into the ones to fit on and ``share`` of them held out.

    Examples:
        >>> fit, held = split_held_out(list(range(10)), 0.2)
        >>> len(fit), len(held), sorted(fit + held) == list(range(10))
        (8, 2, True)
    """
    count = round(len(records) * share)
    if share and not 0 < count < len(records):
        raise CLIError(f"--held-out {share:g} of {len(records)} pairs leaves no pair to fit on or to hold out")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [records[i] for i in order]
    return shuffled[: len(records) - count], shuffled[len(records) - count :]


def fit_condition(
    args: argparse.Namespace,
    model: Any,
    batches_of: Callable[[list[Any]], Any],
    records: list[Any],
    sites: list[Any],
    layers: list[int],
    *,
    progress: bool,
) -> int:
    """Fit the condition (at the best of ``sites``), measure it on the held-out pairs, save it, and say so."""
    fit_on, held_out = split_held_out(records, args.held_out) if args.held_out else (records, [])
    condition = tdsteer.Condition.fit(model, batches_of(fit_on), sites, read=args.read, progress=progress)
    layer = layers[[site.key for site in sites].index(condition.site.key)]
    held = None if not held_out else condition.evaluate(model, batches_of(held_out), progress=progress)
    condition.metadata.update(
        model_name=args.model, site_kind=args.kind, layers=[layer], data_file=str(args.pairs), read=args.read
    )
    if held is not None:
        condition.metadata.update(held_out=len(held_out), held_out_accuracy=held)
    path = condition.save(Path(args.output).expanduser())
    side = ">" if condition.above else "<"
    if len(sites) > 1:
        tried = ", ".join(f"{lay}: {acc:.3f}" for lay, acc in zip(layers, condition.accuracies.values(), strict=True))
        print(f"Balanced accuracy by layer: {tried}")
    measured = f"{condition.accuracy:.3f} on the {len(fit_on)} prompt pairs it was fitted on"
    if held is not None:
        measured += f", {held:.3f} on {len(held_out)} held out"
    print(
        f"Fitted condition at {condition.site.key} (layer {layer}): cosine {side} {condition.threshold:.4g} "
        f"(read {args.read}), balanced accuracy {measured} -> {path}"
    )
    return 0
