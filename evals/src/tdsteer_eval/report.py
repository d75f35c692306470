"""``report.md``: a sweep's results as Markdown, with its plots embedded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdsteer_eval.plots import plot_behaviour, plot_capability, plot_layers
from tdsteer_eval.task_data import BEHAVIOUR_TASKS


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _behaviour_tasks(summary: Mapping[str, Any]) -> list[str]:
    """The tasks of the Behaviour section: those with per-item propensities (pairwise), and the
    shipped A/B tasks. Their metrics measure the behaviour (``acc``: how often the matching answer is
    the likelier one), so they are not capability: retention relative to scale 0 is not shown."""
    return [
        task
        for task, s in summary.items()
        if isinstance(s, Mapping) and ("mean_propensity" in s or task in BEHAVIOUR_TASKS)
    ]


def _metric_rows(summary: Mapping[str, Any], tasks: list[str], relative: bool) -> list[list[Any]]:
    rows = []
    for task in tasks:
        for name, entry in (summary[task].get("capability") or {}).items():
            if relative:
                cells = [f"{_number(v)} ({_number(r)})" for v, r in zip(entry["values"], entry["retention"])]
            else:
                cells = list(entry["values"])
            rows.append([task, name, *cells])
    return rows


def _task_tables(summary: Mapping[str, Any], level: int = 2) -> list[str]:
    """The Behaviour and Capability sections of one summary, their headings at ``level``."""
    lines: list[str] = []
    heading = "#" * level
    tasks = [t for t, s in summary.items() if isinstance(s, Mapping)]
    if not tasks:
        return lines
    scales = summary[tasks[0]]["scales"]
    behaviour = _behaviour_tasks(summary)
    with_propensity = [t for t in behaviour if "mean_propensity" in summary[t]]
    if behaviour:
        lines += [f"{heading} Behaviour", ""]
    if with_propensity:
        lines += _table(
            [
                "task",
                "items",
                "steerability",
                "anti-steerable",
                *[f"mean propensity @ {s:g}" for s in summary[with_propensity[0]]["scales"]],
            ],
            [
                [
                    t,
                    summary[t]["items"],
                    summary[t]["steerability"],
                    summary[t]["anti_steerable_fraction"],
                    *summary[t]["mean_propensity"],
                ]
                for t in with_propensity
            ],
        )
    rows = _metric_rows(summary, behaviour, relative=False)
    if rows:
        lines += [
            "The behaviour tasks' metrics at each scale (`acc`: the share of items whose target answer, the "
            "matching one in the A/B tasks, is the likelier).",
            "",
        ]
        lines += _table(["task", "metric", *[f"scale {s:g}" for s in scales]], rows)
    rows = _metric_rows(summary, [t for t in tasks if t not in behaviour], relative=True)
    if rows:
        lines += [f"{heading} Capability", "", "Each metric at each scale, and (in brackets) relative to scale 0.", ""]
        lines += _table(["task", "metric", *[f"scale {s:g}" for s in scales]], rows)
    return lines


def _vector(provenance: Mapping[str, Any]) -> tuple[str, Any]:
    """The report's vector and method: a file, a file saved in the results folder, a vector per layer
    (a layer sweep, fitted on its pairs), or one held in memory."""
    vector = provenance.get("vector") or {}
    method = (vector.get("metadata") or {}).get("method") or vector.get("method")
    if vector.get("path"):
        return str(vector["path"]), method
    if vector.get("file"):
        return f"{vector['file']} (in this folder)", method
    if vector.get("pairs") or provenance.get("layers"):
        return "one per layer" + (f", fitted on {vector['pairs']}" if vector.get("pairs") else ""), method
    return "(in memory)", method


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
    vector, method = _vector(provenance)
    facts = [
        ["model", provenance.get("model")],
        ["vector", vector],
        ["vector method", method],
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
            lines += [f"### {layer}", ""] + _task_tables(layer_summary, level=4)
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
