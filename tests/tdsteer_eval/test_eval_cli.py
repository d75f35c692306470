"""tdsteer sweep and tdsteer eval from the command line: checks before the model loads, results, help."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import tdsteer
from tdsteer.cli import main
from tdsteer_eval.cli import sweep_command


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the sweep gets as far as loading the model."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(sweep_command, "load_lm", refuse)


def _sweep(tiny_dir: Path, *extra: str, vector: str | None = None) -> list[str]:
    argv = ["sweep", "--model", str(tiny_dir / "model"), "--vector", vector or str(tiny_dir / "vector.safetensors")]
    argv += ["--tasks", "tdsteer_caa_ab", "--scales", "-2,0,2", "--device", "cpu", "--dtype", "float32"]
    return argv + list(extra)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tdsteer: error: "), err
    assert expected in err, err


def test_each_bad_input_is_one_line_before_the_model_loads(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    out = ["-o", str(tmp_path / "out")]
    _one_line_error(
        capsys, [*_sweep(tiny_dir, *out)[:-2], "--tasks", "no_such_task", *out], "unknown task(s) no_such_task"
    )
    _one_line_error(capsys, _sweep(tiny_dir, *out, vector=str(tmp_path / "missing.safetensors")), "no such file")
    missing_data = '{"caa_path": "' + str(tmp_path / "refusal.json") + '"}'
    _one_line_error(capsys, _sweep(tiny_dir, "--metadata", missing_data, *out), "refusal.json' does not exist")
    other = tdsteer.SteeringVector({"transformer.h.0": torch.randn(64)}, metadata={"model_type": "gpt2"})
    other_path = str(other.save(tmp_path / "other.safetensors"))
    _one_line_error(capsys, _sweep(tiny_dir, *out, vector=other_path), "hidden size 64, but")
    _one_line_error(capsys, _sweep(tiny_dir, "--positions", "middle", *out), "Unknown position policy 'middle'")
    _one_line_error(capsys, _sweep(tiny_dir, "--positions", "patches", *out), "policy of image models")
    _one_line_error(capsys, _sweep(tiny_dir, "--operator", "shove", *out), "Unknown operator 'shove'")
    _one_line_error(
        capsys, _sweep(tiny_dir, "--condition", str(tiny_dir / "vector.safetensors"), *out), "without a condition"
    )
    _one_line_error(capsys, _sweep(tiny_dir, "--sites", "transformer.h.9", *out), "--sites transformer.h.9: not in")
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    _one_line_error(capsys, _sweep(tiny_dir, "-o", str(a_file)), "is a file; give a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _one_line_error(capsys, _sweep(tiny_dir, "-o", str(foreign)), "is not empty and holds no results.json")
    layers = ["sweep", "--model", str(tiny_dir / "model"), "--layers", "all", "--tasks", "tdsteer_caa_ab"]
    _one_line_error(capsys, [*layers, "--scales", "0,1", *out], "--layers needs --pairs FILE")
    _one_line_error(capsys, [*_sweep(tiny_dir, *out), "--layers", "0"], "not both")


def test_sweep_from_the_command_line(
    tiny_dir: Path, tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pt = str(tiny.vector.to_lm_eval(tmp_path / "vector.pt", scale=1.0, prefix="transformer"))  # lm-eval's format
    argv = _sweep(tiny_dir, "--limit", "2", "--positions", "continuation", "--log-samples", vector=pt)
    argv += ["--sites", "transformer.h.1", "--seed", "3", "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["[1/3] scale -2", "[2/3] scale 0", "[3/3] scale 2"]
    assert out[-1].startswith("Wrote ") and out[-1].endswith("report.md")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["provenance"]["sites"] == ["transformer.h.1"] and data["provenance"]["vector"]["format"] == "lm-eval"
    assert data["provenance"]["options"]["seed"] == 3 and len(data["items"]) == 2 * 3
    assert (tmp_path / "out" / "samples" / "scale_2" / "tdsteer_caa_ab.jsonl").is_file()
    # the same command again finds every scale done
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("Wrote ")


def test_sweep_with_a_condition_that_no_item_meets(
    tiny_dir: Path, tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing is steered: every scale gives the propensities of scale 0, and the provenance names the file."""
    never = tdsteer.Condition({"transformer.h.0": torch.ones(32)}, threshold=1.5)  # a cosine is at most 1
    path = str(never.save(tmp_path / "never.safetensors"))
    argv = [*_sweep(tiny_dir, "--limit", "2", "--condition", path), "-o", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["provenance"]["condition"] == str(Path(path).resolve())
    by_scale: dict[float, list[float]] = {}
    for item in data["items"]:
        by_scale.setdefault(item["scale"], []).append(item["propensity"])
    assert by_scale[-2.0] == by_scale[0.0] == by_scale[2.0]


def test_eval_help_lists_the_tdsteer_model_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "run", "--help"]) == 0
    out = capsys.readouterr().out
    for argument in ("vector=", "scale=", "operator=", "positions=", "sites=", "check=", "condition="):
        assert argument in out, argument
    assert "tdsteer_caa_ab" in out


def test_eval_run_with_the_tdsteer_model(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_args = f"pretrained={tiny_dir / 'model'},vector={tiny_dir / 'vector.safetensors'},positions=continuation"
    argv = ["eval", "run", "--model", "tdsteer", "--model_args", model_args, "--tasks", "tdsteer_mwe"]
    argv += ["--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "lm_eval")]
    assert main(argv) == 0
    written = list((tmp_path / "lm_eval").rglob("results_*.json"))
    results = json.loads(written[0].read_text())
    assert "acc,none" in results["results"]["tdsteer_mwe"]
    assert results["config"]["model_args"]["positions"] == "continuation"
