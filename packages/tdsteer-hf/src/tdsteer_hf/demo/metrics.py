"""What the demo measures across steering scales: steered text, A/B propensity and perplexity.

Each function runs every scale in one batch where it can (one row per input and scale, the scales
given to :func:`tdsteer.steer` as a per-row tensor), so a sweep costs one call. Pass ``vector=None``
to measure the unsteered model.

Examples:
    >>> import tdsteer, tdsteer_hf
    >>> from tdsteer_hf.demo import data_path, load_demo_model
    >>> model, tokenizer = load_demo_model()
    >>> items = tdsteer_hf.load_caa_json(data_path("ab"))[:4]
    >>> values = propensities(model, tokenizer, items)
    >>> tuple(values.shape)
    (1, 4)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

import tdsteer
from tdsteer.extraction import model_device
from tdsteer_hf.data import CAA_SEPARATOR


def _steered(model: nn.Module, vector: Any, scales: torch.Tensor, positions: str) -> Any:
    if vector is None:
        return nullcontext(model)
    return tdsteer.steer(model, vector, scale=scales, positions=positions, check="ignore")


def _pad_right(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids, mask


def _chunks(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(count, start + size))


def _device(model: nn.Module) -> torch.device:
    device = model_device(model)  # where inputs go: accelerate's execution device for an offloaded model
    return device if device is not None else torch.device("cpu")


def generations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    vector: Any = None,
    scales: Sequence[float] = (0.0,),
    max_new_tokens: int = 24,
    positions: str = "all",
) -> dict[float, list[str]]:
    """Greedy continuations of ``prompts`` at each scale, in one left-padded ``generate`` call.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (needs a pad or eos token).
        prompts: Texts to continue.
        vector: Steering vector (a :class:`tdsteer.SteeringVector` or mapping); ``None``: unsteered.
        scales: Multipliers of the vector.
        max_new_tokens: Tokens to generate.
        positions: Steered positions (see :func:`tdsteer.steer`).

    Returns:
        ``{scale: [continuation of each prompt]}``, the new text only.
    """
    rows = [prompt for prompt in prompts for _ in scales]
    row_scales = torch.tensor([float(scale) for _ in prompts for scale in scales], dtype=torch.float32)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(rows, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = _device(model)
    inputs = {key: encoded[key].to(device) for key in ("input_ids", "attention_mask")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), _steered(model, vector, row_scales.to(device), positions):
        output = model.generate(  # type: ignore[operator]
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        float(scale): [str(texts[p * len(scales) + s]) for p in range(len(prompts))] for s, scale in enumerate(scales)
    }


def _answer_rows(tokenizer: Any, item: dict[str, str]) -> tuple[list[int], int, int]:
    """Token ids before the first token where the two answers differ, and those two tokens."""
    matching = tokenizer(item["question"] + CAA_SEPARATOR + item["answer_matching_behavior"])["input_ids"]
    other = tokenizer(item["question"] + CAA_SEPARATOR + item["answer_not_matching_behavior"])["input_ids"]
    common = 0
    while common < min(len(matching), len(other)) and matching[common] == other[common]:
        common += 1
    if common in (0, len(matching), len(other)):
        raise ValueError(f"the two answers of item {item['question'][:40]!r}... do not differ in a token")
    return list(matching[:common]), int(matching[common]), int(other[common])


def propensities(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, str]],
    *,
    vector: Any = None,
    scales: Sequence[float] = (0.0,),
    positions: str = "all",
    batch_size: int = 128,
) -> torch.Tensor:
    """Propensity of each CAA item at each scale: log p(matching answer) - log p(other answer).

    The text is ``question + "\\n\\nAnswer: " + answer``, as :func:`tdsteer_hf.contrastive_batches`
    writes it; both log-probabilities are read at the first token where the two answers differ
    (the letter of ``"(A)"`` / ``"(B)"``), in one forward pass over the shared prefix.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        items: CAA records (``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior``).
        vector: Steering vector; ``None``: unsteered.
        scales: Multipliers of the vector.
        positions: Steered positions of the prompt (see :func:`tdsteer.steer`).
        batch_size: Rows per forward pass.

    Returns:
        A float tensor ``[len(scales), len(items)]``.
    """
    answers = [_answer_rows(tokenizer, item) for item in items]
    rows = [(answer, float(scale)) for scale in scales for answer in answers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(model)
    values: list[torch.Tensor] = []
    for part in _chunks(len(rows), batch_size):
        chunk = rows[part]
        ids, mask = _pad_right([answer[0] for answer, _ in chunk], pad)
        row_scales = torch.tensor([scale for _, scale in chunk], dtype=torch.float32, device=device)
        with torch.no_grad(), _steered(model, vector, row_scales, positions):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = mask.sum(dim=1).to(device) - 1
        logprobs = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), dim=-1)
        good = torch.tensor([answer[1] for answer, _ in chunk], device=device)
        bad = torch.tensor([answer[2] for answer, _ in chunk], device=device)
        values.append((logprobs.gather(1, good[:, None]) - logprobs.gather(1, bad[:, None]))[:, 0].cpu())
    return torch.cat(values).reshape(len(scales), len(items))


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    vector: Any = None,
    scale: float = 0.0,
    positions: str = "all",
    batch_size: int = 64,
) -> float:
    """Perplexity of ``texts`` (each followed by eos), all tokens after the first of each text pooled.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        texts: The texts.
        vector: Steering vector; ``None``: unsteered.
        scale: Multiplier of the vector.
        positions: Steered positions (see :func:`tdsteer.steer`).
        batch_size: Texts per forward pass.

    Returns:
        ``exp`` of the mean negative log-likelihood per predicted token.
    """
    eos = tokenizer.eos_token_id
    rows = [list(tokenizer(text)["input_ids"]) + ([eos] if eos is not None else []) for text in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = _device(model)
    total, count = 0.0, 0
    for part in _chunks(len(rows), batch_size):
        ids, mask = _pad_right(rows[part], pad)
        ids, mask = ids.to(device), mask.to(device)
        row_scales = torch.full((len(ids),), float(scale), device=device)
        with torch.no_grad(), _steered(model, vector, row_scales, positions):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int(mask[:, 1:].sum())
    return math.exp(total / count)
