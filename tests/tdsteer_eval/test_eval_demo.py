"""`tdsteer demo` on the shipped demo model, reduced: steering works on learned weights, offline."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM

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
