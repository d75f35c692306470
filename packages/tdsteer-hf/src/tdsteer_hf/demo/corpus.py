"""The demo data files: contrastive pairs, an A/B task, held-out neutral text and prompts.

``python -m tdsteer_hf.demo.corpus --out DIR --seed 0`` writes the files that ship in
``tdsteer_hf/demo/data`` (:data:`tdsteer_hf.demo.DATA_FILES`); each comes from its own
:class:`~tdsteer_hf.demo.language.Grammar` stream (seed ``"{seed}:pairs"``, ``"{seed}:ab"``,
``"{seed}:heldout"``), independent of the training stream (``"{seed}:train"``), and the training
script skips every held-out document.

Examples:
    >>> pairs(seed=0, count=1)[0]["negative"]
    'the bed was old . i thought the staff was terrible .'
    >>> [item["answer_matching_behavior"] for item in ab_items(seed=0, count=4)]
    ['(A)', '(B)', '(A)', '(B)']
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tdsteer_hf.demo import DATA_FILES
from tdsteer_hf.demo.language import Grammar

PAIRS, AB_ITEMS, HELDOUT = 200, 100, 200

#: Openings to continue under steering: each stops where the next word judges, some after a neutral sentence.
PROMPTS: tuple[str, ...] = (
    "the film was",
    "the soup was",
    "the hotel was",
    "i thought the cafe was",
    "my friend said the novel was",
    "i ate the pasta on monday . it was",
    "we visited the museum last summer . the guide was",
    "i heard the band on friday . the singer was",
)


def pairs(seed: int = 0, count: int = PAIRS) -> list[dict[str, str]]:
    """Contrastive pairs: the positive and negative version of the same short text.

    Args:
        seed: Data seed.
        count: Number of pairs.

    Returns:
        Records ``{"positive": ..., "negative": ...}``, as :func:`tdsteer_hf.read_pairs` returns them.
    """
    grammar = Grammar(f"{seed}:pairs")
    records = []
    for _ in range(count):
        positive, negative = grammar.pair()
        records.append({"positive": positive, "negative": negative})
    return records


def ab_items(seed: int = 0, count: int = AB_ITEMS) -> list[dict[str, str]]:
    """A/B items in the CAA format: a neutral review, then which of a positive and a negative answer.

    ``answer_matching_behavior`` is the positive answer; it is ``"(A)"`` for even items and ``"(B)"``
    for odd ones, so the letters are balanced.

    Args:
        seed: Data seed.
        count: Number of items.

    Returns:
        Records ``{"question", "answer_matching_behavior", "answer_not_matching_behavior"}``.
    """
    grammar = Grammar(f"{seed}:ab")
    return [grammar.ab_item(positive_first=index % 2 == 0) for index in range(count)]


def heldout_texts(seed: int = 0, count: int = HELDOUT) -> list[str]:
    """Held-out neutral reviews for perplexity; the training stream never contains them.

    Args:
        seed: Data seed.
        count: Number of reviews.

    Returns:
        The reviews, one sentence group each.
    """
    grammar = Grammar(f"{seed}:heldout")
    return [grammar.review("neutral") for _ in range(count)]


def write_data(directory: str | Path, seed: int = 0) -> list[Path]:
    """Write the demo data files (:data:`tdsteer_hf.demo.DATA_FILES`) into ``directory``.

    Args:
        directory: Where to write (created if missing).
        seed: Data seed (0 for the shipped files).

    Returns:
        The paths written.

    Examples:
        >>> import tempfile
        >>> sorted(path.name for path in write_data(tempfile.mkdtemp()))
        ['neutral_heldout.txt', 'pairs.jsonl', 'prompts.txt', 'sentiment_ab.json']
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / file for name, file in DATA_FILES.items()}
    lines = "".join(json.dumps(record) + "\n" for record in pairs(seed))
    paths["pairs"].write_text(lines, encoding="utf-8")
    paths["ab"].write_text(json.dumps(ab_items(seed), indent=1) + "\n", encoding="utf-8")
    paths["heldout"].write_text("".join(text + "\n" for text in heldout_texts(seed)), encoding="utf-8")
    paths["prompts"].write_text("".join(prompt + "\n" for prompt in PROMPTS), encoding="utf-8")
    return list(paths.values())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the demo data files."""
    parser = argparse.ArgumentParser(prog="python -m tdsteer_hf.demo.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the data files")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: 0, the shipped files)")
    args = parser.parse_args(argv)
    for path in write_data(args.out, seed=args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
