"""sweep and the tdsteer-eval command on a local multiple-choice task, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from tdsteer.cli import main as tdsteer_main
from tdsteer_eval import DEMO_TASK, SteeredLM, records_from_results, sweep, write_demo_task, write_multiple_choice_task
from tdsteer_eval.cli import main


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_task(tmp_path_factory.mktemp("tasks")).parent


def test_sweep_one_record_per_multiplier_and_metric(tiny: Any, task_dir: Path) -> None:
    lm = SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, scale=1.5, batch_size=4)
    records = sweep(lm, DEMO_TASK, [-4, 0, 4], include_path=task_dir)
    assert [(r["multiplier"], r["metric"]) for r in records] == [
        (-4.0, "acc"),
        (-4.0, "acc_norm"),
        (0.0, "acc"),
        (0.0, "acc_norm"),
        (4.0, "acc"),
        (4.0, "acc_norm"),
    ]
    assert all(r["task"] == DEMO_TASK and r["filter"] == "none" for r in records)
    assert all(math.isfinite(r["value"]) and 0 <= r["value"] <= 1 for r in records)
    assert all(r["stderr"] is not None and math.isfinite(r["stderr"]) for r in records)
    assert lm.scale == 1.5  # restored

    # multiplier 0 is the unsteered model
    plain = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    baseline = lm_eval.simple_evaluate(model=plain, tasks=[DEMO_TASK], task_manager=manager, log_samples=False)
    assert [r for r in records if r["multiplier"] == 0] == records_from_results(baseline, 0.0)


def test_sweep_with_a_factory(tiny: Any, task_dir: Path) -> None:
    made: list[float] = []

    def factory(multiplier: float) -> SteeredLM:
        made.append(multiplier)
        return SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, scale=multiplier)

    records = sweep(factory, [DEMO_TASK], [2.0, -2.0], include_path=[task_dir], limit=3)
    assert made == [2.0, -2.0] and len(records) == 4


def test_sweep_errors(tiny: Any, task_dir: Path) -> None:
    plain = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer)
    with pytest.raises(TypeError, match="no 'scale'"):
        sweep(plain, DEMO_TASK, [0], include_path=task_dir)
    lm = SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector)
    with pytest.raises(ValueError, match="unknown task"):
        sweep(lm, "no_such_task", [0], include_path=task_dir, include_defaults=False)
    with pytest.raises(ValueError, match="is not a folder"):
        sweep(lm, DEMO_TASK, [0], include_path=task_dir / "missing")
    with pytest.raises(ValueError, match="multiplier"):
        sweep(lm, DEMO_TASK, [], include_path=task_dir)


def test_write_multiple_choice_task_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="answer"):
        write_multiple_choice_task(tmp_path, "bad", [{"question": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(ValueError, match="letters"):
        write_multiple_choice_task(tmp_path, "bad name", [{"question": "q", "choices": ["a", "b"], "answer": 0}])


@pytest.mark.parametrize("multipliers", [["-2,0,2"], ["-2", "0", "2"]], ids=["comma", "spaces"])
def test_cli_sweep(tiny_dir: Path, task_dir: Path, tmp_path: Path, multipliers: list[str], capsys: Any) -> None:
    out = tmp_path / "out"
    argv = ["sweep", "--model", str(tiny_dir / "model"), "--vector", str(tiny_dir / "vector.safetensors")]
    argv += ["--tasks", DEMO_TASK, "--multipliers", *multipliers, "--include-path", str(task_dir)]
    argv += ["--device", "cpu", "--dtype", "float32", "--limit", "4", "-o", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted({r["scale"] for r in data["metrics"]}) == [-2.0, 0.0, 2.0]
    assert len(data["metrics"]) == 6 and all(math.isfinite(r["value"]) for r in data["metrics"])
    assert len(data["items"]) == 0  # three choices: no pairwise propensity
    assert "Wrote " in capsys.readouterr().out


def test_cli_demo_task_and_bad_multipliers(tmp_path: Path, capsys: Any) -> None:
    assert main(["demo-task", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / f"{DEMO_TASK}.yaml").is_file()
    capsys.readouterr()
    status = main(["sweep", "--model", "m", "--vector", "v", "--tasks", "t", "--multipliers", "a,b", "-o", "x"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "not a number" in err  # one line, no traceback
    # tdsteer-eval is an alias: the same command through the tdsteer program, negative values included
    assert tdsteer_main(["demo-task", str(tmp_path / "u")]) == 0
    assert (tmp_path / "u" / f"{DEMO_TASK}.yaml").is_file()
