"""The shipped demo model: it loads offline, its data is well formed, steering visibly works on its
learned weights, and its training script is reproducible."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tdsteer
import tdsteer_hf
from tdsteer_hf.data import CAA_SEPARATOR
from tdsteer_hf.demo import DATA_FILES, DEMO_LAYER, DEMO_SCALES, data_path, load_demo_model, model_path
from tdsteer_hf.demo.corpus import PROMPTS, write_data
from tdsteer_hf.demo.language import NEGATIVE_WORDS, POSITIVE_WORDS, negative_fraction, positive_fraction, words
from tdsteer_hf.demo.metrics import generations, perplexity, propensities
from tdsteer_hf.demo.train import TrainConfig, train

# The documented set-up: a mean-difference vector from the shipped pairs, read and applied at the output
# of block DEMO_LAYER, and multipliers up to half the positive-negative gap. Reduced settings: 64 pairs,
# 40 A/B items, 16 new tokens.
LAYER = DEMO_LAYER
SCALES = DEMO_SCALES
MAX_BYTES = 5_000_000


@pytest.fixture(scope="module")
def demo() -> tuple[torch.nn.Module, object]:
    return load_demo_model()


@pytest.fixture(scope="module")
def vector(demo: tuple[torch.nn.Module, object]) -> tdsteer.SteeringVector:
    model, tokenizer = demo
    pairs = tdsteer_hf.read_pairs(data_path("pairs"))[:64]
    batches = tdsteer_hf.contrastive_batches(tokenizer, pairs, batch_size=32)
    sites = tdsteer_hf.sites(model, [LAYER], kind="resid_post")
    return tdsteer.extract(model, batches, sites, method="mean_diff", progress=False)


def _increasing(values: list[float]) -> bool:
    return all(a <= b for a, b in zip(values, values[1:], strict=False)) and values[0] < values[-1]


def test_the_checkpoint_is_small_float32_safetensors() -> None:
    folder = model_path()
    files = {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()}
    assert "model.safetensors" in files and "tokenizer.json" in files, files
    assert sum(files.values()) <= MAX_BYTES, files
    assert {tensor.dtype for tensor in load_file(str(folder / "model.safetensors")).values()} == {torch.float32}


def test_the_model_loads_offline_and_writes_the_language(demo: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = demo
    assert model.config.model_type == "gpt2" and 64 <= model.config.n_embd <= 128
    texts = generations(model, tokenizer, ["the soup was", "my friend said the film was"], max_new_tokens=12)[0.0]
    vocabulary = set(tokenizer.get_vocab())
    for text in texts:
        assert text.strip() and all(word in vocabulary for word in words(text)), texts


def test_the_shipped_data_is_what_the_seeded_script_writes(tmp_path: Path) -> None:
    written = {path.name: path.read_bytes() for path in write_data(tmp_path, seed=0)}
    assert set(written) == set(DATA_FILES.values())
    for name, content in written.items():
        assert data_path(name).read_bytes() == content, name


def test_the_data_files_have_their_formats(demo: tuple[torch.nn.Module, object]) -> None:
    _, tokenizer = demo
    pairs = tdsteer_hf.read_pairs(data_path("pairs"))
    assert pairs and all(set(pair) == {"positive", "negative"} for pair in pairs)
    for pair in pairs:
        positive, negative = words(pair["positive"]), words(pair["negative"])
        assert len(positive) == len(negative) and set(positive) & POSITIVE_WORDS and set(negative) & NEGATIVE_WORDS
    items = tdsteer_hf.load_caa_json(data_path("ab"))
    letters = [item["answer_matching_behavior"] for item in items]
    assert letters.count("(A)") == letters.count("(B)") == len(items) // 2
    assert all("Choices: (A) " in item["question"] and " (B) " in item["question"] for item in items)
    heldout = data_path("heldout").read_text(encoding="utf-8").splitlines()
    assert heldout and not any(set(words(text)) & (POSITIVE_WORDS | NEGATIVE_WORDS) for text in heldout)
    prompts = data_path("prompts").read_text(encoding="utf-8").splitlines()
    assert prompts == list(PROMPTS)
    texts = [text for pair in pairs for text in pair.values()] + heldout + prompts
    texts += [item["question"] + CAA_SEPARATOR + item["answer_matching_behavior"] for item in items]
    assert all(tokenizer.unk_token_id not in tokenizer(text)["input_ids"] for text in texts)


def test_steering_raises_the_positive_words_of_generations(
    demo: tuple[torch.nn.Module, object], vector: tdsteer.SteeringVector
) -> None:
    model, tokenizer = demo
    texts = generations(model, tokenizer, PROMPTS, vector=vector, scales=SCALES, max_new_tokens=16)
    positive = [positive_fraction(texts[scale]) for scale in SCALES]
    negative = [negative_fraction(texts[scale]) for scale in SCALES]
    assert _increasing(positive), positive
    assert _increasing([-value for value in negative]), negative


def test_steering_raises_the_ab_propensity(
    demo: tuple[torch.nn.Module, object], vector: tdsteer.SteeringVector
) -> None:
    model, tokenizer = demo
    items = tdsteer_hf.load_caa_json(data_path("ab"))[:40]
    means = propensities(model, tokenizer, items, vector=vector, scales=SCALES).mean(dim=1).tolist()
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means


def test_scale_zero_leaves_perplexity_unchanged(
    demo: tuple[torch.nn.Module, object], vector: tdsteer.SteeringVector
) -> None:
    model, tokenizer = demo
    texts = data_path("heldout").read_text(encoding="utf-8").splitlines()
    plain = perplexity(model, tokenizer, texts)
    assert perplexity(model, tokenizer, texts, vector=vector, scale=0.0) == plain
    assert perplexity(model, tokenizer, texts, vector=vector, scale=max(SCALES)) > plain


def test_training_twice_gives_identical_weights() -> None:
    config = TrainConfig(steps=3, batch_size=8, n_layer=2, n_embd=32, n_head=2)
    first, _ = train(config, progress=False)
    second, _ = train(config, progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TDSTEER_DEMO_RETRAIN") != "1",
    reason="retrains the demo model (minutes): set TDSTEER_DEMO_RETRAIN=1",
)
def test_a_full_retrain_reproduces_the_shipped_weights() -> None:
    model, _ = train(TrainConfig(), progress=False)
    shipped = load_file(str(model_path() / "model.safetensors"))
    trained = model.state_dict()
    assert all(torch.equal(trained[name], tensor) for name, tensor in shipped.items())
