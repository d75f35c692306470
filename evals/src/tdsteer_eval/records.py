"""The in-memory sweep: lm-eval tasks on a steered model at several multipliers, as records."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import lm_eval
from lm_eval.api.model import LM

from tdsteer_eval.runner import environment_once, task_manager


class SweepRecord(TypedDict):
    """One metric of one task at one multiplier."""

    multiplier: float
    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None


PathLike = str | os.PathLike[str]
# An lm_eval LM with a ``scale`` (SteeredLM), or a factory ``fn(multiplier) -> LM``. (lm-eval is untyped.)
LMOrFactory = Any


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def records_from_results(results: dict[str, Any], multiplier: float) -> list[SweepRecord]:
    """Flatten the ``results`` of ``lm_eval.simple_evaluate`` into :class:`SweepRecord` rows.

    Args:
        results: What ``simple_evaluate`` returned (its ``"results"`` entry is read).
        multiplier: The multiplier the run used.

    Returns:
        One record per task, metric and filter (``"acc,none"`` gives ``metric="acc"``, ``filter="none"``),
        with the standard error when lm-eval computed one.

    Examples:
        >>> rows = records_from_results({"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1}}}, 2.0)
        >>> rows[0]["metric"], rows[0]["value"], rows[0]["stderr"]
        ('acc', 0.5, 0.1)
    """
    records: list[SweepRecord] = []
    for task, metrics in results.get("results", {}).items():
        for key, raw in metrics.items():
            if "," not in key:
                continue  # alias, name, sample_len...
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            value = _as_float(raw)
            if value is None:
                continue
            stderr = _as_float(metrics.get(f"{metric}_stderr,{filter_name}"))
            records.append(
                SweepRecord(
                    multiplier=float(multiplier),
                    task=task,
                    metric=metric,
                    filter=filter_name,
                    value=value,
                    stderr=stderr,
                )
            )
    return records


def sweep(
    lm: LMOrFactory,
    tasks: str | Sequence[str],
    multipliers: Sequence[float],
    *,
    include_path: PathLike | Sequence[PathLike] | None = None,
    include_defaults: bool | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    **evaluate_kwargs: Any,
) -> list[SweepRecord]:
    """Evaluate lm-eval tasks at each multiplier of a steering vector.

    Args:
        lm: A :class:`tdsteer_eval.SteeredLM` (its ``scale`` is set to each multiplier in turn and
            restored afterwards), or a factory ``fn(multiplier) -> lm_eval LM``.
        tasks: Task names (a list, or one comma-separated string).
        multipliers: The scales to evaluate, in order (include ``0`` for the unsteered baseline).
        include_path: Folder(s) of local task YAMLs (see :func:`tdsteer_eval.write_multiple_choice_task`);
            the tasks shipped with tdsteer-eval are always included.
        include_defaults: Also load lm-eval's own task catalogue. ``None``: only when a task is not
            found in the include paths (loading the catalogue takes seconds).
        limit: At most this many documents per task (a fraction if below 1), as in lm-eval.
        num_fewshot: Few-shot examples per prompt, as in lm-eval.
        log_samples: Keep per-sample outputs in lm-eval (not returned here; off by default).
        **evaluate_kwargs: Passed to ``lm_eval.simple_evaluate`` (``bootstrap_iters``, ``random_seed``...).

    Returns:
        One :class:`SweepRecord` ``{multiplier, task, metric, filter, value, stderr}`` per multiplier,
        task and metric, in the order of ``multipliers``. (:func:`tdsteer_eval.run_sweep` also keeps
        per-item propensities, summaries and plots in a results folder.)

    Raises:
        TypeError: ``lm`` is neither a model with a ``scale`` nor a factory.
        ValueError: No tasks or no multipliers, or a multiplier is not finite.

    Examples:
        >>> from tdsteer_eval import SteeredLM, sweep, write_demo_task  # doctest: +SKIP
        >>> folder = write_demo_task("tasks").parent  # doctest: +SKIP
        >>> lm = SteeredLM(pretrained="gpt2", vector="vec.safetensors", device="cpu")  # doctest: +SKIP
        >>> rows = sweep(lm, "tdsteer_demo_mc", [-4, 0, 4], include_path=folder)  # doctest: +SKIP
    """
    task_names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    task_names = [t for t in task_names if t]
    if not task_names:
        raise ValueError("sweep needs at least one task name")
    values = [float(m) for m in multipliers]
    if not values:
        raise ValueError("sweep needs at least one multiplier")
    if not all(math.isfinite(m) for m in values):
        raise ValueError(f"multipliers must be finite, got {values}")

    if isinstance(lm, LM):
        if not hasattr(lm, "scale"):
            raise TypeError(
                f"{type(lm).__name__} has no 'scale' to sweep: pass a tdsteer_eval.SteeredLM, "
                "or a factory fn(multiplier) -> LM"
            )
        model: LM | None = lm
        factory: Callable[[float], LM] | None = None
    elif callable(lm):
        model, factory = None, lm
    else:
        raise TypeError(f"lm must be a SteeredLM or a factory fn(multiplier) -> LM, got {type(lm).__name__}")

    manager = task_manager(task_names, include_path, include_defaults=include_defaults)
    records: list[SweepRecord] = []
    original = getattr(model, "scale", None)
    with environment_once():
        try:
            for multiplier in values:
                if model is not None:
                    model.scale = multiplier  # type: ignore[attr-defined]
                    current = model
                else:
                    assert factory is not None
                    current = factory(multiplier)
                results = lm_eval.simple_evaluate(
                    model=current,
                    tasks=task_names,
                    task_manager=manager,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    log_samples=log_samples,
                    **evaluate_kwargs,
                )
                if results is None:  # non-zero ranks of a distributed run
                    continue
                records.extend(records_from_results(results, multiplier))
        finally:
            if model is not None and original is not None:
                model.scale = original  # type: ignore[attr-defined]
    return records
