"""`tdsteer demo` on the shipped demo model, reduced: steering works on learned weights, offline."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM

from tdsteer import SteeringVector, as_vector
from tdsteer.cli import main
from tdsteer_eval import task_manager
from tdsteer_hf.demo import DEMO_SCALES, data_path, load_demo_model, positive_fraction
from tdsteer_hf.demo.language import negative_fraction

SCALES = tuple(float(scale) for scale in DEMO_SCALES)


def _increasing(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False))


def _rising(values: list[float]) -> bool:
    """Never falls from one scale to the next, and ends higher than it starts."""
    return all(a <= b for a, b in zip(values, values[1:], strict=False)) and values[-1] > values[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "results"
    argv = ["demo", "-o", str(folder), "--limit", "24"]
    assert main(argv) == 0
    return folder


@pytest.mark.slow
def test_demo_writes_the_report(demo: Path) -> None:
    for name in ("report.md", "results.json", "vector.safetensors", "generations.json", "behaviour.png"):
        assert (demo / name).is_file(), name
    # the vector the demo wrote is read by every command's loader (as_vector), not only SteeringVector.load
    assert as_vector(demo / "vector.safetensors").keys() == SteeringVector.load(demo / "vector.safetensors").keys()


@pytest.mark.slow
def test_positive_words_rise_with_the_scale(demo: Path) -> None:
    rows = json.loads((demo / "generations.json").read_text())
    texts = [[r["text"] for r in rows if r["scale"] == scale] for scale in SCALES]
    positive = [positive_fraction(group) for group in texts]
    negative = [negative_fraction(group) for group in texts]
    assert _rising(positive), positive
    assert _rising([-share for share in negative]), negative


@pytest.mark.slow
def test_propensity_rises_and_perplexity_is_untouched_at_zero(demo: Path) -> None:
    results = json.loads((demo / "results.json").read_text())
    summary = results["summary"]
    curve = summary["tdsteer_caa_ab"]["mean_propensity"]
    assert _increasing(curve), curve
    assert summary["tdsteer_caa_ab"]["steerability"] > 0
    capability = summary["tdsteer_perplexity"]["capability"]
    key = next(k for k in capability if k.startswith("word_perplexity"))
    at_zero = capability[key]["values"][SCALES.index(0.0)]
    # the unsteered model's word perplexity on the same texts, from lm-eval's own HF model
    model, tokenizer = load_demo_model()
    manager = task_manager(["tdsteer_perplexity"], metadata={"text_path": str(data_path("heldout"))})
    plain = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16),
        tasks=["tdsteer_perplexity"],
        task_manager=manager,
        limit=24,
    )
    metric, _, filter_name = key.partition(",")
    assert at_zero == plain["results"]["tdsteer_perplexity"][f"{metric},{filter_name}"]


@pytest.mark.slow
def test_perplexity_scores_each_held_out_review(demo: Path) -> None:
    """The held-out file has a review a line: --limit 24 scores 24 documents, not one 200-review text."""
    results = json.loads((demo / "results.json").read_text())
    capability = results["summary"]["tdsteer_perplexity"]["capability"]["word_perplexity,none"]["values"]
    assert all(3.0 < value < 10.0 for value in capability), capability  # one long text without separators: ~13
    assert results["provenance"]["demo"]["text"]["file"] == "neutral_heldout.txt"


@pytest.mark.slow
def test_an_identical_rerun_recomputes_nothing(
    demo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = json.loads((demo / "results.json").read_text())

    def evaluate(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished scale was evaluated again")

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    assert main(["demo", "-o", str(demo), "--limit", "24"]) == 0
    assert "5 of 5 scales were already in" in capsys.readouterr().out
    after = json.loads((demo / "results.json").read_text())
    assert after["metrics"] == before["metrics"] and after["items"] == before["items"]
    assert (demo / "vector.safetensors").is_file()
    assert "vector.safetensors (in this folder)" in (demo / "report.md").read_text()


@pytest.mark.slow
def test_other_settings_are_refused_before_any_work(
    demo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tdsteer_eval.cli.demo_command as demo_command

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model loaded before the folder was checked")

    monkeypatch.setattr(demo_command, "load_demo_model", load)
    assert main(["demo", "-o", str(demo), "--limit", "24", "--scales", "-1,0,1"]) == 2
    error = capsys.readouterr().err
    assert "other settings (demo.scales)" in error and "-o DIR" in error
