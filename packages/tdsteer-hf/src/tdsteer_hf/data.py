"""Contrastive text data: tokenised positive / negative batches in the format ``tdsteer.extract`` reads.

Each batch is a dict::

    {
        "positive": {"input_ids": LongTensor[B, L1], "attention_mask": LongTensor[B, L1]},
        "negative": {"input_ids": LongTensor[B, L2], "attention_mask": LongTensor[B, L2]},
        # with read="answer" only:
        "positive_index": LongTensor[B],
        "negative_index": LongTensor[B],
    }

Positive and negative halves are padded separately, so their lengths may differ. An index counts
within a row's real (non-padding) tokens: ``0`` is the first real token, whatever the padding side.
Left-padded halves also carry ``position_ids`` (see :func:`contrastive_batches`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tdsteer_hf.model_inputs import TextTooLongError, accepts_position_ids, position_limit, wants_position_ids
from tdsteer_hf.tokens import chat_prefix, encode, token_at

Read = Literal["last", "answer"]
CAA_KEYS: tuple[str, str, str] = ("question", "answer_matching_behavior", "answer_not_matching_behavior")

#: Without a chat template, a CAA item becomes ``question + CAA_SEPARATOR + answer``.
CAA_SEPARATOR = "\n\nAnswer: "

Batch = dict[str, Any]


@dataclass(frozen=True)
class _Example:
    """One contrastive example before formatting.

    ``prompt`` is ``None`` for a plain pair (the two texts are complete). ``answer`` tells where the
    answer token is in a completion: ``"letter"`` (first letter or digit, CAA) or ``"last"`` (last
    non-space character of the completion, triples). ``separator`` joins prompt and completion
    without a chat template.
    """

    prompt: str | None
    positive: str
    negative: str
    answer: Literal["letter", "last"] | None
    separator: str = ""


def load_caa_json(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a CAA-style A/B dataset: a JSON list (or JSON Lines) of question / answer records.

    Each record has ``question`` (ending with the choices, e.g. ``"... Choices:\\n (A) Yes\\n (B) No"``),
    ``answer_matching_behavior`` and ``answer_not_matching_behavior`` (e.g. ``"(A)"``). Other keys
    are kept.

    Args:
        path: Path of a ``.json`` file holding a list, or of a ``.jsonl`` file with one record a line.

    Returns:
        The records, as dicts.

    Raises:
        ValueError: The file is not a list of records, or a record lacks a key or has a non-string value.

    Examples:
        >>> import json, tempfile
        >>> item = {"question": "Q? (A) yes (B) no", "answer_matching_behavior": "(A)",
        ...         "answer_not_matching_behavior": "(B)"}
        >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        ...     json.dump([item], f)
        >>> load_caa_json(f.name)[0]["answer_matching_behavior"]
        '(A)'
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"CAA dataset {str(file)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        records: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON ({error}); CAA data is a JSON list or a .jsonl file") from None
    if not isinstance(records, list):
        raise ValueError(f"{file} holds a {type(records).__name__}; a CAA dataset is a JSON list of records")
    for number, record in enumerate(records):
        _check_caa(record, f"{file} record {number}")
    return [dict(record) for record in records]


def _check_caa(record: Any, where: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record with keys {', '.join(CAA_KEYS)}")
    missing = [key for key in CAA_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}; a CAA record has {', '.join(CAA_KEYS)}")
    for key in CAA_KEYS:
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {type(record[key]).__name__}")


def _examples(data: Any) -> list[_Example]:
    if isinstance(data, (str, os.PathLike)):
        data = load_caa_json(data)
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be a list of (positive, negative) pairs, (prompt, positive, negative) triples, "
            f"CAA records or a path to a CAA JSON file; got {type(data).__name__}"
        )
    examples: list[_Example] = []
    for number, item in enumerate(data):
        where = f"data item {number}"
        if isinstance(item, Mapping):
            if all(key in item for key in CAA_KEYS):
                _check_caa(item, where)
                examples.append(
                    _Example(
                        item["question"],
                        item["answer_matching_behavior"],
                        item["answer_not_matching_behavior"],
                        "letter",
                        CAA_SEPARATOR,
                    )
                )
                continue
            if "positive" in item and "negative" in item:
                values = (item.get("prompt"), item["positive"], item["negative"])
                if not (isinstance(values[1], str) and isinstance(values[2], str)) or not (
                    values[0] is None or isinstance(values[0], str)
                ):
                    kinds = ", ".join(
                        f"{key} is {type(v).__name__}" for key, v in zip(("prompt", "positive", "negative"), values)
                    )
                    raise ValueError(
                        f"{where}: positive and negative must be strings, and prompt a string if given ({kinds})"
                    )
                prompt = values[0]
                answer: Literal["last"] | None = "last" if prompt is not None else None
                examples.append(_Example(prompt, values[1], values[2], answer))
                continue
            raise ValueError(
                f"{where} has keys {sorted(item)}; expected CAA keys ({', '.join(CAA_KEYS)}) or "
                "'positive' and 'negative' (with an optional 'prompt')"
            )
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3):
            if not all(isinstance(v, str) for v in item):
                raise ValueError(f"{where}: every element must be a string, got {[type(v).__name__ for v in item]}")
            if len(item) == 2:
                examples.append(_Example(None, item[0], item[1], None))
            else:
                examples.append(_Example(item[0], item[1], item[2], "last"))
            continue
        raise ValueError(
            f"{where} is {item!r:.80}; expected a (positive, negative) pair, a (prompt, positive, negative) "
            "triple or a CAA record"
        )
    if not examples:
        raise ValueError("data is empty: give at least one contrastive example")
    return examples


def _answer_offset(completion: str, answer: Literal["letter", "last"], where: str) -> int:
    """Character offset of the answer inside ``completion``."""
    if answer == "letter":
        match = re.search(r"[A-Za-z0-9]", completion)
        if match is None:
            raise ValueError(f"{where}: answer {completion!r} has no letter or digit to read at")
        return match.start()
    stripped = completion.rstrip()
    if not stripped:
        raise ValueError(f"{where}: the completion is empty, there is no answer token to read at")
    return len(stripped) - 1


class ContrastiveBatches:
    """Re-iterable, pre-tokenised contrastive batches; pass it to ``tdsteer.extract``.

    Built by :func:`contrastive_batches`. Iterating yields fresh tensors each time, so the object can
    be read several times (several extraction methods, several epochs).

    Attributes:
        count: Number of contrastive examples.
        batch_size: Examples per batch (the last batch may be smaller).
        read: ``"last"`` or ``"answer"``.
        padding_side: ``"left"`` or ``"right"``.
        position_ids: Whether each half carries ``position_ids`` (counted from its first real token).
        texts: The formatted ``(positive, negative)`` texts, chat template applied.
        fingerprint: SHA-256 hex digest of ``texts`` (and the answer indices with ``read="answer"``),
            for the steering vector's dataset metadata.
    """

    def __init__(
        self,
        texts: list[tuple[str, str]],
        tokens: list[tuple[list[int], list[int]]],
        indices: list[tuple[int, int]] | None,
        *,
        batch_size: int,
        read: Read,
        padding_side: Literal["left", "right"],
        pad_token_id: int,
        position_ids: bool = False,
    ) -> None:
        self.texts = texts
        self._tokens = tokens
        self._indices = indices
        self.batch_size = batch_size
        self.read = read
        self.padding_side = padding_side
        self.pad_token_id = pad_token_id
        self.position_ids = position_ids
        digest = hashlib.sha256()
        digest.update(json.dumps(texts, ensure_ascii=False).encode("utf-8"))
        if indices is not None:
            digest.update(json.dumps(indices).encode("utf-8"))
        self.fingerprint = digest.hexdigest()

    @property
    def count(self) -> int:
        """Number of contrastive examples."""
        return len(self._tokens)

    @property
    def longest(self) -> int:
        """Tokens in the longest positive or negative text (what the model's positions must hold)."""
        return max((max(len(pos), len(neg)) for pos, neg in self._tokens), default=0)

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def __repr__(self) -> str:
        return (
            f"ContrastiveBatches(count={self.count}, batch_size={self.batch_size}, read={self.read!r}, "
            f"padding_side={self.padding_side!r}, fingerprint={self.fingerprint[:12]!r})"
        )

    def _pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = width - len(row) if self.padding_side == "left" else 0
            ids[r, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, start : start + len(row)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.position_ids:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        return inputs

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, self.count, self.batch_size):
            chunk = self._tokens[start : start + self.batch_size]
            batch: Batch = {
                "positive": self._pad([pos for pos, _ in chunk]),
                "negative": self._pad([neg for _, neg in chunk]),
            }
            if self._indices is not None:
                picked = self._indices[start : start + self.batch_size]
                batch["positive_index"] = torch.tensor([p for p, _ in picked], dtype=torch.long)
                batch["negative_index"] = torch.tensor([n for _, n in picked], dtype=torch.long)
            yield batch


def contrastive_batches(
    tokenizer: Any,
    data: Any,
    *,
    batch_size: int = 16,
    read: Read = "last",
    padding_side: Literal["left", "right"] | None = None,
    chat_template: bool | str = False,
    max_length: int | None = None,
    system_prompt: str | None = None,
    position_ids: bool | None = None,
    model: nn.Module | None = None,
) -> ContrastiveBatches:
    """Tokenise contrastive examples into positive / negative batches for ``tdsteer.extract``.

    Accepted ``data``:

    * ``(positive, negative)`` pairs of complete texts;
    * ``(prompt, positive_completion, negative_completion)`` triples, or dicts with ``prompt``,
      ``positive`` and ``negative``; the text is ``prompt + completion`` (spacing is yours);
    * CAA A/B records (dicts with ``question``, ``answer_matching_behavior``,
      ``answer_not_matching_behavior``) or a path to a CAA ``.json`` / ``.jsonl`` file; the text is
      ``question + "\\n\\nAnswer: " + answer`` (:data:`CAA_SEPARATOR`).

    With a chat template, the prompt (or the whole text of a pair) becomes the user turn, the
    generation prompt is added, and the completion follows as the start of the assistant's reply.

    Args:
        tokenizer: A Hugging Face tokenizer (fast tokenizers use offsets to find answer tokens).
        data: The examples, as above.
        batch_size: Examples per batch.
        read: ``"last"`` (no index: ``extract`` reads the last real token) or ``"answer"``: each batch
            carries ``positive_index`` / ``negative_index``, the answer token counted from the first
            real token (read them with ``tdsteer.extract(..., read="index")``). For CAA records the
            answer token is the one holding the letter of ``"(A)"``; for triples it is the last
            token of the completion. Pairs have no answer.
        padding_side: ``"left"`` or ``"right"``. ``None`` pads on the right, whatever
            ``tokenizer.padding_side`` says (it is set for generation, often to ``"left"``): right
            padding leaves every real token at the position it has unpadded, on every architecture
            (learned absolute positions, rotary, ALiBi, recurrent), so the vector does not depend on
            the padding.
        chat_template: ``True`` to apply the tokenizer's chat template, a string to apply that Jinja
            template, ``False`` for plain text.
        max_length: Keep at most this many tokens per text, dropping tokens from the *start* so
            the answer and last tokens survive. With ``model=``, a text still longer than the
            model's positions raises :class:`TextTooLongError`.
        system_prompt: A system turn added before the user turn (needs a chat template; merged
            into the user turn when the template refuses system messages).
        position_ids: Add ``position_ids`` (counted from each row's first real token, as
            ``generate`` makes them) to both halves. Models with learned absolute positions (GPT-2,
            BERT, GPT-Neo) need them to read a left-padded row as they read it unpadded; rotary models
            read it the same with or without them. ``None`` (the default) adds them when padding on
            the left, and with ``model=`` only where the model needs them: its ``forward`` names
            ``position_ids`` (as ``generate`` checks) and it does not count positions from the token
            ids itself (RoBERTa, XLM-R and ESM do, offset by the pad id, and are shifted by 0-based
            ids). Without ``model=``, left padding of such a model, or of one whose ``forward``
            takes no ``position_ids``, needs ``position_ids=False``. ``True`` always adds them,
            ``False`` never.
        model: The model the batches are for (optional). With it, a text longer than its
            positions (:func:`position_limit`) raises :class:`TextTooLongError` here rather than an
            ``IndexError`` inside the model, and ``position_ids=None`` asks the model whether it
            needs them.

    Returns:
        A re-iterable :class:`ContrastiveBatches` with ``count``, ``fingerprint`` and ``len()``.

    Raises:
        ValueError: Malformed data, ``read="answer"`` with pairs, a chat template asked of a
            tokenizer without one, ``system_prompt`` without a chat template, an answer cut off by
            ``max_length``, or ``position_ids=True`` for a ``model`` whose forward takes none.
        TextTooLongError: A text (after ``max_length``) is longer than ``model``'s positions.

    Examples:
        >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
        >>> batches = contrastive_batches(tokenizer, [("I love it", "I hate it")], batch_size=8)  # doctest: +SKIP
        >>> batch = next(iter(batches))  # doctest: +SKIP
        >>> batch["positive"]["input_ids"].shape[0]  # doctest: +SKIP
        1
        >>> caa = [{"question": "Is it good? (A) Yes (B) No", "answer_matching_behavior": "(A)",  # doctest: +SKIP
        ...         "answer_not_matching_behavior": "(B)"}]
        >>> sorted(next(iter(contrastive_batches(tokenizer, caa, read="answer"))))  # doctest: +SKIP
        ['negative', 'negative_index', 'positive', 'positive_index']
        >>> answers = contrastive_batches(tokenizer, caa, read="answer")  # doctest: +SKIP
        >>> vector = tdsteer.extract(model, answers, sites, read="index")  # doctest: +SKIP
        >>> batches = contrastive_batches(tokenizer, long_texts, model=model, max_length=1024)  # doctest: +SKIP
    """
    if read not in ("last", "answer"):
        raise ValueError(f"read must be 'last' or 'answer', got {read!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    side = "right" if padding_side is None else padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    padding: Literal["left", "right"] = "left" if side == "left" else "right"
    if position_ids not in (None, True, False):
        raise ValueError(f"position_ids must be True, False or None (automatic), got {position_ids!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the model the batches are for), got {type(model).__name__}")
    if position_ids is None:
        positions = padding == "left" and (model is None or wants_position_ids(model))
    else:
        positions = position_ids
    if positions and model is not None and not accepts_position_ids(model):
        raise ValueError(
            f"position_ids=True, but {type(model).__name__}.forward takes no position_ids; "
            "pad on the right (the default) instead"
        )
    template: str | None = None
    use_chat = chat_template is not False
    if isinstance(chat_template, str):
        template = chat_template
    elif chat_template is True and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template=True but {type(tokenizer).__name__} has no chat template; set "
            "tokenizer.chat_template, pass the Jinja template as chat_template='...', or use chat_template=False"
        )
    if system_prompt is not None and not use_chat:
        raise ValueError(
            "system_prompt needs a chat template (chat_template=True); for plain text put it in the prompt"
        )

    examples = _examples(data)
    if read == "answer":
        unanswered = [n for n, example in enumerate(examples) if example.answer is None]
        if unanswered:
            raise ValueError(
                f"read='answer' needs an answer to point at, but data items {unanswered[:5]} are plain "
                "(positive, negative) pairs; give (prompt, positive, negative) triples or CAA records, "
                "or use read='last'"
            )

    texts: list[tuple[str, str]] = []
    tokens: list[tuple[list[int], list[int]]] = []
    indices: list[tuple[int, int]] = []
    for number, example in enumerate(examples):
        where = f"data item {number}"
        if example.prompt is None:
            prefix = ""
            completions = (example.positive, example.negative)
            if use_chat:
                completions = (
                    chat_prefix(tokenizer, example.positive, system_prompt, template),
                    chat_prefix(tokenizer, example.negative, system_prompt, template),
                )
        else:
            prefix = (
                chat_prefix(tokenizer, example.prompt, system_prompt, template)
                if use_chat
                else example.prompt + example.separator
            )
            completions = (example.positive, example.negative)
        row_tokens: list[list[int]] = []
        row_indices: list[int] = []
        for completion in completions:
            text = prefix + completion
            ids, offsets = encode(tokenizer, text, add_special_tokens=not use_chat)
            index = -1
            if read == "answer" and example.answer is not None:
                char = len(prefix) + _answer_offset(completion, example.answer, where)
                index = token_at(tokenizer, text, ids, offsets, char)
            if max_length is not None and len(ids) > max_length:
                cut = len(ids) - max_length
                ids = ids[cut:]
                if read == "answer":
                    index -= cut
                    if index < 0:
                        raise ValueError(
                            f"{where}: the answer token falls outside the last max_length={max_length} tokens; "
                            "raise max_length or shorten the prompt"
                        )
            if not ids:
                raise ValueError(f"{where}: the text {text!r:.60} tokenises to no tokens")
            row_tokens.append(ids)
            row_indices.append(index)
        texts.append((prefix + completions[0], prefix + completions[1]))
        tokens.append((row_tokens[0], row_tokens[1]))
        indices.append((row_indices[0], row_indices[1]))

    limit = position_limit(model) if model is not None else None
    if limit is not None:
        lengths = [max(len(pos), len(neg)) for pos, neg in tokens]
        longest = max(lengths)
        if longest > limit:
            raise TextTooLongError(longest, limit, lengths.index(longest))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return ContrastiveBatches(
        texts,
        tokens,
        indices if read == "answer" else None,
        batch_size=batch_size,
        read=read,
        padding_side=padding,
        pad_token_id=int(pad) if isinstance(pad, int) else 0,
        position_ids=positions,
    )
