"""``tdsteer info``: what a vector file holds, how an adapter sees a model, and whether the two fit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tdsteer.cli.command import SUMMARIES, Command
from tdsteer.cli.messages import CLIError, one_line
from tdsteer.cli.sources import OpenedModel, open_model
from tdsteer.model_facts import model_type_of
from tdsteer.vector import SteeringVector, as_vector


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model directory or id (needs an adapter: tdsteer-hf, tdsteer-timm)"
    )
    parser.add_argument("--vector", default=None, help="steering-vector file (tdsteer .safetensors or lm-eval .pt)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def vector_summary(path: str) -> dict[str, Any]:
    """Sites, shapes, dtypes, norms and metadata of a vector file, JSON-compatible."""
    vector = as_vector(Path(path).expanduser())  # a tdsteer file, or an lm-eval .pt file (hookpoints as sites)
    sites = []
    for key, direction in vector.directions.items():
        site = vector.sites[key]
        values = direction.float()
        sites.append(
            {
                "key": key,
                "path": site.path,
                "slot": site.slot,
                "io": site.io,
                "layout": site.layout,
                "shape": list(direction.shape),
                "dtype": str(direction.dtype).removeprefix("torch."),
                "norm": float(values.norm()),
                **({"position_norms": values.norm(dim=-1).tolist()} if direction.ndim == 2 else {}),
            }
        )
    return {"vector": path, "sites": sites, "metadata": vector.metadata, "_vector": vector}


def model_summary(name: str, opened: OpenedModel) -> dict[str, Any]:
    """How the adapter sees the model, JSON-compatible."""
    return {
        "model": name,
        **opened.description.to_dict(),
        **opened.facts,
        "weights_read": opened.weights_read,
    }


def _print_model(summary: dict[str, Any]) -> None:
    weights = "" if summary["weights_read"] else " (structure from its config; weights not read)"
    print(f"model:        {summary['model']}{weights}")
    print(f"class:        {summary['model_class']} (adapter {summary['adapter']})")
    print(f"architecture: {summary['architecture']} (found by {summary['source']})")
    print(f"hidden_size:  {summary['hidden_size']}")
    for key, value in summary.items():
        if key == "parameters":
            print(f"parameters:   {value:,}")
    print(f"sites (default kind {summary['default_kind']}):")
    for kind, entry in summary["kinds"].items():
        if not entry.get("available", True):
            print(f"  {kind:<11} none ({entry['reason']})")
        else:
            print(f"  {kind:<11} {entry['count']} layers, 0..{entry['count'] - 1}: {entry['first']} .. {entry['last']}")


def _print_vector(summary: dict[str, Any]) -> None:
    print(f"vector: {summary['vector']}")
    print(f"sites:  {len(summary['sites'])}")
    for site in summary["sites"]:
        extra = []
        if site["slot"] not in (None, 0):
            extra.append(f"slot {site['slot']}")
        if site["io"] != "output":
            extra.append(f"io {site['io']}")
        if site["layout"] != "NLC":
            extra.append(f"layout {site['layout']}")
        shape = "(" + ", ".join(str(n) for n in site["shape"]) + ("," if len(site["shape"]) == 1 else "") + ")"
        note = f" [{', '.join(extra)}]" if extra else ""
        print(f"  {site['key']}{note}: shape {shape} {site['dtype']}, norm {site['norm']:.4g}")
    print("metadata:")
    for key, value in summary["metadata"].items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(f"  {key}: {shown}")


def fit(vector: SteeringVector, opened: OpenedModel) -> tuple[str | None, str | None]:
    """Why ``vector`` does not fit the model (``None`` when it does), and a note on a model-type difference."""
    recorded, actual = vector.metadata.get("model_type"), model_type_of(opened.model)
    note = f"made for model type {recorded!r}, the model is {actual!r}" if recorded and recorded != actual else None
    try:
        vector.validate(opened.model, check="ignore", site_sizes=opened.description.site_sizes())
    except ValueError as error:
        return one_line(error), note
    return None, note


def _run(args: argparse.Namespace) -> int:
    if args.model is None and args.vector is None:
        raise CLIError("info needs --model NAME, --vector FILE, or both")
    vector_info = vector_summary(args.vector) if args.vector is not None else None
    opened = open_model(args.model) if args.model is not None else None
    model_info = model_summary(args.model, opened) if opened is not None else None
    problem = note = None
    if vector_info is not None and opened is not None:
        problem, note = fit(vector_info["_vector"], opened)
    if args.json:
        out: dict[str, Any] = {}
        if model_info is not None:
            out["model"] = model_info
        if vector_info is not None:
            out["vector"] = {k: v for k, v in vector_info.items() if not k.startswith("_")}
        if model_info is not None and vector_info is not None:
            out["fits"] = problem is None
            out["problem"] = problem
            out["model_type_note"] = note
        print(json.dumps(out, ensure_ascii=False, indent=2, default=str))
        return 0
    if model_info is not None:
        _print_model(model_info)
    if vector_info is not None:
        if model_info is not None:
            print()
        _print_vector(vector_info)
    if model_info is not None and vector_info is not None:
        print()
        print("fits the model: yes" if problem is None else f"fits the model: no ({problem})")
        if note is not None:
            print(f"note: the vector was {note}")
    return 0


COMMAND = Command(
    name="info",
    help=SUMMARIES["info"],
    description=(
        "Describe what a vector file holds (sites, shapes, norms, metadata), how an installed adapter sees a "
        "model (kinds of site, layers, hidden size), and whether the vector fits the model. --vector needs no "
        "adapter."
    ),
    add_arguments=_add_arguments,
    run=_run,
)
