"""The lm-eval tasks shipped with tdsteer-eval, and the loaders that read their local data files.

Three tasks live in ``tdsteer_eval/lm_tasks`` (package data, on the include path of ``tdsteer eval``
and ``tdsteer sweep``), each with a small sample data file so that it runs offline as it is:

=======================  ==============================================  ==================
task                     data                                            data key
=======================  ==============================================  ==================
``tdsteer_caa_ab``       CAA A/B JSON (Rimsky et al.): a list of          ``caa_path``
                         ``question`` / ``answer_matching_behavior`` /
                         ``answer_not_matching_behavior`` records
``tdsteer_mwe``          model-written-evals JSONL (Perez et al.):        ``mwe_path``
                         free-text answers (``" Yes"`` / ``" No"``)
``tdsteer_perplexity``   a UTF-8 text file: one document per paragraph    ``text_path``
                         (blank-line separated), or one per line when
                         the file has no blank line between texts
=======================  ==============================================  ==================

Point a task at your own file with lm-eval's ``--metadata '{"caa_path": "refusal.json"}'`` (or
``TaskManager(metadata=...)``), or with ``dataset_kwargs: {data_files: PATH}`` in a YAML that
``include:``-s the shipped one. The two behaviour tasks score the matching answer as choice 0
against the non-matching one, so ``acc`` is the rate of matching behaviour and the per-item
propensity is ``log p(matching) - log p(non-matching)``.

The documents of ``tdsteer_perplexity`` are scored one by one (each from the start, after the
end-of-text token), and ``limit`` counts them. A file with a blank line anywhere between texts is
split into paragraphs at blank lines (a paragraph may span several lines); a file with no blank line
between texts holds one document per line (the demo's ``neutral_heldout.txt``: 200 reviews, one a
line). The metadata key ``text_split`` (``"paragraph"`` or ``"line"``) overrides the guess, for
example to score a file of one multi-line document without blank lines as one document.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
SAMPLES_DIR = TASKS_DIR / "data"

#: Shipped task -> (metadata key of its data file, the sample file used without one).
SHIPPED_TASKS: dict[str, tuple[str, Path]] = {
    "tdsteer_caa_ab": ("caa_path", SAMPLES_DIR / "caa_sample.json"),
    "tdsteer_mwe": ("mwe_path", SAMPLES_DIR / "mwe_sample.jsonl"),
    "tdsteer_perplexity": ("text_path", SAMPLES_DIR / "sample.txt"),
}
# lm-eval logs, for every task read through custom_dataset, that "--metadata='{"max_seq_lengths": ...}'"
# passes custom keywords: advice meant for its RULER tasks. The shipped tasks document their own keys.
logging.getLogger("lm_eval.api.task").addFilter(lambda record: "Custom kwargs can be passed" not in record.getMessage())

#: Shipped tasks whose items are an A/B pair: matching answer (choice 0) vs non-matching (choice 1).
BEHAVIOUR_TASKS = ("tdsteer_caa_ab", "tdsteer_mwe")
#: Values of the ``text_split`` metadata key of ``tdsteer_perplexity`` (without it: see :func:`split_documents`).
TEXT_SPLITS = ("paragraph", "line")


class TaskDataError(ValueError):
    """A task data file that is missing or malformed (the message names the file and the record)."""


def data_path(task: str, options: Mapping[str, Any]) -> Path:
    """The data file a shipped task reads, given lm-eval's metadata and ``dataset_kwargs``.

    Args:
        task: A key of :data:`SHIPPED_TASKS`.
        options: The keywords lm-eval passes to the loader (metadata and ``dataset_kwargs``).

    Returns:
        ``data_files`` when given (a path, or ``{"test": path}``), else the task's metadata key,
        else the shipped sample.

    Examples:
        >>> data_path("tdsteer_caa_ab", {"caa_path": "~/refusal.json"}).name
        'refusal.json'
        >>> data_path("tdsteer_mwe", {}).name
        'mwe_sample.jsonl'
    """
    key, sample = SHIPPED_TASKS[task]
    files = options.get("data_files")
    if isinstance(files, Mapping):
        files = files.get("test", next(iter(files.values()), None))
    if isinstance(files, (list, tuple)):
        files = files[0] if files else None
    chosen = files or options.get(key)
    return Path(str(chosen)).expanduser() if chosen else sample


def check_data_file(task: str, options: Mapping[str, Any]) -> Path:
    """Check the data file of a shipped task: it exists and every record reads (no model needed).

    Returns:
        The file.

    Raises:
        TaskDataError: Missing or malformed.
    """
    path = data_path(task, options)
    _read(task, path, options.get("text_split"))
    return path


def split_documents(text: str, split: str | None = None) -> list[str]:
    r"""The documents of a text file: its paragraphs, or its lines when no blank line separates texts.

    Args:
        text: The file's text.
        split: ``"paragraph"`` (blank-line separated), ``"line"`` (one document a line), or
            ``None``: paragraphs when a blank line separates two texts, else lines.

    Returns:
        The documents, stripped, without empty ones.

    Raises:
        ValueError: ``split`` is not one of :data:`TEXT_SPLITS`.

    Examples:
        >>> split_documents("one review .\nanother review .\n")
        ['one review .', 'another review .']
        >>> split_documents("A paragraph\non two lines.\n\nAnother one.")
        ['A paragraph\non two lines.', 'Another one.']
        >>> split_documents("A document\non two lines.", "paragraph")
        ['A document\non two lines.']
    """
    if split is not None and split not in TEXT_SPLITS:
        raise ValueError(f"text_split {split!r} is not one of {', '.join(map(repr, TEXT_SPLITS))}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = [part.strip() for part in re.split(r"\n[ \t]*\n", text) if part.strip()]
    if split == "paragraph" or (split is None and len(paragraphs) > 1):
        return paragraphs
    return [line.strip() for line in text.split("\n") if line.strip()]


def _read(task: str, path: Path, split: Any = None) -> list[dict[str, Any]]:
    if not path.is_file():
        key = SHIPPED_TASKS[task][0]
        raise TaskDataError(f"task {task}: data file {str(path)!r} does not exist (metadata key {key!r})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise TaskDataError(f"task {task}: cannot read {str(path)!r}: {error}") from None
    if task == "tdsteer_perplexity":
        if split is not None and split not in TEXT_SPLITS:
            raise TaskDataError(f"task {task}: text_split {split!r} is not one of {', '.join(map(repr, TEXT_SPLITS))}")
        docs = split_documents(text, split)
        if not docs:
            raise TaskDataError(f"task {task}: {str(path)!r} holds no text")
        return [{"text": doc} for doc in docs]
    return [_pair(task, path, number, record) for number, record in enumerate(_records(task, path, text))]


def _records(task: str, path: Path, text: str) -> list[Any]:
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            data = json.loads(text)
            return list(data) if isinstance(data, list) else [data]
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise TaskDataError(f"task {task}: {str(path)!r} is not JSON or JSON Lines: {error}") from None


def _answer(value: Any) -> str | None:
    if isinstance(value, list) and value:  # some model-written evals list several non-matching answers
        value = value[0]
    return value if isinstance(value, str) and value.strip() else None


def _pair(task: str, path: Path, number: int, record: Any) -> dict[str, Any]:
    """One A/B item: ``prompt``, ``matching`` and ``not_matching`` (answers start with a space)."""
    where = f"task {task}: {str(path)!r} record {number}"
    if not isinstance(record, Mapping):
        raise TaskDataError(f"{where} is not an object")
    question = record.get("question")
    matching = _answer(record.get("answer_matching_behavior"))
    not_matching = _answer(record.get("answer_not_matching_behavior"))
    if not isinstance(question, str) or matching is None or not_matching is None:
        raise TaskDataError(
            f"{where} needs 'question', 'answer_matching_behavior' and 'answer_not_matching_behavior' strings"
        )
    prompt = question.rstrip()
    if not prompt.endswith("Answer:"):
        prompt += "\n\nAnswer:"
    return {
        "prompt": prompt,
        "matching": " " + matching.strip(),
        "not_matching": " " + not_matching.strip(),
    }


def _dataset(task: str, options: Mapping[str, Any]) -> datasets.DatasetDict:
    rows = _read(task, data_path(task, options), options.get("text_split"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_caa(**options: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``tdsteer_caa_ab``: a CAA A/B JSON file (``caa_path``)."""
    return _dataset("tdsteer_caa_ab", options)


def load_mwe(**options: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``tdsteer_mwe``: a model-written-evals JSONL file (``mwe_path``)."""
    return _dataset("tdsteer_mwe", options)


def load_text(**options: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``tdsteer_perplexity``: a text file (``text_path``), one
    document per paragraph (blank-line separated), or one per line in a file without blank lines
    between texts (``text_split``: ``"paragraph"`` or ``"line"`` to choose; see :func:`split_documents`)."""
    return _dataset("tdsteer_perplexity", options)


def include_paths(extra: str | os.PathLike[str] | list[Any] | tuple[Any, ...] | None = None) -> list[str]:
    """The shipped tasks' folder followed by ``extra`` folders (``os.pathsep``-separated strings too).

    Examples:
        >>> include_paths()[0] == str(TASKS_DIR)
        True
    """
    paths = [str(TASKS_DIR)]
    items = [] if extra is None else list(extra) if isinstance(extra, (list, tuple)) else [extra]
    for item in items:
        for part in str(item).split(os.pathsep):
            if part and str(Path(part).expanduser().resolve()) not in paths:
                paths.append(str(Path(part).expanduser().resolve()))
    return paths
