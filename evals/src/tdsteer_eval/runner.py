"""A sweep into a results folder: every scale (and layer) evaluated once, the folder updated after each.

:func:`run_sweep` evaluates lm-eval tasks on a :class:`~tdsteer_eval.SteeredLM` at each scale, logs
per-item propensities, and writes ``results.json``, CSV files, plots and ``report.md`` (see
:mod:`tdsteer_eval.results`). A sweep that stops keeps its finished scales; running it again into
the same folder with the same settings finishes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import lm_eval
import lm_eval.evaluator
from lm_eval.loggers.utils import get_commit_from_path
from lm_eval.tasks import TaskManager

from tdsteer import SteeringVector
from tdsteer.model_facts import model_name_of
from tdsteer_eval.analysis import item_propensities, metric_rows
from tdsteer_eval.report import write_report
from tdsteer_eval.results import Run, SweepFolder
from tdsteer_eval.task_data import include_paths
from tdsteer_eval.vectors import describe_condition, describe_vector

VERSIONED = ("tdsteer", "tdsteer-hf", "tdsteer-eval", "lm-eval", "torch", "transformers")


@dataclass(frozen=True)
class EvalOptions:
    """How lm-eval runs each evaluation of a sweep (lm-eval's own option names).

    Args:
        limit: At most this many documents per task (a fraction if below 1).
        num_fewshot: Few-shot examples per prompt.
        apply_chat_template: Format prompts with the tokenizer's chat template (or the named one).
        gen_kwargs: Generation arguments, ``"temperature=0,max_gen_toks=64"`` or a dict.
        seed: One seed for Python, numpy, torch and the few-shot sampler (lm-eval's defaults when ``None``).
        log_samples: Also write lm-eval's per-sample records under ``samples/`` (propensities are
            computed from them either way).
        extra: Other keywords of ``lm_eval.simple_evaluate`` (``bootstrap_iters``...).

    Examples:
        >>> kwargs = EvalOptions(limit=10, seed=1).evaluate_kwargs()
        >>> kwargs["limit"], kwargs["random_seed"], kwargs["fewshot_random_seed"], kwargs["log_samples"]
        (10, 1, 1, True)
    """

    limit: int | float | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool | str = False
    gen_kwargs: str | dict[str, Any] | None = None
    seed: int | None = None
    log_samples: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The keywords of ``lm_eval.simple_evaluate``."""
        kwargs: dict[str, Any] = {
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "apply_chat_template": self.apply_chat_template,
            "gen_kwargs": self.gen_kwargs,
            "log_samples": True,
            **self.extra,
        }
        if self.seed is not None:
            kwargs.update(
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        return kwargs


def task_manager(
    tasks: Sequence[str],
    include_path: Any = None,
    *,
    include_defaults: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> TaskManager:
    """An lm-eval ``TaskManager`` that knows ``tasks``: the shipped tasks, ``include_path``, and
    lm-eval's own catalogue when needed.

    Args:
        tasks: Task names that must exist.
        include_path: Folder(s) of task YAMLs (after the shipped ones).
        include_defaults: Load lm-eval's catalogue (slow: seconds). ``None``: only when a task is
            not found in the include paths.
        metadata: Task metadata (the shipped tasks read their data files from it).

    Returns:
        The task manager.

    Raises:
        ValueError: An include folder is missing, or a task is unknown (the message lists where it
            was looked for).

    Examples:
        >>> manager = task_manager(["tdsteer_caa_ab", "tdsteer_perplexity"], include_defaults=False)
        >>> "tdsteer_mwe" in manager.all_tasks
        True
    """
    paths = include_paths(include_path)
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise ValueError(f"include path {missing} is not a folder")
    meta = dict(metadata or {})
    manager = TaskManager(include_path=paths, include_defaults=bool(include_defaults), metadata=meta)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown and include_defaults is None:
        manager = TaskManager(include_path=paths, include_defaults=True, metadata=meta)
        unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = "the shipped tasks" + (f", {paths[1:]}" if len(paths) > 1 else "")
        where += ", or lm-eval's catalogue" if include_defaults is not False else ""
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not found in {where}")
    return manager


def git_commit_hash() -> str | None:
    """lm-eval's ``git_hash`` of a result, as ``lm_eval.loggers.utils.get_git_commit_hash`` finds it
    (``git describe --always`` in the working directory, else the ``.git`` folder there), without
    git's ``fatal: not a git repository`` on stderr outside a repository."""
    try:
        described = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)  # noqa: S607
        return described.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def quiet_git() -> Iterator[None]:
    """lm-eval's evaluations record the git hash of the working directory with :func:`git_commit_hash`
    (the same value, git's complaint outside a repository kept off stderr)."""
    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


@contextmanager
def environment_once() -> Iterator[None]:
    """Collect lm-eval's environment report once for all the evaluations of a sweep.

    ``simple_evaluate`` adds it to every result by running ``torch.utils.collect_env`` (``pip list``
    and other subprocesses: about a second each time, most of a small evaluation); within one
    sweep it cannot change. The git hash is read quietly (:func:`quiet_git`).
    """
    original = lm_eval.evaluator.add_env_info
    collected: dict[str, Any] = {}

    def add_env_info(storage: dict[str, Any]) -> None:
        if not collected:
            original(collected)
        storage.update(collected)

    lm_eval.evaluator.add_env_info = add_env_info
    try:
        with quiet_git():
            yield
    finally:
        lm_eval.evaluator.add_env_info = original


def versions() -> dict[str, str | None]:
    """The versions of the packages a result depends on."""
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            found[name] = None
    return found


def provenance_of(lm: Any, tasks: Sequence[str], scales: Sequence[float], options: EvalOptions) -> dict[str, Any]:
    """What a sweep records about where its numbers come from (``date`` is compared apart on resume)."""
    source = getattr(lm, "vector_source", None)
    vector: SteeringVector = lm.vector
    return {
        "model": getattr(lm, "model_name", None) or model_name_of(lm.model),
        "vector": describe_vector(source if source is not None else vector, vector),
        "sites": vector.keys(),
        "operator": lm.operator if isinstance(lm.operator, str) else type(lm.operator).__name__,
        "positions": lm.positions,
        "condition": describe_condition(getattr(lm, "condition_source", None), getattr(lm, "condition", None)),
        "scales": [float(s) for s in scales],
        "tasks": list(tasks),
        "options": {k: v for k, v in asdict(options).items() if k != "log_samples"},
        "versions": versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_sweep(
    lm: Any,
    tasks: Sequence[str],
    scales: Sequence[float],
    output: str | os.PathLike[str],
    *,
    manager: TaskManager,
    options: EvalOptions | None = None,
    layers: Mapping[str, SteeringVector] | None = None,
    provenance: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Evaluate ``tasks`` at every scale (for every layer's vector) and keep the results in ``output``.

    Args:
        lm: A :class:`~tdsteer_eval.SteeredLM`; its scale (and vector) are set per run and restored.
        tasks: lm-eval task names (see :func:`task_manager`).
        scales: The scales, in order (include ``0``: the baseline of capability retention).
        output: The results folder (created; a folder of the same sweep is resumed).
        manager: The task manager that knows ``tasks``.
        options: How lm-eval runs.
        layers: For a layer sweep: site key -> the vector fitted at that layer.
        provenance: Entries that replace or add to the recorded provenance.
        progress: Called with one line per finished run (``None``: silent).

    Returns:
        What ``results.json`` holds.

    Raises:
        SweepFolderError: ``output`` is a file, a foreign folder, or a sweep with other settings.

    Examples:
        >>> lm = SteeredLM(pretrained="gpt2", vector="refusal.safetensors", positions="continuation")  # doctest: +SKIP
        >>> tasks = ["tdsteer_caa_ab", "tdsteer_perplexity"]
        >>> data = run_sweep(lm, tasks, [-4, 0, 4], "runs/refusal", manager=task_manager(tasks))  # doctest: +SKIP
        >>> data["summary"]["tdsteer_caa_ab"]["steerability"]  # doctest: +SKIP
        0.31
    """
    options = options or EvalOptions()
    runs: list[Run] = [(layer, float(scale)) for layer in (layers or [None]) for scale in scales]
    recorded = {**provenance_of(lm, tasks, scales, options), **(provenance or {})}
    folder = SweepFolder(output, recorded, runs)
    leader = getattr(lm, "rank", 0) == 0
    original = (lm.scale, lm.vector)
    with environment_once():
        try:
            for number, run in enumerate(runs, 1):
                if not folder.done(run):
                    _evaluate_run(lm, run, (number, len(runs)), tasks, manager, options, folder, layers, progress)
        finally:
            lm.scale, lm.vector = original
    data = folder.data()
    if leader:
        folder.write()
        write_report(folder.path, data)
    return data


def _evaluate_run(
    lm: Any,
    run: Run,
    position: tuple[int, int],
    tasks: Sequence[str],
    manager: TaskManager,
    options: EvalOptions,
    folder: SweepFolder,
    layers: Mapping[str, SteeringVector] | None,
    progress: Callable[[str], None] | None,
) -> None:
    """Evaluate one (layer, scale) and record it in the folder (rank 0 of a distributed run)."""
    layer, scale = run
    if layers is not None and layer is not None:
        lm.vector = layers[layer]
    lm.scale = scale
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, **options.evaluate_kwargs())
    if results is None:  # a non-zero rank of a distributed run: rank 0 writes
        return
    samples = results.get("samples", {})
    items = [row for task in tasks for row in item_propensities(task, samples.get(task, []), scale)]
    metrics = metric_rows(results, scale)
    folder.add(run, metrics, items, results.get("higher_is_better"))
    if options.log_samples:
        _write_samples(folder.path, run, samples)
    if progress is not None:
        progress(_line(run, *position, metrics, items, time.perf_counter() - started))


def _line(run: Run, number: int, total: int, metrics: Sequence[Any], items: Sequence[Any], seconds: float) -> str:
    layer, scale = run
    parts = []
    for task in dict.fromkeys(m["task"] for m in metrics):
        first = next(m for m in metrics if m["task"] == task)
        text = f"{task} {first['metric']} {first['value']:.4g}"
        values = [i["propensity"] for i in items if i["task"] == task]
        if values:
            text += f", mean propensity {sum(values) / len(values):+.4g}"
        parts.append(text)
    where = f"layer {layer} " if layer is not None else ""
    return f"[{number}/{total}] {where}scale {scale:g}: {'; '.join(parts)} ({seconds:.1f} s)"


def _write_samples(folder: Path, run: Run, samples: Mapping[str, Any]) -> None:
    layer, scale = run
    target = folder / "samples" / ((f"{layer}-" if layer else "") + f"scale_{scale:g}")
    target.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        with open(target / f"{task}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
