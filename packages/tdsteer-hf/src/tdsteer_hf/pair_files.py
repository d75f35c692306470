"""Contrastive data files: JSON, JSON Lines or tab-separated pairs, as :func:`contrastive_batches` takes them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tdsteer_hf.data import CAA_KEYS

_TSV_HEADERS = (["positive", "negative"], ["prompt", "positive", "negative"])


def read_pairs(path: str | os.PathLike[str]) -> list[Any]:
    """Read a contrastive data file into records that :func:`tdsteer_hf.contrastive_batches` takes.

    ``.json``: a list of records; ``.jsonl``: one record a line; anything else (``.tsv``, ``.txt``)
    is read as JSON or JSON Lines when it starts with ``[`` or ``{``, else as tab-separated columns
    ``positive<TAB>negative`` or ``prompt<TAB>positive<TAB>negative`` (blank lines, ``#`` comments
    and a header row are skipped). Records are pairs, triples, ``{"positive", "negative"}`` or
    ``{"prompt", "positive", "negative"}`` objects, or CAA items.

    Args:
        path: The file.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is unreadable, malformed or holds no example (the message names the line).

    Examples:
        >>> import tempfile, pathlib
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "pairs.tsv"
        >>> _ = file.write_text("positive\\tnegative\\nI love it\\tI hate it\\n")
        >>> read_pairs(file)
        [('I love it', 'I hate it')]
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"pairs file {str(path)!r} does not exist")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read pairs file {str(path)!r}: {error}") from None
    suffix = file.suffix.lower()
    start = text.lstrip()[:1]
    records: list[Any]
    if suffix == ".jsonl" or (suffix != ".json" and start == "{"):
        records = _json_lines(text, path)
    elif suffix == ".json" or start == "[":
        try:
            data = json.loads(text) if text.strip() else []
        except RecursionError:
            raise ValueError(f"pairs file {str(path)!r} nests JSON too deeply to be a list of records") from None
        except json.JSONDecodeError as error:
            if start == "{" and "Extra data" in str(error):
                data = _json_lines(text, path)  # JSON Lines saved as .json
            else:
                raise ValueError(f"pairs file {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(data, list):
            raise ValueError(f"pairs file {str(path)!r} holds a JSON {type(data).__name__}; expected a list of records")
        records = data
    else:
        records = _tsv_rows(text, path)
    if not records:
        raise ValueError(f"pairs file {str(path)!r} is empty: it holds no contrastive examples")
    return records


def _json_lines(text: str, path: str | os.PathLike[str]) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except RecursionError:
            raise ValueError(f"pairs file {str(path)!r} line {number} nests JSON too deeply to be a record") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"pairs file {str(path)!r} line {number} is not valid JSON: {error}") from None
    return records


def _tsv_rows(text: str, path: str | os.PathLike[str]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = line.rstrip("\r\n").split("\t")
        if len(cells) not in (2, 3):
            raise ValueError(
                f"pairs file {str(path)!r} line {number} has {len(cells)} tab-separated columns; expected 2 "
                "(positive, negative) or 3 (prompt, positive, negative)"
            )
        if not rows and [cell.strip().lower() for cell in cells] in _TSV_HEADERS:
            continue
        rows.append(tuple(cells))
    return rows


def holds_caa_items(records: list[Any]) -> bool:
    """Whether every record is a CAA item (``question`` and the two answers), whose answer letter is
    where the behaviour shows (``read="answer"``), not the closing parenthesis after it.

    Examples:
        >>> holds_caa_items([{"question": "q", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}])
        True
        >>> holds_caa_items([("I love it", "I hate it")])
        False
    """
    return bool(records) and all(isinstance(r, dict) and all(key in r for key in CAA_KEYS) for r in records)
