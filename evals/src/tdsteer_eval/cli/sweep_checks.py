"""Everything ``tdsteer sweep`` is given, checked before the model loads.

Each check ends a bad input with one line on stderr and exit status 2 (a :class:`CLIError`, or a
``ValueError`` / ``OSError`` that the ``tdsteer`` program prints as one line): unknown tasks,
missing files, a vector made for another model, a bad position policy or operator, an output that
cannot hold the results. The model's config and its structure (built on the meta device, no weights
read) are enough to check that a vector fits the model.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval.tasks import TaskManager
from lm_eval.utils import simple_parse_args_string
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import tdsteer
from tdsteer import SteeringVector
from tdsteer.cli import CLIError, one_line, parse_layers, parse_positions, parse_scales, positive_int, warn
from tdsteer.model_facts import model_hidden_size
from tdsteer.operators import as_operator
from tdsteer.positions import PositionsLike
from tdsteer.vector import as_vector
from tdsteer_eval.lm import split_sites
from tdsteer_eval.runner import EvalOptions, task_manager, versions
from tdsteer_eval.task_data import SHIPPED_TASKS, check_data_file
from tdsteer_eval.vectors import describe_condition, describe_vector, hidden_sizes
from tdsteer_hf.pair_files import read_pairs
from tdsteer_hf.sites import describe


@dataclass
class SweepPlan:
    """The checked inputs of a sweep: what to load, what to run, and the provenance to record."""

    model: str
    model_args: dict[str, Any]
    tasks: list[str]
    scales: list[float]
    positions: PositionsLike
    manager: TaskManager
    options: EvalOptions
    output: Path
    vector: SteeringVector | None = None  # None for a layer sweep
    layer_sites: list[tdsteer.Site] = field(default_factory=list)
    pairs: list[Any] = field(default_factory=list)
    hidden_size: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


#: ``--model-args`` keys that have an option of their own (the model would get them twice).
OWN_OPTIONS = {
    "pretrained": "--model",
    "vector": "--vector",
    "scale": "--scales",
    "scales": "--scales",
    "multipliers": "--scales",
    "operator": "--operator",
    "positions": "--positions",
    "sites": "--sites",
    "check": "--check",
    "assistant_marker": "--assistant-marker",
    "condition": "--condition",
    "batch_size": "--batch-size",
}


def parse_mapping(value: str | None, option: str) -> dict[str, Any]:
    """A JSON object or ``key=value,key=value`` (lm-eval's forms of ``--model_args`` and ``--metadata``).

    Raises:
        CLIError: Not a JSON object, or an item that is not ``key=value``.

    Examples:
        >>> parse_mapping('{"caa_path": "a.json"}', "--metadata"), parse_mapping("dtype=float32", "--model-args")
        ({'caa_path': 'a.json'}, {'dtype': 'float32'})
    """
    if not value:
        return {}
    text = value.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as error:
            raise CLIError(f"{option}: not a JSON object: {error}") from None
        if not isinstance(parsed, dict):
            raise CLIError(f"{option}: expected a JSON object")
        return parsed
    for item in text.split(","):
        key, equals, _ = item.partition("=")
        if item.strip() and (not equals or not key.strip()):
            raise CLIError(f"{option} {value!r}: {item.strip()!r} is not key=value; use key=value,key=value or JSON")
    try:
        return dict(simple_parse_args_string(text))
    except (ValueError, IndexError):
        raise CLIError(f"{option} {value!r}: use key=value,key=value or a JSON object") from None


def check_model_args(value: str | None) -> dict[str, Any]:
    """``--model-args``: more ``HFLM`` arguments, none of which has an option of its own.

    Examples:
        >>> check_model_args("parallelize=True")
        {'parallelize': True}
        >>> check_model_args("scale=3")
        Traceback (most recent call last):
        tdsteer.cli.messages.CLIError: --model-args scale=...: give it with --scales, not in --model-args
    """
    model_args = parse_mapping(value, "--model-args")
    for key in model_args:
        if key in OWN_OPTIONS:
            raise CLIError(f"--model-args {key}=...: give it with {OWN_OPTIONS[key]}, not in --model-args")
    return model_args


def unexpected_argument(error: TypeError, given: Any, option: str) -> CLIError | None:
    """The one-line error for a model that refuses an argument the user gave in ``option``, or ``None``
    when ``error`` is not that (transformers passes unknown ``from_pretrained`` keywords on to the
    model's ``__init__``, which raises ``TypeError``)."""
    found = re.search(r"unexpected keyword argument '([^']+)'", str(error))
    if found is None or found.group(1) not in given:
        return None
    name = found.group(1)
    return CLIError(f"{option} {name}=...: the model does not take it ({one_line(error)}); drop it or fix its name")


def check_scales(values: list[str]) -> list[float]:
    """``--scales``: numbers separated by commas, each once; a warning when ``0`` is not among them.

    Raises:
        CLIError: An empty item (``1,,2``), a value that is not a finite number, or a scale given twice.

    Examples:
        >>> check_scales(["-2,0,2"])
        [-2.0, 0.0, 2.0]
    """
    scales = parse_scales(values, "--scales")  # refuses empty items and values that are no finite numbers
    seen: set[float] = set()
    for scale in scales:
        if scale in seen:
            raise CLIError(f"--scales: {scale:g} is given twice; give each scale once")
        seen.add(scale)
    if 0.0 not in seen:
        listed = ",".join(f"{s:g}" for s in sorted([*scales, 0.0]))
        warn(
            f"--scales has no 0: capability retention (each metric relative to scale 0) will be empty; add it: {listed}"
        )
    return scales


def check_positions(value: str) -> PositionsLike:
    """``--positions``: a core policy or ``assistant``."""
    return "assistant" if value.strip() == "assistant" else parse_positions(value, extra=("assistant",))


def _model_config(args: argparse.Namespace) -> Any:
    location = Path(args.model).expanduser()
    if location.exists() and not (location / "config.json").is_file():
        raise CLIError(f"--model {args.model!r} is not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(
            str(location) if location.exists() else args.model,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
        )
    except Exception as error:  # noqa: BLE001 - a missing or malformed config fails in many ways in transformers
        raise CLIError(f"cannot read the config of model {args.model!r}: {one_line(error)}") from None


def _structure(config: Any, trust_remote_code: bool) -> nn.Module | None:
    """The model built on the meta device from its config (no weights), or ``None`` when it cannot be."""
    try:
        with torch.device("meta"):
            model: nn.Module = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return model
    except Exception:  # noqa: BLE001 - some configs cannot be built without weights: fewer checks then
        return None


def _check_vector(args: argparse.Namespace, config: Any, structure: nn.Module | None) -> SteeringVector:
    if not Path(args.vector).expanduser().is_file():
        raise CLIError(f"--vector {args.vector!r}: no such file")
    vector = as_vector(args.vector, structure)
    sites = split_sites(args.sites.replace(",", " ")) if args.sites else None
    if sites:
        unknown = [s for s in sites if s not in vector]
        if unknown:
            raise CLIError(f"--sites {', '.join(unknown)}: not in the vector, which has {', '.join(vector.keys())}")
        vector = vector.select(sites)
    size = model_hidden_size(_Configured(config))
    foreign = sorted(s for s in hidden_sizes(vector) if size is not None and s != size)
    if foreign:
        raise CLIError(
            f"--vector {args.vector!r} was made for a model with hidden size {foreign[0]}, but {args.model!r} has "
            f"hidden size {size}: extract a vector for this model"
        )
    if structure is not None:
        vector.validate(structure, check=args.check)  # every site resolves; the model type per --check
    return vector


class _Configured(nn.Module):
    """A stand-in module that only carries a config, for :func:`tdsteer.model_facts.model_hidden_size`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


def _check_layers(args: argparse.Namespace, structure: nn.Module | None) -> tuple[list[tdsteer.Site], list[Any]]:
    if not args.pairs:
        raise CLIError("--layers needs --pairs FILE: the contrastive data to fit one vector per layer from")
    pairs = read_pairs(args.pairs)
    if structure is None:
        raise CLIError(f"--layers: cannot build {args.model!r} from its config to find its layers")
    records = describe(structure).of_kind(args.kind)
    chosen = parse_layers(args.layers, "--layers")
    indices = tdsteer.take_indices(len(records), chosen, what="layer")
    return [records[i].site for i in indices], pairs


def check_sweep(args: argparse.Namespace) -> SweepPlan:
    """Check every option of ``tdsteer sweep`` and return the plan; nothing heavy is loaded.

    Raises:
        CLIError, ValueError, OSError: A bad input (one line, exit status 2).
    """
    if args.vector is None and args.layers is None:
        raise CLIError("give --vector FILE (sweep one vector) or --layers L --pairs FILE (fit and sweep one per layer)")
    if args.vector is not None and args.layers is not None:
        raise CLIError("give --vector FILE (one vector) or --layers L --pairs FILE (a layer sweep), not both")
    scales = check_scales(args.scales)
    positions = check_positions(args.positions)
    try:
        as_operator(args.operator)
    except ValueError as error:
        raise CLIError(f"--operator: {error}") from None
    if args.batch_size != "auto" and not str(args.batch_size).isdigit():
        raise CLIError(f"--batch-size {args.batch_size!r}: a positive integer or 'auto'")
    if args.batch_size != "auto":
        positive_int("--batch-size", int(args.batch_size))
    if args.limit is not None and args.limit <= 0:
        raise CLIError(f"--limit must be positive, got {args.limit:g}")
    metadata = parse_mapping(args.metadata, "--metadata")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise CLIError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    model_args = check_model_args(args.model_args)
    gen_kwargs = parse_mapping(args.gen_kwargs, "--gen-kwargs")
    tasks = [t.strip() for t in ",".join(args.tasks).split(",") if t.strip()]
    if not tasks:
        raise CLIError("--tasks needs at least one task name")
    for task in tasks:
        if task in SHIPPED_TASKS:
            check_data_file(task, metadata)
    manager = task_manager(tasks, args.include_path, include_defaults=args.include_defaults or None, metadata=metadata)
    config = _model_config(args)
    structure = _structure(config, args.trust_remote_code)
    plan_vector = _check_vector(args, config, structure) if args.vector else None
    condition = tdsteer.Condition.load(args.condition) if args.condition else None
    layer_sites, pairs = _check_layers(args, structure) if args.layers else ([], [])
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    options = EvalOptions(
        limit=limit,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        # lm-eval parses text as key=value itself; a JSON object goes as the dict it is
        gen_kwargs=gen_kwargs if args.gen_kwargs and args.gen_kwargs.strip().startswith("{") else args.gen_kwargs,
        seed=args.seed,
        log_samples=args.log_samples,
    )
    model_args = {
        "dtype": args.dtype,
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
        **model_args,
    }
    provenance: dict[str, Any] = {
        "model": args.model,
        "model_args": {k: v for k, v in model_args.items() if v is not None},
        "vector": describe_vector(args.vector, plan_vector) if plan_vector is not None else None,
        "sites": plan_vector.keys() if plan_vector is not None else [s.key for s in layer_sites],
        "operator": args.operator,
        "positions": positions,
        "condition": describe_condition(args.condition, condition),
        "scales": scales,
        "tasks": tasks,
        "metadata": metadata,
        "options": {
            "limit": limit,
            "num_fewshot": args.num_fewshot,
            "apply_chat_template": args.apply_chat_template,
            "gen_kwargs": args.gen_kwargs,
            "seed": args.seed,
        },
        "versions": versions(),
    }
    if args.layers:
        provenance["layers"] = [s.key for s in layer_sites]
        provenance["vector"] = {
            "pairs": str(Path(args.pairs).expanduser().resolve()),
            "kind": args.kind,
            "method": args.method,
            "read": args.read,
        }
    return SweepPlan(
        model=args.model,
        model_args=model_args,
        tasks=tasks,
        scales=scales,
        positions=positions,
        manager=manager,
        options=options,
        output=Path(args.output_path).expanduser(),
        vector=plan_vector,
        layer_sites=layer_sites,
        pairs=pairs,
        hidden_size=model_hidden_size(_Configured(config)),
        provenance=provenance,
    )
