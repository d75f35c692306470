"""Per-item propensity, steerability and capability retention, from lm-eval's logged samples.

For an A/B (pairwise) item the *propensity* is ``log p(matching answer) - log p(non-matching
answer)``: lm-eval's loglikelihood of the target choice minus that of the other one. Over a sweep of
scales, a task's *steerability* is the least-squares slope of its mean propensity against the scale
(Tan et al. 2024, "Analyzing the generalization and reliability of steering vectors"); each item has
its own slope, and the items whose slope is negative are *anti-steerable*. *Capability retention*
is each metric at a scale relative to its value at scale 0 (``1.0``: unchanged; below 1: worse,
whichever direction the metric improves in).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict


class ItemRow(TypedDict):
    """The propensity of one item of one task at one scale."""

    task: str
    doc_id: int
    scale: float
    propensity: float


class MetricRow(TypedDict):
    """One metric of one task at one scale."""

    task: str
    metric: str
    filter: str
    scale: float
    value: float
    stderr: float | None


def _loglikelihood(response: Any) -> float | None:
    """The loglikelihood of one multiple-choice response (``(ll, is_greedy)``, possibly wrapped once)."""
    if isinstance(response, (list, tuple)) and len(response) == 1 and isinstance(response[0], (list, tuple)):
        response = response[0]
    if isinstance(response, (list, tuple)) and response and isinstance(response[0], (int, float)):
        return float(response[0])
    return None


def item_propensities(task: str, samples: Iterable[Mapping[str, Any]], scale: float) -> list[ItemRow]:
    """Per-item propensities of a pairwise task from lm-eval's samples (``log_samples=True``).

    Args:
        task: The task name.
        samples: ``results["samples"][task]``.
        scale: The scale the samples were scored at.

    Returns:
        One row per document, in sample order; ``[]`` when the task is not pairwise (its documents do
        not all have exactly two scored choices and an integer target).

    Examples:
        >>> sample = {"doc_id": 3, "target": 0, "filtered_resps": [(-1.0, False), (-2.5, False)]}
        >>> item_propensities("t", [sample], 2.0)
        [{'task': 't', 'doc_id': 3, 'scale': 2.0, 'propensity': 1.5}]
    """
    rows: list[ItemRow] = []
    for sample in samples:
        responses = sample.get("filtered_resps", sample.get("resps"))
        target = sample.get("target")
        if not isinstance(responses, (list, tuple)) or len(responses) != 2:
            return []
        if isinstance(target, bool) or not isinstance(target, int) or target not in (0, 1):
            return []
        values = [_loglikelihood(r) for r in responses]
        if values[0] is None or values[1] is None:
            return []
        propensity = values[target] - values[1 - target]  # type: ignore[operator]
        rows.append(ItemRow(task=task, doc_id=int(sample["doc_id"]), scale=float(scale), propensity=propensity))
    return rows


def metric_rows(results: Mapping[str, Any], scale: float) -> list[MetricRow]:
    """The numeric metrics of ``lm_eval.simple_evaluate``'s results at one scale.

    Examples:
        >>> metric_rows({"results": {"t": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}, 0.0)
        [{'task': 't', 'metric': 'acc', 'filter': 'none', 'scale': 0.0, 'value': 0.5, 'stderr': 0.1}]
    """
    rows: list[MetricRow] = []
    for task, metrics in results.get("results", {}).items():
        for key, raw in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not _is_number(raw):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                MetricRow(
                    task=task,
                    metric=metric,
                    filter=filter_name,
                    scale=float(scale),
                    value=float(raw),
                    stderr=float(stderr) if _is_number(stderr) else None,
                )
            )
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the least-squares line through ``(xs, ys)``; ``None`` with fewer than two distinct ``xs``.

    Examples:
        >>> least_squares_slope([-1, 0, 1], [-2.0, 0.5, 2.0])
        2.0
    """
    if len(xs) != len(ys) or len(set(xs)) < 2:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def retention(value: float, baseline: float | None, higher_is_better: bool | None) -> float | None:
    """``value`` relative to ``baseline`` (scale 0): ``value / baseline`` for a metric where higher is
    better, ``baseline / value`` where lower is (perplexity), so that below 1 is always worse.
    ``None`` without a baseline, with a baseline of 0, and for a lower-is-better value of 0.

    Examples:
        >>> retention(0.4, 0.5, True), retention(20.0, 10.0, False), retention(0.0, 0.5, True)
        (0.8, 0.5, 0.0)
    """
    if baseline is None or baseline == 0:
        return None
    if higher_is_better is False:
        return None if value == 0 else baseline / value
    return value / baseline


def summarize(
    items: Sequence[ItemRow],
    metrics: Sequence[MetricRow],
    scales: Sequence[float],
    higher_is_better: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per task: the mean-propensity curve, steerability, per-item slopes, the anti-steerable fraction
    and the capability retention of each metric.

    Args:
        items: Per-item propensities of every scale.
        metrics: Metrics of every scale.
        scales: The scales, in sweep order (the curves follow it; missing scales give ``None``).
        higher_is_better: lm-eval's ``results["higher_is_better"]``: ``{task: {metric: bool}}``.

    Returns:
        ``{task: summary}``; a summary has ``scales``, and for pairwise tasks ``items``,
        ``mean_propensity``, ``steerability``, ``item_slopes`` (``{doc_id: slope}``) and
        ``anti_steerable_fraction``; ``capability`` maps ``"metric,filter"`` to its ``values`` and
        ``retention`` per scale.

    Examples:
        >>> rows = [ItemRow(task="t", doc_id=d, scale=s, propensity=p)
        ...         for d, k in ((0, 1.0), (1, -0.5)) for s, p in ((-1.0, -k), (1.0, k))]
        >>> summary = summarize(rows, [], [-1.0, 1.0])["t"]
        >>> summary["steerability"], summary["anti_steerable_fraction"]
        (0.25, 0.5)
    """
    summaries: dict[str, dict[str, Any]] = defaultdict(lambda: {"scales": [float(s) for s in scales]})
    by_task: dict[str, list[ItemRow]] = defaultdict(list)
    for row in items:
        by_task[row["task"]].append(row)
    for task, rows in by_task.items():
        summaries[task].update(_behaviour(rows, scales))
    grouped: dict[tuple[str, str, str], dict[float, float]] = defaultdict(dict)
    for entry in metrics:
        grouped[(entry["task"], entry["metric"], entry["filter"])][entry["scale"]] = entry["value"]
    for (task, name, filter_name), values in grouped.items():
        better = (higher_is_better or {}).get(task, {}).get(name)
        baseline = values.get(0.0)
        curve = [values.get(float(s)) for s in scales]
        summaries[task].setdefault("capability", {})[f"{name},{filter_name}"] = {
            "values": curve,
            "retention": [None if v is None else retention(v, baseline, better) for v in curve],
            "higher_is_better": better,
        }
    return dict(summaries)


def _behaviour(rows: Sequence[ItemRow], scales: Sequence[float]) -> dict[str, Any]:
    per_scale: dict[float, list[float]] = defaultdict(list)
    per_item: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        per_scale[row["scale"]].append(row["propensity"])
        per_item[row["doc_id"]].append((row["scale"], row["propensity"]))
    curve = [sum(v) / len(v) if (v := per_scale.get(float(s))) else None for s in scales]
    known = [(float(s), m) for s, m in zip(scales, curve) if m is not None]
    slopes = {
        str(doc): least_squares_slope([s for s, _ in points], [p for _, p in points])
        for doc, points in sorted(per_item.items())
    }
    fitted = [slope for slope in slopes.values() if slope is not None]
    return {
        "items": len(per_item),
        "mean_propensity": curve,
        "steerability": least_squares_slope([s for s, _ in known], [m for _, m in known]),
        "item_slopes": slopes,
        "anti_steerable_fraction": sum(slope < 0 for slope in fitted) / len(fitted) if fitted else None,
    }
