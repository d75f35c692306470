"""tdsteer_perplexity's documents: paragraphs, or lines in a file without blank lines; limit counts them."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM

from tdsteer_eval import task_manager
from tdsteer_eval.task_data import TaskDataError, check_data_file, split_documents
from tdsteer_hf.demo import data_path, load_demo_model


def _docs(path: Path, **metadata: Any) -> list[str]:
    manager = task_manager(["tdsteer_perplexity"], metadata={"text_path": str(path), **metadata})
    return [doc["text"] for doc in manager.load(["tdsteer_perplexity"])["tasks"]["tdsteer_perplexity"].test_docs()]


def test_a_file_without_blank_lines_holds_one_document_a_line(tmp_path: Path) -> None:
    lines = tmp_path / "reviews.txt"
    lines.write_text("the soup was green .\r\ni read the book .\nthe hotel was quiet .\n")
    assert _docs(lines) == ["the soup was green .", "i read the book .", "the hotel was quiet ."]
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("A paragraph\non two lines.\n \nAnother one.\n")
    assert _docs(paragraphs) == ["A paragraph\non two lines.", "Another one."]
    # the guess can be overridden: one multi-line document, or one document per line of paragraphs
    assert _docs(lines, text_split="paragraph") == ["the soup was green .\ni read the book .\nthe hotel was quiet ."]
    assert _docs(paragraphs, text_split="line") == ["A paragraph", "on two lines.", "Another one."]
    with pytest.raises(TaskDataError, match="text_split 'words'"):
        check_data_file("tdsteer_perplexity", {"text_path": str(lines), "text_split": "words"})
    assert len(split_documents(data_path("heldout").read_text(encoding="utf-8"))) == 200


def test_the_demo_text_is_scored_review_by_review_and_limit_counts_reviews() -> None:
    """Word perplexity over the first 5 held-out reviews equals a hand computation, review by review."""
    model, tokenizer = load_demo_model()
    reviews = data_path("heldout").read_text(encoding="utf-8").splitlines()[:5]
    manager = task_manager(["tdsteer_perplexity"], metadata={"text_path": str(data_path("heldout"))})
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=["tdsteer_perplexity"],
        task_manager=manager,
        limit=5,
        log_samples=True,
    )
    assert len(results["samples"]["tdsteer_perplexity"]) == 5
    total, words = 0.0, 0
    with torch.no_grad():
        for review in reviews:  # each review on its own, its first token predicted from end-of-text
            ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(review, add_special_tokens=False)["input_ids"]]])
            logits = model(ids).logits.log_softmax(-1)
            total += float(logits[0, :-1].gather(-1, ids[0, 1:, None]).sum())
            words += len(re.split(r"\s+", review))
    measured = results["results"]["tdsteer_perplexity"]["word_perplexity,none"]
    assert measured == pytest.approx(math.exp(-total / words), rel=1e-5)
