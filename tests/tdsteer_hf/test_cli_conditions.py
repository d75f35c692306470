"""``tdsteer extract --condition`` and ``tdsteer generate --condition`` on the shipped demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tdsteer
from tdsteer.cli import main
from tdsteer_hf.demo import data_path, model_path

RECORDS = [json.loads(line) for line in data_path("pairs").read_text().splitlines()]


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conditions")
    negative_first = root / "negative-reviews.jsonl"  # the condition: "the review is negative"
    negative_first.write_text(
        "".join(json.dumps({"positive": r["negative"], "negative": r["positive"]}) + "\n" for r in RECORDS[:150])
    )
    return {"root": root, "condition_pairs": negative_first, "pairs": data_path("pairs")}


def test_fit_then_generate_steers_only_the_prompts_that_meet_it(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, root = model_path(), files["root"]
    condition, vector = root / "negative.safetensors", root / "positive.safetensors"
    common = ["--model", model, "--layers", "0", "--device", "cpu", "--no-progress"]
    status, out, err = _run(
        capsys, "extract", *common, "--pairs", files["condition_pairs"], "--condition", "-o", condition
    )
    assert status == 0, err
    assert "Fitted condition at transformer.h.0 (layer 0): cosine >" in out, out
    assert "balanced accuracy 1.000 on the 150 prompt pairs it was fitted on" in out, out
    status, _, err = _run(capsys, "extract", *common, "--pairs", files["pairs"], "-o", vector)
    assert status == 0, err

    # held-out pairs measure it on data it was not fitted on
    status, out, err = _run(
        capsys,
        "extract",
        *common,
        "--pairs",
        files["condition_pairs"],
        "--condition",
        "--held-out",
        "0.2",
        "-o",
        root / "held.st",
    )
    assert status == 0, err
    assert "on the 120 prompt pairs it was fitted on, 1.000 on 30 held out" in out, out
    assert tdsteer.Condition.load(root / "held.st").metadata["held_out"] == 30
    # of several layers, the one that separates best (the first of equals)
    several = ["--model", model, "--layers", "0:4", "--read", "mean", "--device", "cpu", "--no-progress"]
    status, out, err = _run(
        capsys, "extract", *several, "--pairs", files["condition_pairs"], "--condition", "-o", root / "best.st"
    )
    assert status == 0, err
    by_layer = dict(
        part.split(": ") for part in out.splitlines()[0].removeprefix("Balanced accuracy by layer: ").split(", ")
    )
    best = max(by_layer, key=lambda layer: float(by_layer[layer]))
    assert f"(layer {best}): cosine" in out.splitlines()[1], out

    negative, positive = RECORDS[160]["negative"], RECORDS[160]["positive"]
    generate = ["generate", "--model", model, "--vector", vector, "--scale", "1", "--max-new-tokens", "8"]
    status, out, err = _run(
        capsys, *generate, "--condition", condition, "--prompt", negative, "--prompt", positive, "--compare", "--json"
    )
    assert status == 0, err
    steered_negative, plain_negative, steered_positive, plain_positive = json.loads(out)
    assert steered_negative["condition_met"] is True and steered_positive["condition_met"] is False
    assert steered_negative["completion"] != plain_negative["completion"]
    assert steered_positive["completion"] == plain_positive["completion"]

    status, out, _ = _run(capsys, *generate, "--condition", condition, "--prompt", positive)
    assert status == 0 and "(condition not met, not steered: cosine" in out, out


def test_condition_options_are_checked_before_the_model_loads(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["extract", "--model", tmp_path / "no-model", "--pairs", files["condition_pairs"], "-o", tmp_path / "c.st"]
    for extra, words in (
        (["--read", "all"], "use --read last or --read mean"),
        (["--method", "pca_diff"], "drop --method pca_diff"),
        (["--held-out", "1"], "--held-out is a share of the pairs"),
    ):
        status, _, err = _run(capsys, *base, "--condition", *extra)
        assert status == 2 and err.count("\n") == 1 and words in err, err


def test_a_vector_file_is_not_a_condition(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    vector = files["root"] / "plain.safetensors"
    common = ["--model", model_path(), "--layers", "0", "--device", "cpu", "--no-progress"]
    assert _run(capsys, "extract", *common, "--pairs", files["pairs"], "-o", vector)[0] == 0
    status, _, err = _run(
        capsys, "generate", "--model", model_path(), "--vector", vector, "--condition", vector, "--prompt", "the"
    )
    assert status == 2 and "without a condition" in err and err.count("\n") == 1, err
