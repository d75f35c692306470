"""The tasks shipped with tdsteer-eval: found without lm-eval's catalogue, offline, data path as a parameter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tdsteer_eval import SHIPPED_TASKS, TASKS_DIR, task_manager
from tdsteer_eval.task_data import TaskDataError, check_data_file


def _docs(task: str, manager: Any) -> list[dict[str, Any]]:
    return list(manager.load([task])["tasks"][task].test_docs())


def test_shipped_tasks_load_offline_from_their_samples() -> None:
    manager = task_manager(list(SHIPPED_TASKS), include_defaults=False)
    caa = _docs("tdsteer_caa_ab", manager)
    assert len(caa) == 8 and caa[0]["prompt"].endswith("\n\nAnswer:") and caa[0]["matching"] == " (A)"
    assert caa[1]["matching"] == " (B)" and caa[1]["not_matching"] == " (A)"  # matching is choice 0 either way
    mwe = _docs("tdsteer_mwe", manager)
    assert {doc["matching"] for doc in mwe} == {" Yes", " No"}
    text = _docs("tdsteer_perplexity", manager)
    assert len(text) == 6 and text[0]["text"].startswith("The river")
    assert all((TASKS_DIR / f"{name}.yaml").is_file() for name in SHIPPED_TASKS)


def test_data_path_from_metadata_or_dataset_kwargs(tmp_path: Path) -> None:
    items = [
        {"question": "Q one?", "answer_matching_behavior": "(B)", "answer_not_matching_behavior": ["(A)", "(C)"]},
        {"question": "Q two?\n\nAnswer:", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"},
    ]
    data = tmp_path / "refusal.json"
    data.write_text(json.dumps(items))
    docs = _docs("tdsteer_caa_ab", task_manager(["tdsteer_caa_ab"], metadata={"caa_path": str(data)}))
    assert [d["prompt"] for d in docs] == ["Q one?\n\nAnswer:", "Q two?\n\nAnswer:"]
    assert docs[0]["not_matching"] == " (A)"  # the first of several non-matching answers
    # a task of your own: include the shipped YAML, point dataset_kwargs at your file
    (tmp_path / "mine.yaml").write_text(
        f"include: {TASKS_DIR / 'tdsteer_caa_ab.yaml'}\ntask: my_refusal\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
    )
    mine = _docs("my_refusal", task_manager(["my_refusal"], tmp_path))
    assert [d["matching"] for d in mine] == [" (B)", " (A)"]


def test_bad_data_files_name_the_file_and_record(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="does not exist"):
        check_data_file("tdsteer_mwe", {"mwe_path": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer_matching_behavior": " Yes"}) + "\n")
    with pytest.raises(TaskDataError, match="record 0 needs"):
        check_data_file("tdsteer_mwe", {"mwe_path": str(bad)})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TaskDataError, match="holds no text"):
        check_data_file("tdsteer_perplexity", {"data_files": {"test": str(empty)}})
