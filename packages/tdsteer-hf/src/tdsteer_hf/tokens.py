"""Tokenizer helpers for contrastive data: the chat-formatted prompt, token ids with character offsets,
and the token that holds a given character."""

from __future__ import annotations

from typing import Any


def chat_prefix(tokenizer: Any, user: str, system_prompt: str | None, template: str | None) -> str:
    """The chat-formatted prompt up to the start of the assistant's reply."""
    messages = [{"role": "user", "content": user}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception:
        if system_prompt is None:
            raise
        # Templates such as Gemma's refuse a system turn: fold it into the user turn.
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{user}"}]
        text = tokenizer.apply_chat_template(merged, chat_template=template, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected the formatted string")
    return text


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]
    encoding = tokenizer(text, add_special_tokens=add_special_tokens)
    return list(encoding["input_ids"]), None


def token_at(
    tokenizer: Any,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]] | None,
    char: int,
) -> int:
    """Index of the token that holds character ``char`` of ``text``."""
    if offsets is not None:
        covering = [t for t, (start, end) in enumerate(offsets) if start <= char < end]
        if covering:
            return covering[-1]
        before = [t for t, (start, end) in enumerate(offsets) if end > start and start <= char]
        if before:
            return before[-1]
    # No offsets (slow tokenizer): count the tokens of the text up to and including the character,
    # after the special tokens the tokenizer puts in front.
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    lead = next((k for k in range(len(ids) - len(plain) + 1) if ids[k : k + len(plain)] == plain), 0)
    head = tokenizer(text[: char + 1], add_special_tokens=False)["input_ids"]
    return min(lead + len(head) - 1, len(ids) - 1)
