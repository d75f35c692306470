"""Small local lm-eval tasks, written to disk so that evaluations run offline."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

DEMO_TASK = "tdsteer_demo_mc"

# Easy arithmetic and facts: a tiny multiple-choice set to exercise the machinery, not to measure a model.
DEMO_ITEMS: tuple[dict[str, Any], ...] = (
    {"question": "What is two plus two?", "choices": ["four", "five", "three"], "answer": 0},
    {"question": "What colour is a clear daytime sky?", "choices": ["green", "blue", "red"], "answer": 1},
    {"question": "How many legs does a cat have?", "choices": ["two", "six", "four"], "answer": 2},
    {"question": "Which is the largest?", "choices": ["an ant", "a whale", "a mouse"], "answer": 1},
    {"question": "What is the opposite of hot?", "choices": ["cold", "warm", "loud"], "answer": 0},
    {"question": "Which day comes after Monday?", "choices": ["Sunday", "Friday", "Tuesday"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "How many days are in a week?", "choices": ["five", "seven", "ten"], "answer": 1},
)

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _check_items(items: Sequence[Mapping[str, Any]]) -> None:
    if not items:
        raise ValueError("A multiple-choice task needs at least one item")
    for number, item in enumerate(items):
        where = f"item {number}"
        question, choices, answer = item.get("question"), item.get("choices"), item.get("answer")
        if not isinstance(question, str):
            raise ValueError(f"{where}: 'question' must be a string, got {question!r}")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least two strings, got {choices!r}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1})")


def write_multiple_choice_task(
    directory: str | os.PathLike[str],
    name: str,
    items: Iterable[Mapping[str, Any]],
    *,
    prompt: str = "Question: {{question}}\nAnswer:",
) -> Path:
    """Write an lm-eval multiple-choice task over a local JSONL file (no download needed).

    Writes ``{name}.jsonl`` and ``{name}.yaml`` into ``directory``. The task scores each choice by
    its loglikelihood after the prompt and reports accuracy (``acc``) and length-normalised
    accuracy (``acc_norm``). Load it with ``TaskManager(include_path=directory)``.

    Args:
        directory: Where to write the files (created if missing).
        name: Task name (letters, digits, underscores).
        items: Dicts ``{"question": str, "choices": [str, ...], "answer": index of the right choice}``.
        prompt: Jinja template of the prompt; the choices follow it after a space.

    Returns:
        Path of the task YAML file.

    Raises:
        ValueError: A bad name or item.

    Examples:
        >>> import tempfile
        >>> items = [{"question": "1+1?", "choices": ["2", "3"], "answer": 0}]
        >>> write_multiple_choice_task(tempfile.mkdtemp(), "my_task", items).name
        'my_task.yaml'
    """
    if not _NAME.match(name):
        raise ValueError(f"Task name {name!r} must contain only letters, digits and underscores")
    rows = [dict(item) for item in items]
    _check_items(rows)
    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    # JSON strings are valid YAML scalars: json.dumps quotes paths and templates safely.
    config = "\n".join(
        [
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data))}",
            "test_split: test",
            "output_type: multiple_choice",
            f"doc_to_text: {json.dumps(prompt)}",
            'doc_to_choice: "{{choices}}"',
            "doc_to_target: answer",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )
    path = folder / f"{name}.yaml"
    path.write_text(config, encoding="utf-8")
    return path


def write_demo_task(directory: str | os.PathLike[str]) -> Path:
    """Write the built-in demo task ``tdsteer_demo_mc`` (eight easy multiple-choice questions).

    Args:
        directory: Where to write ``tdsteer_demo_mc.yaml`` and ``tdsteer_demo_mc.jsonl``.

    Returns:
        Path of the task YAML file; pass its folder as ``include_path`` to :func:`tdsteer_eval.sweep`.

    Examples:
        >>> import tempfile
        >>> write_demo_task(tempfile.mkdtemp()).stem
        'tdsteer_demo_mc'
    """
    return write_multiple_choice_task(directory, DEMO_TASK, DEMO_ITEMS)
