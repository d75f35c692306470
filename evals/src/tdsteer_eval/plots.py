"""PNG plots of a sweep (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no window
import matplotlib.pyplot as plt  # noqa: E402


def _behaviour_tasks(summary: Mapping[str, Any]) -> list[str]:
    return [task for task, s in summary.items() if isinstance(s, Mapping) and "mean_propensity" in s]


def plot_behaviour(items: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], path: Path) -> Path | None:
    """Propensity against scale, one panel per pairwise task: every item (thin) and the mean (bold),
    with the steerability in the title. ``None`` when no task has propensities."""
    tasks = _behaviour_tasks(summary)
    if not tasks:
        return None
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        lines: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for row in items:
            if row["task"] == task:
                lines[int(row["doc_id"])].append((float(row["scale"]), float(row["propensity"])))
        for points in lines.values():
            points.sort()
            axis.plot([s for s, _ in points], [p for _, p in points], color="tab:blue", alpha=0.25, linewidth=0.8)
        scales, means = summary[task]["scales"], summary[task]["mean_propensity"]
        known = [(s, m) for s, m in zip(scales, means) if m is not None]
        axis.plot([s for s, _ in known], [m for _, m in known], color="black", linewidth=2.2, marker="o", label="mean")
        axis.axhline(0.0, color="grey", linewidth=0.6)
        slope = summary[task].get("steerability")
        anti = summary[task].get("anti_steerable_fraction")
        title = f"{task}\nsteerability {slope:.3g}" if slope is not None else task
        if anti is not None:
            title += f", anti-steerable {anti:.0%}"
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("scale")
        axis.set_ylabel("log p(matching) - log p(not matching)")
        axis.legend(loc="best", fontsize=8)
    return _save(figure, path)


def plot_capability(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Each metric's retention (relative to scale 0) against scale, or its value when there is no
    scale 0; the metrics of pairwise tasks only when no other task has one. ``None`` when there is no
    metric."""
    behaviour = set(_behaviour_tasks(summary))
    chosen = {t: s for t, s in summary.items() if t not in behaviour and s.get("capability")} or summary
    figure, axis = plt.subplots(figsize=(6, 4))
    drawn = False
    relative = False
    for task, task_summary in chosen.items():
        for name, entry in (task_summary.get("capability") or {}).items():
            values = entry["retention"] if any(v is not None for v in entry["retention"]) else entry["values"]
            relative = relative or values is entry["retention"]
            known = [(s, v) for s, v in zip(task_summary["scales"], values) if v is not None]
            if known:
                axis.plot([s for s, _ in known], [v for _, v in known], marker="o", label=f"{task} {name}")
                drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axis.set_xlabel("scale")
    axis.set_ylabel("relative to scale 0 (1 = unchanged)" if relative else "value")
    axis.set_title("capability vs scale", fontsize=10)
    axis.legend(loc="best", fontsize=7)
    return _save(figure, path)


def plot_layers(layers: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Mean propensity of the first pairwise task as a layer x scale heatmap, beside the steerability
    of each layer. ``None`` when no layer has propensities."""
    names = list(layers)
    tasks = [t for t in (next(iter(layers.values()), {}) or {}) if "mean_propensity" in layers[names[0]][t]]
    if not tasks:
        return None
    task = tasks[0]
    scales = layers[names[0]][task]["scales"]
    grid = [[float("nan") if v is None else v for v in layers[name][task]["mean_propensity"]] for name in names]
    figure, (heat, bars) = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 2.5))
    image = heat.imshow(grid, aspect="auto", cmap="coolwarm", origin="lower")
    heat.set_xticks(range(len(scales)), [f"{s:g}" for s in scales])
    heat.set_yticks(range(len(names)), names, fontsize=7)
    heat.set_xlabel("scale")
    heat.set_title(f"{task}: mean propensity", fontsize=10)
    figure.colorbar(image, ax=heat)
    slopes = [layers[name][task].get("steerability") or 0.0 for name in names]
    bars.barh(range(len(names)), slopes, color="tab:blue")
    bars.set_yticks(range(len(names)), names, fontsize=7)
    bars.set_xlabel("steerability (slope)")
    bars.set_title("steerability per layer", fontsize=10)
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
