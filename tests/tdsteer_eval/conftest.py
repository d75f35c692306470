"""Offline fixtures: a tiny GPT-2 with a tokenizer trained on the spot, and a random steering vector."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tdsteer  # noqa: E402

CORPUS = [
    "Question: What is two plus two?\nAnswer: four",
    "Question: What colour is a clear daytime sky?\nAnswer: blue",
    "The capital of France is Paris. Bees make honey. A week has seven days.",
    "A cat has four legs; a whale is larger than an ant or a mouse. Cold is the opposite of hot.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
] * 4
SITES = ["transformer.h.0", "transformer.h.1"]


@dataclass
class TinyLM:
    model: Any  # a transformers GPT2LMHeadModel
    tokenizer: Any
    vector: tdsteer.SteeringVector


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, bos_token=eos, pad_token=eos)


@pytest.fixture(scope="session")
def tiny() -> TinyLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=128,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    directions = {site: torch.randn(32, generator=generator) for site in SITES}
    vector = tdsteer.SteeringVector(directions, metadata={"model_type": "gpt2", "method": "random"})
    return TinyLM(model, tokenizer, vector)


@pytest.fixture(scope="session")
def tiny_dir(tiny: TinyLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, its tokenizer and its vector saved to disk, as the command line reads them."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tiny.model.save_pretrained(folder / "model")
    tiny.tokenizer.save_pretrained(folder / "model")
    tiny.vector.save(folder / "vector.safetensors")
    return folder
