"""What one model call tells a steering context's position tracker, read from its arguments' shapes and
from the cache object, never from a tensor's values: how many tokens the cache already holds, each
row's leading padding, the number of rows; and the check of caller-given per-row starts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def past_length(cache: Any) -> int | Tensor:
    """Number of tokens already held by a KV cache object (0 for ``None``).

    A cache that reports its length as a tensor (Hugging Face's static cache) gets a copy of that
    tensor back, never a host int: reading it would synchronise with the device, and the cache
    updates its own tensor in place during the call.
    """
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is not None:
        length = get()
        return length.clone() if isinstance(length, Tensor) else int(length)
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        first = cache[0][0]
        if isinstance(first, Tensor):
            return int(first.shape[-2])
    return 0


def leading_padding(attention_mask: Tensor) -> Tensor:
    """Per-row count of padding tokens before the first real token: ``[B]``."""
    return (attention_mask.cumsum(-1) == 0).sum(-1)


def call_rows(kwargs: dict[str, Any]) -> int | None:
    """The number of batch rows of a model call, from its inputs' shapes (no tensor is read); ``None``
    when no input says (inputs passed positionally, or a model with other input names)."""
    for name in ("input_ids", "inputs_embeds", "attention_mask"):
        value = kwargs.get(name)
        if isinstance(value, Tensor) and value.ndim >= 2:
            return value.shape[0]
    return None


def expand_rows(per_prompt: Tensor, rows: int | None) -> Tensor:
    """Per-prompt values ``[B]`` repeated for a call of ``rows`` rows that holds ``rows // B`` rows of
    each prompt next to each other, as ``generate`` lays out beams and ``num_return_sequences``.

    Raises:
        ValueError: ``rows`` is not a multiple of ``B``.

    Examples:
        >>> expand_rows(torch.tensor([3, 0]), 4)
        tensor([3, 3, 0, 0])
        >>> expand_rows(torch.tensor([3, 0]), None)  # the call's rows are unknown: as given
        tensor([3, 0])
    """
    prompts = per_prompt.shape[0]
    if rows is None or rows == prompts:
        return per_prompt
    if prompts == 0 or rows % prompts:
        raise ValueError(
            f"generate was given {prompts} prompt rows but the model is called with {rows} rows, which is not "
            f"{prompts} rows repeated: positions='from:k' and per-position vectors count each row's positions from "
            "its first real token (its prompt's padding), so each row must belong to one prompt"
        )
    return per_prompt.unsqueeze(-1).expand(prompts, rows // prompts).reshape(rows)


def check_starts(starts: Tensor | None) -> None:
    """Raise ``ValueError`` unless ``starts`` is ``None`` or a 1-D integer tensor (per-row starts)."""
    if starts is not None and (
        not isinstance(starts, Tensor)
        or starts.ndim != 1
        or starts.dtype.is_floating_point
        or starts.dtype.is_complex
        or starts.dtype == torch.bool
    ):
        shown = f"a {starts.dtype} tensor of shape {tuple(starts.shape)}" if isinstance(starts, Tensor) else starts
        raise ValueError(f"starts must be a 1-D integer tensor with one position per batch row, got {shown}")
