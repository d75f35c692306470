"""The results folder of a sweep, written after every finished scale so that a rerun resumes.

``results.json`` holds the provenance (model, vector file and metadata, sites, operator, positions,
scales, versions, date), the finished runs, every metric and per-item propensity, and the per-task
summary (:func:`tdsteer_eval.analysis.summarize`). It is replaced atomically after each scale, with
``metrics.csv`` and ``items.csv``. A rerun into the same folder with the same settings skips the
finished scales; other settings are refused. ``report.md`` and its plots are written at the end.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tdsteer_eval.analysis import ItemRow, MetricRow, summarize

FORMAT = "tdsteer_eval.sweep"
FORMAT_VERSION = 1
RESULTS = "results.json"
CACHE_FOLDER = "activations"  # a layer sweep's activation cache, recorded before the first result
#: Provenance entries that may differ when a sweep resumes (they describe the run, not the results).
UNCOMPARED = ("date",)
#: Entries of the vector's metadata that may differ too: when it was made, not what it is (a vector
#: extracted again from the same model, data, sites, method and read gets a new ``created`` time).
UNCOMPARED_VECTOR_METADATA = ("created",)

Run = tuple[str | None, float]  # (layer site key, or None for one vector; scale)


class SweepFolderError(ValueError):
    """An output folder that cannot hold this sweep: a file, a foreign folder, or other settings."""


def _comparable(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance that must match for a sweep to resume: all but :data:`UNCOMPARED`, and the
    vector's metadata without :data:`UNCOMPARED_VECTOR_METADATA`.

    Examples:
        >>> a = {"date": "monday", "vector": {"metadata": {"method": "mean_diff", "created": "monday"}}}
        >>> b = {"date": "friday", "vector": {"metadata": {"method": "mean_diff", "created": "friday"}}}
        >>> _comparable(a) == _comparable(b)
        True
    """
    kept = {k: v for k, v in provenance.items() if k not in UNCOMPARED}
    vector = kept.get("vector")
    if isinstance(vector, Mapping) and isinstance(vector.get("metadata"), Mapping):
        metadata = {k: v for k, v in vector["metadata"].items() if k not in UNCOMPARED_VECTOR_METADATA}
        kept["vector"] = {**vector, "metadata": metadata}
    return json.loads(json.dumps(kept, default=str))


def check_output(
    path: str | os.PathLike[str], provenance: Mapping[str, Any] | None = None, *, partial: bool = False
) -> Path:
    """Check a results folder before any work: not a file, not a foreign folder, same settings.

    Args:
        path: The folder (created later when missing).
        provenance: The sweep's settings; a folder with ``results.json`` must hold the same ones.
        partial: Compare only the entries ``provenance`` has (a check before the others are known,
            such as a vector's metadata before it is extracted).

    Returns:
        The folder.

    Raises:
        SweepFolderError: The path is a file, a non-empty folder without ``results.json``, or a
            sweep with other settings.

    Examples:
        >>> import pathlib, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> check_output(folder + "/new").name
        'new'
        >>> _ = pathlib.Path(folder, "notes.txt").write_text("mine")
        >>> check_output(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tdsteer_eval.results.SweepFolderError: output folder '...' is not empty and holds no results.json; use a new folder (-o DIR)
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SweepFolderError(f"output {str(path)!r} is a file; give a folder for the results")
    results = folder / RESULTS
    if folder.is_dir() and not results.exists() and any(p.name != CACHE_FOLDER for p in folder.iterdir()):
        raise SweepFolderError(
            f"output folder {str(path)!r} is not empty and holds no {RESULTS}; use a new folder (-o DIR)"
        )
    if results.exists() and provenance is not None:
        stored = _load(results)
        old, new = _comparable(stored.get("provenance", {})), _comparable(provenance)
        if partial:
            old = {k: old.get(k) for k in new}
        if old != new:
            differing = _differing(old, new)
            raise SweepFolderError(
                f"output folder {str(path)!r} holds a sweep with other settings ({', '.join(differing)}); "
                "give another folder (-o DIR) to start a new sweep"
            )
    return folder


def _differing(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The entries that differ, named down to the second level (``demo.scales``, ``vector.metadata``).

    Examples:
        >>> _differing({"scales": [0], "demo": {"limit": 5, "layers": None}}, {"scales": [1], "demo": {"limit": 6}})
        ['demo.limit', 'scales']
    """
    names = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            names += [f"{key}.{sub}" for sub in sorted(a.keys() | b.keys()) if a.get(sub) != b.get(sub)]
        else:
            names.append(key)
    return names


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SweepFolderError(f"{str(path)!r} is not a readable results file: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SweepFolderError(f"{str(path)!r} is not a tdsteer sweep results file")
    return data


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class SweepFolder:
    """A results folder: which runs are done, their rows, and the files written after each run.

    Args:
        path: The folder.
        provenance: The sweep's settings; ``scales`` and (for layer sweeps) ``layers`` give the runs.
        runs: Every ``(layer site key or None, scale)`` of the sweep, in order.

    Raises:
        SweepFolderError: See :func:`check_output`.
    """

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, Any], runs: Sequence[Run]) -> None:
        self.path = check_output(path, provenance)
        self.runs = list(runs)
        self.provenance = dict(provenance)
        self.completed: list[Run] = []
        self.metrics: list[dict[str, Any]] = []  # MetricRow / ItemRow, plus "layer" in a layer sweep
        self.items: list[dict[str, Any]] = []
        self.higher_is_better: dict[str, dict[str, Any]] = {}
        results = self.path / RESULTS
        if results.exists():
            stored = _load(results)
            self.provenance["date"] = stored["provenance"].get("date", self.provenance.get("date"))
            self.completed = [(layer, float(scale)) for layer, scale in stored.get("completed", [])]
            self.metrics = list(stored.get("metrics", []))
            self.items = list(stored.get("items", []))
            self.higher_is_better = dict(stored.get("higher_is_better", {}))

    def done(self, run: Run) -> bool:
        """Whether ``run`` finished in this or an earlier session."""
        return (run[0], float(run[1])) in self.completed

    def add(
        self,
        run: Run,
        metrics: Sequence[MetricRow],
        items: Sequence[ItemRow],
        higher_is_better: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Record a finished run and rewrite ``results.json``, ``metrics.csv`` and ``items.csv``."""
        layer, scale = run
        extra = {} if layer is None else {"layer": layer}
        self.metrics += [{**dict(row), **extra} for row in metrics]
        self.items += [{**dict(row), **extra} for row in items]
        for task, values in (higher_is_better or {}).items():
            self.higher_is_better.setdefault(task, {}).update(values)
        self.completed.append((layer, float(scale)))
        self.write()

    def _order(self, row: Mapping[str, Any]) -> int:
        key = (row.get("layer"), float(row["scale"]))
        return self.runs.index(key) if key in self.runs else len(self.runs)

    def data(self) -> dict[str, Any]:
        """Everything ``results.json`` holds, rows in run order."""
        metrics = sorted(self.metrics, key=self._order)
        items = sorted(self.items, key=self._order)
        completed = sorted(self.completed, key=lambda run: self.runs.index(run) if run in self.runs else 0)
        scales = [float(s) for s in self.provenance.get("scales", [])]
        layers = [layer for layer in dict.fromkeys(layer for layer, _ in self.runs)]
        if layers == [None]:
            summary: dict[str, Any] = summarize(items, metrics, scales, self.higher_is_better)  # type: ignore[arg-type]
        else:
            summary = {
                "layers": {
                    str(layer): summarize(
                        [r for r in items if r.get("layer") == layer],  # type: ignore[misc]
                        [r for r in metrics if r.get("layer") == layer],  # type: ignore[misc]
                        scales,
                        self.higher_is_better,
                    )
                    for layer in layers
                }
            }
            summary["best_layer"] = best_layer(summary["layers"])
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "provenance": self.provenance,
            "completed": [list(run) for run in completed],
            "higher_is_better": self.higher_is_better,
            "metrics": metrics,
            "items": items,
            "summary": summary,
        }

    def write(self) -> dict[str, Any]:
        """Write ``results.json`` and the CSV files (each replaced atomically); return the data."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = self.data()
        _write_atomic(self.path / RESULTS, json.dumps(data, indent=2, default=str) + "\n")
        _write_csv(
            self.path / "metrics.csv",
            data["metrics"],
            ["layer", "scale", "task", "metric", "filter", "value", "stderr"],
        )
        _write_csv(self.path / "items.csv", data["items"], ["layer", "task", "doc_id", "scale", "propensity"])
        return data


def best_layer(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The layer with the highest steerability, averaged over the pairwise tasks, or ``None``.

    Examples:
        >>> best_layer({"h.0": {"t": {"steerability": 0.1}}, "h.1": {"t": {"steerability": 0.4}}})
        {'layer': 'h.1', 'steerability': 0.4}
    """
    scores = {}
    for layer, tasks in layers.items():
        values = [s["steerability"] for s in tasks.values() if s.get("steerability") is not None]
        if values:
            scores[layer] = sum(values) / len(values)
    if not scores:
        return None
    layer = max(scores, key=lambda key: scores[key])
    return {"layer": layer, "steerability": scores[layer]}


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: list[str]) -> None:
    used = [c for c in columns if c != "layer" or any("layer" in row for row in rows)]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=used, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
