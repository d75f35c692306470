"""run_sweep: per-item propensities, steerability, the results folder, and resuming a stopped sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lm_eval
import numpy as np
import pytest

from tdsteer_eval import EvalOptions, SteeredLM, run_sweep, summarize, task_manager
from tdsteer_eval.results import SweepFolderError

SCALES = [-4.0, -2.0, 0.0, 2.0, 4.0]
TASKS = ["tdsteer_caa_ab", "tdsteer_perplexity"]
OPTIONS = EvalOptions(limit=3)


@pytest.fixture(scope="module")
def lm(tiny: Any) -> SteeredLM:
    return SteeredLM(
        pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, positions="continuation", batch_size=4
    )


@pytest.fixture(scope="module")
def manager() -> Any:
    return task_manager(TASKS)


@pytest.fixture(scope="module")
def uninterrupted(lm: SteeredLM, manager: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("sweep") / "whole"
    lines: list[str] = []
    data = run_sweep(lm, TASKS, SCALES, folder, manager=manager, options=OPTIONS, progress=lines.append)
    assert len(lines) == len(SCALES) and lines[0].startswith("[1/5] scale -4:")  # one line per scale
    return folder, data


def _without_date(data: dict[str, Any]) -> dict[str, Any]:
    copied = json.loads(json.dumps(data))
    del copied["provenance"]["date"]
    return copied


def test_steerability_is_a_least_squares_fit_of_the_logged_propensities(uninterrupted: Any) -> None:
    folder, data = uninterrupted
    stored = json.loads((folder / "results.json").read_text())
    items = [row for row in stored["items"] if row["task"] == "tdsteer_caa_ab"]
    assert set(items[0]) == {"task", "doc_id", "scale", "propensity"} and len(items) == 3 * len(SCALES)
    means = [np.mean([r["propensity"] for r in items if r["scale"] == s]) for s in SCALES]
    summary = stored["summary"]["tdsteer_caa_ab"]
    assert summary["steerability"] == pytest.approx(np.polyfit(SCALES, means, 1)[0], rel=1e-9, abs=1e-12)
    slopes = {}
    for doc in {r["doc_id"] for r in items}:
        points = sorted((r["scale"], r["propensity"]) for r in items if r["doc_id"] == doc)
        slopes[str(doc)] = np.polyfit([s for s, _ in points], [p for _, p in points], 1)[0]
    assert summary["item_slopes"] == pytest.approx(slopes, rel=1e-9, abs=1e-12)
    assert summary["anti_steerable_fraction"] == sum(s < 0 for s in slopes.values()) / len(slopes)
    assert summary["mean_propensity"] == pytest.approx(means)
    # capability retention: each metric relative to scale 0 (lower-is-better metrics inverted)
    perplexity = stored["summary"]["tdsteer_perplexity"]["capability"]["word_perplexity,none"]
    at_zero = perplexity["values"][SCALES.index(0.0)]
    assert perplexity["retention"] == pytest.approx([at_zero / v for v in perplexity["values"]])
    assert "mean_propensity" not in stored["summary"]["tdsteer_perplexity"]


def test_the_folder_holds_provenance_csv_plots_and_a_report(uninterrupted: Any, tiny: Any) -> None:
    folder, data = uninterrupted
    provenance = data["provenance"]
    assert provenance["scales"] == SCALES and provenance["positions"] == "continuation"
    assert provenance["sites"] == tiny.vector.keys() and provenance["operator"] == "add"
    assert provenance["vector"]["metadata"]["method"] == "random" and provenance["versions"]["lm-eval"]
    assert provenance["date"].startswith("20")
    assert (folder / "metrics.csv").read_text().splitlines()[0] == "scale,task,metric,filter,value,stderr"
    assert len((folder / "items.csv").read_text().splitlines()) == 1 + 3 * len(SCALES)
    for name in ("behaviour.png", "capability.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    report = (folder / "report.md").read_text()
    assert "![propensity vs scale" in report and "steerability" in report and "capability.png" in report


def test_a_stopped_sweep_resumes_to_the_same_results(
    uninterrupted: Any, lm: SteeredLM, manager: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    evaluate = lm_eval.simple_evaluate

    def stop_at_the_third(*args: Any, **kwargs: Any) -> Any:
        calls.append(lm.scale)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while evaluating the third scale
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", stop_at_the_third)
    folder = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(lm, TASKS, SCALES, folder, manager=manager, options=OPTIONS, progress=None)
    kept = json.loads((folder / "results.json").read_text())
    assert kept["completed"] == [[None, -4.0], [None, -2.0]] and not (folder / "report.md").exists()
    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    lines: list[str] = []
    resumed = run_sweep(lm, TASKS, SCALES, folder, manager=manager, options=OPTIONS, progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["[3/5] scale 0", "[4/5] scale 2", "[5/5] scale 4"]
    whole = json.loads((uninterrupted[0] / "results.json").read_text())
    stored = json.loads((folder / "results.json").read_text())
    assert _without_date(stored) == _without_date(whole)
    assert stored["provenance"]["date"] == kept["provenance"]["date"]  # the sweep's start, kept on resume
    assert _without_date(resumed) == _without_date(whole)


def test_a_folder_with_other_settings_or_a_file_is_refused(uninterrupted: Any, lm: SteeredLM, manager: Any) -> None:
    folder, _ = uninterrupted
    with pytest.raises(SweepFolderError, match=r"other settings \(scales\)"):
        run_sweep(lm, TASKS, [0.0, 1.0], folder, manager=manager, options=OPTIONS, progress=None)
    with pytest.raises(SweepFolderError, match="is a file"):
        run_sweep(lm, TASKS, SCALES, folder / "results.json", manager=manager, options=OPTIONS, progress=None)


def test_summaries_without_scale_zero_or_with_one_scale() -> None:
    rows = [{"task": "t", "doc_id": 0, "scale": 1.0, "propensity": 0.5}]
    summary = summarize(rows, [], [1.0])["t"]  # type: ignore[arg-type]
    assert summary["steerability"] is None and summary["anti_steerable_fraction"] is None
    metrics = [{"task": "t", "metric": "acc", "filter": "none", "scale": 1.0, "value": 0.5, "stderr": None}]
    capability = summarize([], metrics, [1.0, 2.0])["t"]["capability"]["acc,none"]  # type: ignore[arg-type]
    assert capability["values"] == [0.5, None] and capability["retention"] == [None, None]
    assert not math.isnan(summary["mean_propensity"][0])
