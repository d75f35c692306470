"""Hostile input to the command line: each mistake is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tdsteer.cli import main
from tdsteer_hf.tiny import save_tiny_gpt2

TEXTS = ["I love this movie", "I hate this movie", "the food was great", "the food was awful"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_gpt2(root / "model", TEXTS, n_positions=16)
    truncated = Path(shutil.copytree(model, root / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    null_config = Path(shutil.copytree(model, root / "null-config"))
    (null_config / "config.json").write_text("null")
    pairs = root / "pairs.tsv"
    pairs.write_text("I love this movie\tI hate this movie\nthe food was great\tthe food was awful\n")
    (root / "null.jsonl").write_text(json.dumps({"positive": None, "negative": "the food was awful"}) + "\n")
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "long.tsv").write_text("I love this movie " * 10 + "\t" + "I hate this movie " * 10 + "\n")
    vector = root / "v.safetensors"
    argv = ["extract", "--model", str(model), "--pairs", str(pairs), "-o", str(vector), "--device", "cpu"]
    assert main([*argv, "--no-progress"]) == 0
    return {
        "root": root,
        "model": model,
        "truncated": truncated,
        "null-config": null_config,
        "pairs": pairs,
        "vector": vector,
        **{name: root / name for name in ("null.jsonl", "deep.json", "long.tsv")},
    }


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> None:
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("tdsteer: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


def _extract(files: dict[str, Path], model: str = "model", pairs: str = "pairs", out: str | None = None) -> list[str]:
    output = out if out is not None else str(files["root"] / "out.safetensors")
    return ["extract", "--model", str(files[model]), "--pairs", str(files[pairs]), "-o", output, "--device", "cpu"]


def test_truncated_weights(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, _extract(files, model="truncated"), "cannot load model", "truncated or corrupted")


def test_config_holding_null(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, _extract(files, model="null-config"), "config.json a JSON object")
    _one_line_error(capsys, ["info", "--model", str(files["null-config"])], "cannot load the model config")


def test_output_is_a_folder(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, _extract(files, out=str(files["root"])), "is a folder", "vector.safetensors")


def test_null_field_and_deep_nesting(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, _extract(files, pairs="null.jsonl"), "positive and negative must be strings")
    _one_line_error(capsys, _extract(files, pairs="deep.json"), "nests JSON too deeply")


def test_text_longer_than_the_model(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, _extract(files, pairs="long.tsv"), "40 tokens", "at most 16 positions", "--max-length 16")
    out = files["root"] / "truncated-text.safetensors"
    assert main([*_extract(files, pairs="long.tsv", out=str(out)), "--max-length", "16", "--no-progress"]) == 0
    assert out.is_file()


def test_meta_device_and_empty_prompt(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--model", str(files["model"]), "--vector", str(files["vector"])]
    _one_line_error(capsys, [*base, "--device", "meta", "--prompt", "I love"], "--device meta holds no data")
    _one_line_error(capsys, [*_extract(files)[:-2], "--device", "meta"], "--device meta")
    _one_line_error(capsys, [*base, "--device", "cpu", "--prompt", " "], "--prompt is empty")


def test_image_positions_for_a_language_model(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--model", str(files["model"]), "--vector", str(files["vector"]), "--prompt", "I love"]
    for policy in ("patches", "prefix"):
        _one_line_error(capsys, [*base, "--positions", policy], "policy of image models", "generated")
