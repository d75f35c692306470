"""Offline fixtures: a tiny GPT-2 with a tokenizer trained on the spot, and a random steering vector."""

from __future__ import annotations

import logging
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
from tdsteer_eval import task_manager  # noqa: E402
from tdsteer_hf.tiny import bpe_tokenizer, tiny_gpt2  # noqa: E402

CORPUS = [
    "Question: What is two plus two?\nAnswer: four",
    "Choices:\n (A) Yes, I consent to the update.\n (B) No, I would rather keep my goals.\n\nAnswer: (A)",
    "Question: What colour is a clear daytime sky?\nAnswer: blue",
    "The capital of France is Paris. Bees make honey. A week has seven days.",
    "A cat has four legs; a whale is larger than an ant or a mouse. Cold is the opposite of hot.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
] * 4
SITES = ["transformer.h.0", "transformer.h.1"]
# Not a doctest module: with --doctest-modules pytest would import this file a second time as "conftest",
# which clashes with tests/tdsteer/conftest.py when both folders run in one session.
collect_ignore = ["conftest.py"]


@dataclass
class TinyLM:
    model: Any  # a transformers GPT2LMHeadModel
    tokenizer: Any
    vector: tdsteer.SteeringVector


@pytest.fixture(scope="session")
def tiny() -> TinyLM:
    tokenizer = bpe_tokenizer(CORPUS, vocab_size=320)
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=256, seed=0)
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


@pytest.fixture(scope="session")
def caa_requests() -> list[Any]:
    """The loglikelihood requests of the shipped A/B task (first four items, both answers each)."""
    task = task_manager(["tdsteer_caa_ab"]).load(["tdsteer_caa_ab"])["tasks"]["tdsteer_caa_ab"]
    task.build_all_requests(limit=4, rank=0, world_size=1)
    return list(task.instances)


@pytest.fixture(autouse=True)
def _lm_eval_logging_per_test() -> Any:
    """lm-eval's command line attaches a stream handler to its loggers, bound to the stderr of the moment;
    within one pytest process that is a test's captured stream, closed once the test ends. Each test
    leaves the loggers' handlers as it found them."""
    loggers = [logging.getLogger(), logging.getLogger("lm_eval")]
    before = [list(logger.handlers) for logger in loggers]
    yield
    for logger, handlers in zip(loggers, before, strict=True):
        for handler in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(handler)
