"""tdsteer sweep and tdsteer eval: bad inputs are one line and exit status 2, the help says what the
commands take, evaluations keep git's complaints off stderr, an interrupted sweep says how to resume."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import lm_eval.evaluator
import pytest

import tdsteer_eval.cli
from tdsteer.cli import CLIError, main
from tdsteer.operators import OPERATORS
from tdsteer_eval.cli import sweep_command
from tdsteer_eval.lm import SteeredLM

DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the sweep gets as far as loading the model."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(sweep_command, "load_lm", refuse)


def _sweep(tiny_dir: Path, out: Path, *extra: str, scales: str = "-2,0,2", vector: bool = True) -> list[str]:
    argv = ["sweep", "--model", str(tiny_dir / "model")]
    argv += ["--vector", str(tiny_dir / "vector.safetensors")] if vector else []
    argv += ["--tasks", "tdsteer_caa_ab", "--scales", scales, "--device", "cpu", "--dtype", "float32"]
    return [*argv, "-o", str(out), *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tdsteer: error: "), err
    for text in expected:
        assert text in err, err
    return err


def test_model_args_are_checked_before_the_model_loads(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    out = tmp_path / "out"
    _one_line_error(capsys, _sweep(tiny_dir, out, "--model-args", "foo"), "--model-args", "'foo' is not key=value")
    _one_line_error(capsys, _sweep(tiny_dir, out, "--model-args", "dtype=float32,=1"), "'=1' is not key=value")
    for key, option in [
        ("scale", "--scales"),
        ("vector", "--vector"),
        ("positions", "--positions"),
        ("operator", "--operator"),
        ("condition", "--condition"),
        ("sites", "--sites"),
        ("batch_size", "--batch-size"),
    ]:
        _one_line_error(
            capsys, _sweep(tiny_dir, out, "--model-args", f"{key}=1"), f"--model-args {key}=", f"with {option}"
        )
    _one_line_error(capsys, _sweep(tiny_dir, out, "--model-args", '{"scale": 3}'), "with --scales")
    assert not out.exists()


def test_an_argument_the_model_does_not_take_is_one_line(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_error(
        capsys,
        _sweep(tiny_dir, tmp_path / "out", "--model-args", "bogus=1"),
        "--model-args bogus=...: the model does not take it",
    )


def test_other_bad_sweep_options_are_one_line(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    out = tmp_path / "out"
    err = _one_line_error(capsys, _sweep(tiny_dir, out, vector=False), "give --vector FILE", "--layers L --pairs FILE")
    assert "not both" not in err
    _one_line_error(capsys, _sweep(tiny_dir, out, scales="0,0"), "--scales: 0 is given twice")
    _one_line_error(capsys, _sweep(tiny_dir, out, scales="-1,0,1,-1.0"), "--scales: -1 is given twice")
    _one_line_error(capsys, _sweep(tiny_dir, out, scales="1,,2"), "--scales '1,,2' has an empty item")
    _one_line_error(capsys, _sweep(tiny_dir, out, "--num-fewshot", "-1"), "--num-fewshot must be 0 or more")
    _one_line_error(capsys, _sweep(tiny_dir, out, "--gen-kwargs", "foo"), "--gen-kwargs", "'foo' is not key=value")
    assert not out.exists()


def test_scales_without_zero_warn(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop(*args: Any, **kwargs: Any) -> Any:
        raise CLIError("stopped before the model loads")

    monkeypatch.setattr(sweep_command, "load_lm", stop)
    assert main(_sweep(tiny_dir, tmp_path / "out", scales="0.5,-0.5")) == 2
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("tdsteer: warning: ")]
    assert len(warnings) == 1 and "--scales has no 0" in warnings[0] and "-0.5,0,0.5" in warnings[0], err
    assert main(_sweep(tiny_dir, tmp_path / "out", scales="-0.5,0,0.5")) == 2
    assert "warning" not in capsys.readouterr().err


def test_eval_run_scale_and_unknown_model_args_are_one_line(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lm-eval logs its own lines on stderr; the error is one line, with no traceback."""
    base = f"pretrained={tiny_dir / 'model'},vector={tiny_dir / 'vector.safetensors'}"
    argv = ["eval", "run", "--model", "tdsteer", "--tasks", "tdsteer_caa_ab", "--limit", "1", "--device", "cpu"]
    for model_args, expected in [
        (",scale=abc", "tdsteer: error: scale 'abc' is not a number"),
        (",bogus=1", "tdsteer: error: --model_args bogus=...: the model does not take it"),
    ]:
        assert main([*argv, "--model_args", base + model_args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.endswith("\n") and err.splitlines()[-1].startswith(expected), err


def test_scale_text_from_model_args_and_numbers_from_python(tiny: Any) -> None:
    from tdsteer_eval.lm import as_scale

    assert as_scale("-2.5") == -2.5 and as_scale(4) == 4.0
    with pytest.raises(ValueError, match="scale 'abc' is not a number"):
        as_scale("abc")
    with pytest.raises(ValueError, match="finite"):
        as_scale("inf")
    with pytest.raises(TypeError, match="scale must be a number"):
        as_scale(True)
    lm = SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, scale="3", device="cpu")
    assert lm.scale == 3.0
    with pytest.raises(TypeError, match="scale must be a number"):
        lm.scale = "4"  # type: ignore[assignment]


def test_help_names_defaults_operators_and_layer_slices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--help"]) == 0
    sweep_help = " ".join(capsys.readouterr().out.split())
    assert "another model type (default: warn)" in sweep_help
    assert "(default: mean_diff)" in sweep_help
    assert "slice without its end (2:10 is 2 to 9)" in sweep_help
    assert f"{', '.join(OPERATORS)} (default: add)" in sweep_help
    assert main(["eval", "run", "--help"]) == 0
    assert f"{', '.join(OPERATORS)} (default add)" in capsys.readouterr().out
    docs = DOCS.read_text(encoding="utf-8")
    operator_row = next(line for line in docs.splitlines() if line.startswith("| `operator=NAME`"))
    for name in OPERATORS:
        assert f"`{name}`" in operator_row, name


def test_alias_example_writes_into_a_folder() -> None:
    doc = tdsteer_eval.cli.main.__doc__ or ""
    example = doc[doc.index("tdsteer-eval sweep") :].split("\n\n")[0]
    output = example.split(" -o ")[1].split()[0]
    assert not output.endswith(".json"), output


def _outside_git(tmp_path: Path) -> Path:
    folder = tmp_path / "not_a_repo"
    folder.mkdir()
    try:
        inside = subprocess.run(["git", "rev-parse"], cwd=folder, capture_output=True).returncode == 0
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if inside:
        pytest.skip("the temporary folder is inside a git repository")
    return folder


def test_a_sweep_outside_a_git_repository_prints_no_git_error(
    tiny_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_outside_git(tmp_path))
    assert main(_sweep(tiny_dir, tmp_path / "out", "--limit", "1", scales="0")) == 0
    err = capfd.readouterr().err
    assert "not a git repository" not in err, err
    assert (tmp_path / "out" / "results.json").is_file()


def test_quiet_git_records_what_lm_eval_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tdsteer_eval.runner import git_commit_hash, quiet_git

    original = lm_eval.evaluator.get_git_commit_hash
    for folder in (Path(__file__).parent, _outside_git(tmp_path)):
        monkeypatch.chdir(folder)
        assert git_commit_hash() == original()
        with quiet_git():
            assert lm_eval.evaluator.get_git_commit_hash() == original()
    assert lm_eval.evaluator.get_git_commit_hash is original


def test_an_interrupted_sweep_says_how_to_resume(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Loaded:
        rank = 0

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_command, "load_lm", lambda plan, args: Loaded())
    monkeypatch.setattr(sweep_command, "run_sweep", interrupt)
    out = tmp_path / "out"
    assert main(_sweep(tiny_dir, out)) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "run the same command again to resume" in err, err
    assert str(out) in err


def test_scales_over_several_values_pass_the_checks(tiny_dir: Path, tmp_path: Path, no_model: None) -> None:
    """``--scales -1 0 1`` (one scale per value) is one list: every check passes and the model would load."""
    argv = _sweep(tiny_dir, tmp_path / "out", scales="-1")
    at = argv.index("-1") + 1
    argv[at:at] = ["0", "1"]
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(argv)
