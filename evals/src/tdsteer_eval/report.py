"""``report.md``: a sweep's results as Markdown, with its plots embedded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdsteer_eval.plots import plot_behaviour, plot_capability, plot_layers


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _task_tables(summary: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    behaviour = [(t, s) for t, s in summary.items() if isinstance(s, Mapping) and "mean_propensity" in s]
    if behaviour:
        lines += ["## Behaviour", ""]
        lines += _table(
            [
                "task",
                "items",
                "steerability",
                "anti-steerable",
                *[f"mean propensity @ {s:g}" for s in behaviour[0][1]["scales"]],
            ],
            [
                [t, s["items"], s["steerability"], s["anti_steerable_fraction"], *s["mean_propensity"]]
                for t, s in behaviour
            ],
        )
    capability = [
        (t, name, e)
        for t, s in summary.items()
        if isinstance(s, Mapping)
        for name, e in (s.get("capability") or {}).items()
    ]
    if capability:
        scales = next(s["scales"] for s in summary.values() if isinstance(s, Mapping))
        lines += ["## Capability", "", "Each metric at each scale, and (in brackets) relative to scale 0.", ""]
        rows = [
            [task, name, *[f"{_number(v)} ({_number(r)})" for v, r in zip(entry["values"], entry["retention"])]]
            for task, name, entry in capability
        ]
        lines += _table(["task", "metric", *[f"scale {s:g}" for s in scales]], rows)
    return lines


def write_report(folder: Path, data: Mapping[str, Any]) -> Path:
    """Write the plots (``behaviour.png``, ``capability.png``, ``layers.png``) and ``report.md``.

    Args:
        folder: The results folder.
        data: What ``results.json`` holds.

    Returns:
        The path of ``report.md``.

    Examples:
        >>> import json, pathlib
        >>> folder = pathlib.Path("runs/refusal")  # a finished sweep  # doctest: +SKIP
        >>> write_report(folder, json.loads((folder / "results.json").read_text())).name  # doctest: +SKIP
        'report.md'
    """
    provenance, summary = data["provenance"], data["summary"]
    lines = ["# Steering sweep", ""]
    vector = provenance.get("vector") or {}
    facts = [
        ["model", provenance.get("model")],
        ["vector", vector.get("path") or "(in memory)"],
        ["vector method", (vector.get("metadata") or {}).get("method")],
        ["sites", ", ".join(provenance.get("sites") or [])],
        ["operator", provenance.get("operator")],
        ["positions", provenance.get("positions")],
        ["scales", ", ".join(f"{s:g}" for s in provenance.get("scales", []))],
        ["tasks", ", ".join(provenance.get("tasks", []))],
        ["date", provenance.get("date")],
    ]
    lines += _table(["setting", "value"], facts)
    if "layers" in summary:
        best = summary.get("best_layer")
        lines += ["## Layers", ""]
        if best:
            lines += [f"Best layer: **{best['layer']}** (steerability {best['steerability']:.4g}).", ""]
        if plot_layers(summary["layers"], folder / "layers.png"):
            lines += ["![mean propensity per layer and scale](layers.png)", ""]
        for layer, layer_summary in summary["layers"].items():
            lines += [f"### {layer}", ""] + _task_tables(layer_summary)
    else:
        lines += _task_tables(summary)
        if plot_behaviour(data["items"], summary, folder / "behaviour.png"):
            lines += ["![propensity vs scale, every item and the mean](behaviour.png)", ""]
        if plot_capability(summary, folder / "capability.png"):
            lines += ["![capability vs scale](capability.png)", ""]
    lines += [
        "Propensity: log p(matching answer) - log p(non-matching answer) per item. Steerability: the "
        "least-squares slope of the mean propensity against the scale (Tan et al. 2024); an item is "
        "anti-steerable when its own slope is negative. Rows: `results.json`, `metrics.csv`, `items.csv`.",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
