"""Argument types shared by every ``tdsteer`` subcommand, whichever package adds it."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tdsteer.checks import CHECKS
from tdsteer.cli.messages import CLIError
from tdsteer.indices import IndexItem, parse_indices
from tdsteer.positions import PositionsLike, as_token_policy
from tdsteer.vector import SteeringVector


def parse_scales(values: Sequence[str], option: str = "--scale") -> list[float]:
    """Scales from ``option`` values, each one number or several separated by commas.

    Raises:
        CLIError: A value is not a finite number, an item is empty (``1,,2``), or there is none.

    Examples:
        >>> parse_scales(["-4,0,4"]), parse_scales(["2", "-2"])
        ([-4.0, 0.0, 4.0], [2.0, -2.0])
    """
    scales: list[float] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                raise CLIError(
                    f"{option} {value!r} has an empty item: separate the numbers with single commas, e.g. -4,0,4"
                )
            try:
                number = float(part)
            except ValueError:
                raise CLIError(f"{option} {part!r} is not a number; use e.g. {option} 4 or {option} -4,0,4") from None
            if not math.isfinite(number):
                raise CLIError(f"{option} {part!r} is not finite")
            scales.append(number)
    if not scales:
        raise CLIError(f"{option} needs at least one number, e.g. {option} 4 or {option} -4,0,4")
    return scales


def parse_positions(value: str, option: str = "--positions", extra: Sequence[str] = ()) -> PositionsLike:
    """The position policy of a language model: ``all``, ``prompt``, ``generated``, ``continuation``,
    ``K`` or ``from:K`` (:func:`tdsteer.steer`); the image policies are refused.

    Args:
        value: The option's value.
        option: The option's name, for the message.
        extra: Further policy names that the command accepts (and handles before this call), for the
            message.

    Raises:
        CLIError: Not a policy of a language model.

    Examples:
        >>> parse_positions("3"), parse_positions("generated")
        (3, 'generated')
    """
    policy: PositionsLike = int(value) if value.strip().isdigit() else value.strip()
    try:
        as_token_policy(policy, extra)
    except (TypeError, ValueError) as error:
        raise CLIError(f"{option} {value!r}: {error}") from None
    return policy


def parse_layers(value: str | None, option: str = "--layers") -> list[IndexItem] | None:
    """A layer selection for :func:`tdsteer.take_indices`: ``6,7``, ``-1``, ``2:5``, ``-2:`` or ``all``.

    ``None`` (the option not given) stays ``None``, so the command can pick its default; ``all`` is
    ``[slice(None)]``.

    Raises:
        CLIError: Malformed.

    Examples:
        >>> parse_layers("0,-2:")
        [0, slice(-2, None, None)]
    """
    if value is None:
        return None
    try:
        parsed = parse_indices(value)
    except ValueError as error:
        raise CLIError(f"{option}: {error}") from None
    return [slice(None)] if parsed is None else parsed


def parse_device(requested: str | None, option: str = "--device") -> torch.device:
    """A device: ``cpu``, ``cuda``, ``cuda:N``...; ``None`` picks CUDA when available.

    Raises:
        CLIError: Not a device, or CUDA asked for without a GPU.

    Examples:
        >>> parse_device("cpu")
        device(type='cpu')
    """
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise CLIError(f"{option} {requested!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise CLIError(f"{option} meta holds no data, so nothing can run on it; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"{option} {requested}: no CUDA GPU is available (torch.cuda.is_available() is False)")
    return device


def output_file(value: str, option: str = "-o") -> Path:
    """Check an output file option before any work: not a folder, not a ``.pt`` name (lm-eval's
    format), and its folder writable or creatable.

    Raises:
        CLIError: The path is a folder or a ``.pt`` name, or its folder cannot be written.

    Examples:
        >>> output_file("/tmp/v.safetensors")
        PosixPath('/tmp/v.safetensors')
    """
    path = Path(value).expanduser()
    if path.is_dir():
        raise CLIError(f"{option} {value!r} is a folder; give a file name, e.g. {Path(value) / 'vector.safetensors'}")
    from tdsteer.formats import LM_EVAL_SUFFIX  # the file formats' rule; imported when an output is checked

    if path.suffix.lower() == LM_EVAL_SUFFIX:
        raise CLIError(
            f"{option} {value!r}: tdsteer writes safetensors files, and a .pt name stands for lm-eval's "
            f"format; name it {path.with_suffix('.safetensors').name!r} (SteeringVector.load(path).to_lm_eval("
            "'vector.pt') exports it for lm-eval's steered model)"
        )
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {value!r}: cannot write in {str(existing)!r} (permission denied or not a folder)")
    return path


def add_check_option(parser: argparse.ArgumentParser) -> None:
    """``--check warn|error|ignore``: what to do when a vector was made for another model type."""
    parser.add_argument(
        "--check",
        choices=CHECKS,
        default="warn",
        help="when the vector was made for another model type: warn, error or ignore (default: warn)",
    )


def positive_int(option: str, value: int) -> int:
    """``value`` when it is at least 1.

    Raises:
        CLIError: It is not.
    """
    if value < 1:
        raise CLIError(f"{option} must be at least 1, got {value}")
    return value


def save_extracted(vector: SteeringVector, output: str, *, read: object, data: str, **metadata: Any) -> Path:
    """Record ``metadata`` in ``vector``, save it to ``output`` and print the one-line summary of an extraction.

    Args:
        vector: The extracted vector.
        output: The ``-o`` value (``~`` expanded).
        read: The read used, for the summary.
        data: What it was extracted from, for the summary (``"8 examples"``).
        **metadata: Entries added to the vector's metadata (``site_kind``, ``layers``...).

    Returns:
        The path written.
    """
    vector.metadata.update(metadata)
    path = vector.save(Path(output).expanduser())
    sites = f"{len(vector)} site{'s' if len(vector) != 1 else ''} [{', '.join(vector.keys())}]"
    print(f"Extracted vector: method {vector.metadata.get('method')}, read {read}, {data}, {sites} -> {path}")
    return path
