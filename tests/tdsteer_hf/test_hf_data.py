"""contrastive_batches: pairs, triples, CAA JSON; padding sides; answer indices; ragged halves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_tiny import build, train_tokenizer

import tdsteer
import tdsteer_hf
from tdsteer_hf import contrastive_batches, load_caa_json

CORPUS = [
    "I love this movie so much",
    "I hate this movie",
    "the weather is nice today",
    "the weather is awful",
    "Question : is the sky blue ? Choices : ( A ) Yes ( B ) No Answer :",
    "Is honesty good ? ( A ) yes ( B ) no",
    "You are a helpful assistant .",
    "it was great fun and it was awful boring",
]
PAIRS = [
    ("I love this movie so much", "I hate this movie"),
    ("the weather is nice today", "the weather is awful"),
    ("it was great fun", "it was awful boring"),
]
TRIPLES = [
    ("the weather is", " nice today", " awful"),
    ("I love this", " movie so much", " movie"),
    ("it was", " great fun", " awful boring"),
]
CAA = [
    {
        "question": "Question: is the sky blue? Choices:\n (A) Yes\n (B) No",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    },
    {
        "question": "Is honesty good? (A) yes (B) no",
        "answer_matching_behavior": " (B)",
        "answer_not_matching_behavior": " (A)",
    },
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def bpe() -> Any:
    return train_tokenizer(CORPUS * 3, kind="bpe")


def real_rows(half: dict[str, torch.Tensor]) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(half["input_ids"], half["attention_mask"])]


def token_at(half: dict[str, torch.Tensor], index: torch.Tensor) -> list[int]:
    """Token id at each row's index, counted within the real tokens."""
    out = []
    for ids, mask, i in zip(half["input_ids"], half["attention_mask"], index.tolist()):
        out.append(int(ids[mask.bool()][i]))
    return out


def test_pairs_right_padding(tokenizer: Any) -> None:
    batches = contrastive_batches(tokenizer, PAIRS, batch_size=2, padding_side="right")
    assert (len(batches), batches.count) == (2, 3)
    first, second = list(batches)
    assert set(first) == {"positive", "negative"}
    pos = first["positive"]
    assert pos["input_ids"].dtype == torch.long and pos["attention_mask"].dtype == torch.long
    assert real_rows(pos) == [tokenizer(text)["input_ids"] for text, _ in PAIRS[:2]]
    assert real_rows(first["negative"]) == [tokenizer(text)["input_ids"] for _, text in PAIRS[:2]]
    # Right padding: the real tokens come first, then pad ids.
    lengths = pos["attention_mask"].sum(-1).tolist()
    assert lengths == [7, 6]
    assert pos["attention_mask"][1].tolist() == [1] * 6 + [0]
    assert pos["input_ids"][1, -1].item() == tokenizer.pad_token_id
    # Ragged halves: positive and negative are padded separately.
    assert pos["input_ids"].shape == (2, 7) and first["negative"]["input_ids"].shape == (2, 5)
    assert second["positive"]["input_ids"].shape[0] == 1


def test_left_padding_and_the_right_default(tokenizer: Any) -> None:
    batch = next(iter(contrastive_batches(tokenizer, PAIRS, batch_size=3, padding_side="left")))
    mask = batch["positive"]["attention_mask"]
    assert mask.tolist() == [[1] * 7, [0] + [1] * 6, [0, 0] + [1] * 5]
    assert batch["positive"]["input_ids"][2, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert real_rows(batch["positive"]) == [tokenizer(pos)["input_ids"] for pos, _ in PAIRS]
    # Left padding carries position_ids counted from the first real token, as generate makes them.
    assert batch["positive"]["position_ids"][2].tolist() == [0, 0, 0, 1, 2, 3, 4]
    # The default pads on the right, whatever tokenizer.padding_side (a generation setting) says.
    tokenizer.padding_side = "left"
    try:
        assert contrastive_batches(tokenizer, PAIRS).padding_side == "right"
    finally:
        tokenizer.padding_side = "right"
    assert contrastive_batches(tokenizer, PAIRS).padding_side == "right"


def test_reiterable_and_fingerprint(tokenizer: Any) -> None:
    batches = contrastive_batches(tokenizer, PAIRS, batch_size=2)
    once = [b["positive"]["input_ids"] for b in batches]
    twice = [b["positive"]["input_ids"] for b in batches]
    assert len(once) == 2 and all(torch.equal(a, b) for a, b in zip(once, twice))
    assert len(batches.fingerprint) == 64
    assert batches.fingerprint == contrastive_batches(tokenizer, PAIRS, batch_size=3).fingerprint
    assert batches.fingerprint != contrastive_batches(tokenizer, PAIRS[:2]).fingerprint
    swapped = [(n, p) for p, n in PAIRS]
    assert batches.fingerprint != contrastive_batches(tokenizer, swapped).fingerprint
    assert "count=3" in repr(batches)


@pytest.mark.parametrize("side", ["left", "right"])
def test_triples_answer_is_last_completion_token(tokenizer: Any, side: str) -> None:
    batches = contrastive_batches(tokenizer, TRIPLES, batch_size=3, read="answer", padding_side=side)
    batch = next(iter(batches))
    assert batches.texts[0] == ("the weather is nice today", "the weather is awful")
    assert token_at(batch["positive"], batch["positive_index"]) == [
        tokenizer.convert_tokens_to_ids(w) for w in ("today", "much", "fun")
    ]
    assert token_at(batch["negative"], batch["negative_index"]) == [
        tokenizer.convert_tokens_to_ids(w) for w in ("awful", "movie", "boring")
    ]
    # Indices count from the first real token, so they match the unpadded tokenisation.
    assert batch["positive_index"].tolist() == [len(tokenizer(p + c)["input_ids"]) - 1 for p, c, _ in TRIPLES]
    assert batch["positive_index"].dtype == torch.long


def test_position_ids_count_real_tokens(tokenizer: Any) -> None:
    batch = next(iter(contrastive_batches(tokenizer, PAIRS, padding_side="left", position_ids=True)))
    assert batch["positive"]["position_ids"].tolist() == [list(range(7)), [0] + list(range(6)), [0, 0] + list(range(5))]
    batch = next(iter(contrastive_batches(tokenizer, PAIRS, padding_side="right", position_ids=True)))
    assert batch["positive"]["position_ids"][2].tolist() == [0, 1, 2, 3, 4, 4, 4]


def test_triples_as_dicts(tokenizer: Any) -> None:
    as_dicts = [{"prompt": p, "positive": a, "negative": b} for p, a, b in TRIPLES]
    left = contrastive_batches(tokenizer, as_dicts, read="answer")
    right = contrastive_batches(tokenizer, TRIPLES, read="answer")
    assert left.texts == right.texts and left.fingerprint == right.fingerprint


def _caa_file(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"caa{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(item) for item in CAA) + "\n")
    else:
        path.write_text(json.dumps(CAA))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_caa_answer_letter(tokenizer: Any, tmp_path: Path, suffix: str, side: str) -> None:
    path = _caa_file(tmp_path, suffix)
    assert load_caa_json(path) == CAA
    batches = contrastive_batches(tokenizer, path, read="answer", padding_side=side)
    assert batches.texts[0][0] == CAA[0]["question"] + tdsteer_hf.CAA_SEPARATOR + "(A)"
    batch = next(iter(batches))
    a, b = tokenizer.convert_tokens_to_ids("A"), tokenizer.convert_tokens_to_ids("B")
    assert token_at(batch["positive"], batch["positive_index"]) == [a, b]
    assert token_at(batch["negative"], batch["negative_index"]) == [b, a]
    # The letter sits one before the closing parenthesis, the last real token.
    lengths = batch["positive"]["attention_mask"].sum(-1)
    assert (batch["positive_index"] == lengths - 2).all()


def test_caa_answer_letter_with_bpe(bpe: Any) -> None:
    batch = next(iter(contrastive_batches(bpe, CAA, read="answer", padding_side="left")))
    for half, index, letters in (
        (batch["positive"], batch["positive_index"], "AB"),
        (batch["negative"], batch["negative_index"], "BA"),
    ):
        tokens = [bpe.decode([t]) for t in token_at(half, index)]
        assert [letter in token for letter, token in zip(letters, tokens)] == [True, True], tokens
        assert not any("(" not in t and ")" in t for t in tokens)


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture
def chat_tokenizer() -> Any:
    tok = train_tokenizer(CORPUS)
    tok.add_tokens(["<|user|>", "<|system|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    tok.chat_template = CHAT
    return tok


def test_chat_template(chat_tokenizer: Any) -> None:
    batches = contrastive_batches(
        chat_tokenizer, CAA, read="answer", chat_template=True, system_prompt="You are a helpful assistant."
    )
    positive = batches.texts[0][0]
    assert positive.startswith("<|system|> You are a helpful assistant. <|end|> <|user|> Question")
    assert positive.endswith("<|assistant|> (A)")
    batch = next(iter(batches))
    a = chat_tokenizer.convert_tokens_to_ids("A")
    assert token_at(batch["positive"], batch["positive_index"])[0] == a
    assert "<|end|>" not in chat_tokenizer.decode(batch["positive"]["input_ids"][0][-3:])
    # Pairs become user turns followed by the generation prompt.
    pairs = contrastive_batches(chat_tokenizer, PAIRS, chat_template=True)
    assert pairs.texts[0][0] == "<|user|> I love this movie so much <|end|> <|assistant|> "
    # A template given as a string is used as is.
    custom = contrastive_batches(chat_tokenizer, PAIRS, chat_template="{{ messages[0]['content'] }}!")
    assert custom.texts[1] == ("the weather is nice today!", "the weather is awful!")


def test_chat_template_without_system_role(chat_tokenizer: Any) -> None:
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|assistant|> "
    )
    batches = contrastive_batches(chat_tokenizer, PAIRS[:1], chat_template=True, system_prompt="Be nice.")
    assert batches.texts[0][0] == "<|user|> Be nice.\n\nI love this movie so much <|assistant|> "


def test_max_length_keeps_the_end(tokenizer: Any) -> None:
    full = next(iter(contrastive_batches(tokenizer, CAA, read="answer")))
    cut = next(iter(contrastive_batches(tokenizer, CAA, read="answer", max_length=5)))
    assert cut["positive"]["input_ids"].shape[1] == 5
    assert real_rows(cut["positive"])[0] == real_rows(full["positive"])[0][-5:]
    assert token_at(cut["positive"], cut["positive_index"]) == token_at(full["positive"], full["positive_index"])
    with pytest.raises(ValueError, match="answer token falls outside the last max_length=1"):
        contrastive_batches(tokenizer, CAA, read="answer", max_length=1)


def test_errors(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read='answer'.*pairs.*triples or CAA"):
        contrastive_batches(tokenizer, PAIRS, read="answer")
    with pytest.raises(ValueError, match="chat_template=True but .* has no chat template"):
        contrastive_batches(tokenizer, PAIRS, chat_template=True)
    with pytest.raises(ValueError, match="system_prompt needs a chat template"):
        contrastive_batches(tokenizer, PAIRS, system_prompt="hi")
    with pytest.raises(ValueError, match="data is empty"):
        contrastive_batches(tokenizer, [])
    with pytest.raises(ValueError, match="data item 1 .*expected a \\(positive, negative\\) pair"):
        contrastive_batches(tokenizer, [("a", "b"), "just one string"])
    with pytest.raises(ValueError, match="data item 0 has keys \\['question'\\]"):
        contrastive_batches(tokenizer, [{"question": "q"}])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        contrastive_batches(tokenizer, PAIRS, batch_size=0)
    with pytest.raises(ValueError, match="read must be 'last' or 'answer'"):
        contrastive_batches(tokenizer, PAIRS, read="first")  # type: ignore[arg-type]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "answer_matching_behavior": "(A)"}]))
    with pytest.raises(ValueError, match="record 0 lacks answer_not_matching_behavior"):
        load_caa_json(bad)
    bad.write_text(json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match="JSON list of records"):
        load_caa_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        contrastive_batches(tokenizer, tmp_path / "missing.json")


def test_extract_reads_these_batches(tokenizer: Any) -> None:
    """tdsteer.extract consumes the batches as they are: last-token and per-example answer reads."""
    model = build("gpt2")
    sites = tdsteer_hf.sites(model, [0, -1])
    # GPT-2 has learned absolute positions: left-padded rows need position_ids to read as unpadded.
    left = contrastive_batches(tokenizer, TRIPLES, batch_size=2, padding_side="left", position_ids=True)
    assert left.fingerprint == contrastive_batches(tokenizer, TRIPLES).fingerprint
    right = contrastive_batches(tokenizer, TRIPLES, batch_size=3, padding_side="right")
    a = tdsteer.extract(model, left, sites, read="last", progress=False)
    b = tdsteer.extract(model, right, sites, read="last", progress=False)
    for site in sites:
        torch.testing.assert_close(a[site.key], b[site.key], rtol=1e-4, atol=1e-5)
    assert a.metadata["data_fingerprint"] == left.fingerprint
    # For triples the answer token is the last real token: read="index" equals read="last".
    answers = contrastive_batches(
        tokenizer, TRIPLES, batch_size=2, read="answer", padding_side="left", position_ids=True
    )
    c = tdsteer.extract(model, answers, sites, read="index", progress=False)
    for site in sites:
        torch.testing.assert_close(a[site.key], c[site.key], rtol=1e-4, atol=1e-5)
    # On CAA data the letter is not the last token: the reads differ.
    caa_last = tdsteer.extract(model, contrastive_batches(tokenizer, CAA), sites, read="last", progress=False)
    caa_letter = tdsteer.extract(
        model, contrastive_batches(tokenizer, CAA, read="answer"), sites, read="index", progress=False
    )
    assert not torch.allclose(caa_last[sites[-1].key], caa_letter[sites[-1].key])
