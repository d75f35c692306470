"""report.md and the results folder's checks, on hand-made sweep data (no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tdsteer_eval.analysis import ItemRow, MetricRow, retention, summarize
from tdsteer_eval.report import write_report
from tdsteer_eval.results import SweepFolderError, check_output

SCALES = [-1.0, 0.0, 1.0]
HIGHER = {"tdsteer_caa_ab": {"acc": True}, "tdsteer_perplexity": {"word_perplexity": False}}


def _rows(behaviour_acc: list[float], perplexity: list[float]) -> tuple[list[ItemRow], list[MetricRow]]:
    items = [
        ItemRow(task="tdsteer_caa_ab", doc_id=doc, scale=scale, propensity=scale + doc)
        for doc in (0, 1)
        for scale in SCALES
    ]
    metrics = [
        MetricRow(task=task, metric=name, filter="none", scale=scale, value=value, stderr=None)
        for task, name, values in (
            ("tdsteer_caa_ab", "acc", behaviour_acc),
            ("tdsteer_perplexity", "word_perplexity", perplexity),
        )
        for scale, value in zip(SCALES, values, strict=True)
    ]
    return items, metrics


def _provenance(vector: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "vector": vector, "sites": ["h.0"], "scales": SCALES, "tasks": list(HIGHER), "date": "d"}


def test_retention_of_a_zero_value_is_zero_where_higher_is_better() -> None:
    assert retention(0.0, 0.5, True) == 0.0
    assert retention(0.0, 0.5, None) == 0.0
    assert retention(0.0, 2.0, False) is None  # lower is better: 0 perplexity has no finite ratio
    assert retention(0.3, 0.0, True) is None
    items, metrics = _rows([0.0, 0.5, 1.0], [6.0, 5.0, 5.0])
    entry = summarize(items, metrics, SCALES, HIGHER)["tdsteer_caa_ab"]["capability"]["acc,none"]
    assert entry["retention"] == [0.0, 1.0, 2.0]


def test_behaviour_metrics_are_not_reported_as_capability(tmp_path: Path) -> None:
    items, metrics = _rows([0.0, 0.5, 1.0], [6.0, 5.0, 5.0])
    vector = {"sites": ["h.0"], "metadata": {"method": "mean_diff"}, "file": "vector.safetensors"}
    data = {"provenance": _provenance(vector), "summary": summarize(items, metrics, SCALES, HIGHER), "items": items}
    text = write_report(tmp_path, data).read_text()
    behaviour, capability = text.split("## Capability")
    assert "| tdsteer_caa_ab | acc,none | 0 | 0.5 | 1 |" in behaviour
    assert "tdsteer_caa_ab" not in capability  # no "capability doubling" of the behaviour rate
    assert "| tdsteer_perplexity | word_perplexity,none | 6 (0.8333) | 5 (1) | 5 (1) |" in capability
    assert "| vector | vector.safetensors (in this folder) |" in text
    assert "| vector method | mean_diff |" in text


def test_layer_sweep_report_names_the_method_and_nests_its_headings(tmp_path: Path) -> None:
    items, metrics = _rows([0.0, 0.5, 1.0], [6.0, 5.0, 5.0])
    layers = {
        key: summarize([{**row, "layer": key} for row in items], metrics, SCALES, HIGHER)  # type: ignore[misc]
        for key in ("h.0", "h.1")
    }
    vector = {"pairs": "/data/pairs.jsonl", "kind": "resid_post", "method": "mean_diff", "read": "last"}
    data = {"provenance": _provenance(vector), "summary": {"layers": layers, "best_layer": None}, "items": items}
    lines = write_report(tmp_path, data).read_text().splitlines()
    assert "| vector method | mean_diff |" in lines
    assert "| vector | one per layer, fitted on /data/pairs.jsonl |" in lines
    headings = [line for line in lines if line.startswith("#")]
    assert headings == [
        "# Steering sweep",
        "## Layers",
        *[h for key in ("h.0", "h.1") for h in (f"### {key}", "#### Behaviour", "#### Capability")],
    ]


def _folder(tmp_path: Path, provenance: dict[str, Any]) -> Path:
    folder = tmp_path / "sweep"
    folder.mkdir()
    data = {"format": "tdsteer_eval.sweep", "provenance": provenance}
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def test_a_vector_extracted_again_resumes_and_other_settings_name_o(tmp_path: Path) -> None:
    vector = {"sites": ["h.0"], "metadata": {"method": "mean_diff", "created": "2026-01-01T00:00:00+00:00"}}
    folder = _folder(tmp_path, {**_provenance(vector), "demo": {"limit": 60, "scales": SCALES}})
    again = {"sites": ["h.0"], "metadata": {"method": "mean_diff", "created": "2026-02-02T00:00:00+00:00"}}
    assert check_output(folder, {**_provenance(again), "date": "e", "demo": {"limit": 60, "scales": SCALES}})
    other = {"sites": ["h.0"], "metadata": {"method": "pca", "created": "2026-02-02T00:00:00+00:00"}}
    with pytest.raises(SweepFolderError, match=r"other settings \(vector\.metadata\).*-o DIR"):
        check_output(folder, {**_provenance(other), "demo": {"limit": 60, "scales": SCALES}})
    # before any work, the settings known so far
    assert check_output(folder, {"demo": {"limit": 60, "scales": SCALES}}, partial=True)
    with pytest.raises(SweepFolderError, match=r"other settings \(demo\.limit\); give another folder \(-o DIR\)"):
        check_output(folder, {"demo": {"limit": 24, "scales": SCALES}}, partial=True)
