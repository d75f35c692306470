"""Scoring loglikelihood requests with a per-row steering start, and finding the assistant turn.

lm-eval's ``HFLM._loglikelihood_tokens`` builds its batches out of reach of the model call, so a
steering start per row (``positions="continuation"`` or ``"assistant"``) cannot be handed to it.
:func:`score_requests` scores the same requests the same way (one right-padded row per distinct
input, log-softmax, the continuation's log-probabilities summed, greedy match), with each row's
start set on the open steering context before its batch runs. Requests that share their input and
their start share one row, as lm-eval shares one row between one-token continuations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

#: ``start_of(row, continuation_length) -> first steered position`` of one scored row.
StartOf = Callable[[list[int], int], int]
Request = tuple[Any, list[int], list[int]]  # (request strings or None, context tokens, continuation tokens)


def continuation_start(row: list[int], continuation_length: int) -> int:
    """First position whose output scores the continuation: the last context token.

    ``row`` is the model input, context plus continuation without its final token; its last
    ``continuation_length`` outputs score the continuation.

    Examples:
        >>> continuation_start([5, 6, 7, 8], 2)  # context 5 6 7, continuation 8 9
        2
    """
    return max(len(row) - continuation_length, 0)


def find_last(row: Sequence[int], marker: Sequence[int], stop: int) -> int | None:
    """Index of the last token of the last occurrence of ``marker`` in ``row[:stop]``, or ``None``.

    Examples:
        >>> find_last([1, 9, 8, 2, 9, 8, 3], [9, 8], stop=7)
        5
        >>> find_last([1, 9, 8, 2], [9, 8], stop=2) is None
        True
    """
    size = len(marker)
    if size == 0:
        return None
    for begin in range(min(stop, len(row)) - size, -1, -1):
        if list(row[begin : begin + size]) == list(marker):
            return begin + size - 1
    return None


def assistant_marker_ids(tokenizer: Any, marker: str | None = None) -> list[int]:
    """Token ids that end the user turn: where the assistant turn starts (the CAA protocol).

    Args:
        tokenizer: A Hugging Face tokenizer.
        marker: The text that opens the assistant turn (``"[/INST]"``); default: what the
            tokenizer's chat template adds after a user message with the generation prompt.

    Returns:
        The marker's token ids (no special tokens added).

    Raises:
        ValueError: No marker given and no chat template, or an empty marker.

    Examples:
        >>> from tdsteer_hf.tiny import word_tokenizer
        >>> tokenizer = word_tokenizer(["user says hi assistant says hello"])
        >>> tokenizer.chat_template = "{% for m in messages %}user {{ m.content }} {% endfor %}assistant"
        >>> tokenizer.decode(assistant_marker_ids(tokenizer))
        'assistant'
    """
    if marker is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "positions='assistant' needs a chat template (the tokenizer has none) or assistant_marker='...', "
                "the text that opens the assistant turn"
            )
        sentinel = "TDSTEERUSERTURN"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
        )
        marker = str(text)[str(text).rindex(sentinel) + len(sentinel) :]
    ids = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
    if not marker.strip() or not ids:
        raise ValueError(f"assistant marker {marker!r} is empty; pass assistant_marker='...' (e.g. '[/INST]')")
    return ids


def marker_start(row: list[int], stop: int, marker: list[int]) -> int | None:
    """First steered position of the assistant turn in ``row``: the marker's last token.

    The whole marker is looked for before ``stop``, then the marker without its first token (which
    may merge with the text before it).
    """
    found = find_last(row, marker, stop)
    if found is None and len(marker) > 1:
        found = find_last(row, marker[1:], stop)
    return found


def score_requests(
    lm: Any,
    requests: Sequence[Request],
    start_of: StartOf,
    set_starts: Callable[[Tensor | None], None],
    *,
    disable_tqdm: bool = False,
    override_bs: int | None = None,
) -> list[tuple[float, bool]]:
    """Loglikelihoods of ``requests`` as ``HFLM._loglikelihood_tokens`` computes them (causal models),
    each row steered from ``start_of(row, len(continuation))`` on.

    Args:
        lm: An ``HFLM`` (its ``_model_call``, ``max_length``, ``batch_size``, ``device``...).
        requests: ``(request strings, context tokens, continuation tokens)`` as lm-eval passes them.
        start_of: The first steered position of a row.
        set_starts: Sets the per-row starts ``[B]`` of the open steering context (``None`` clears).
        disable_tqdm: No progress bar.
        override_bs: Batch size to use instead of ``lm.batch_size``.

    Returns:
        ``(loglikelihood, is_greedy)`` per request, in request order.

    Examples:
        >>> with lm._steered():  # a SteeredLM with positions="continuation" does this  # doctest: +SKIP
        ...     scores = score_requests(lm, requests, continuation_start, lm._set_starts)
    """
    groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for index, (_, context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError("lm-eval scores a non-empty continuation after a non-empty context")
        row = tuple((context + continuation)[-(lm.max_length + 1) :][:-1])
        groups.setdefault((row, start_of(list(row), len(continuation))), []).append(index)
    order = sorted(groups, key=lambda key: (-len(key[0]), key[0], key[1]))  # longest first, as lm-eval
    size = override_bs or lm.batch_size
    if not isinstance(size, int):  # "auto": the largest batch the longest row fits in
        size = lm._detect_batch_size()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm or lm.rank != 0, desc="Running loglikelihood requests")
    try:
        for first in range(0, len(order), max(int(size), 1)):
            keys = order[first : first + max(int(size), 1)]
            width = len(keys[0][0])
            batch = torch.zeros(len(keys), width, dtype=torch.long)
            for number, (row, _) in enumerate(keys):
                batch[number, : len(row)] = torch.tensor(row, dtype=torch.long)
            set_starts(torch.tensor([start for _, start in keys], dtype=torch.long, device=lm.device))
            logits = F.log_softmax(lm._model_call(batch.to(lm.device)), dim=-1, dtype=lm.softmax_dtype)
            for number, key in enumerate(keys):
                end = len(key[0]) + (logits.shape[1] - width)  # past any virtual tokens, before the padding
                for index in groups[key]:
                    strings, _, continuation = requests[index]
                    wanted = torch.tensor(continuation, dtype=torch.long, device=logits.device)
                    picked = logits[number, end - len(continuation) : end]
                    answer = (
                        float(picked.gather(-1, wanted.unsqueeze(-1)).sum()),
                        bool((picked.argmax(-1) == wanted).all()),
                    )
                    results[index] = answer
                    if strings is not None:
                        lm.cache_hook.add_partial("loglikelihood", strings, answer)
                    bar.update(1)
    finally:
        set_starts(None)
        bar.close()
    return results
