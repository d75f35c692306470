"""``tdsteer demo``: extract, info and generate, offline, on a tiny random GPT-2 built on the spot."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tdsteer.cli import Command, dispatch
from tdsteer_hf.tiny import save_tiny_gpt2

#: Contrastive pairs of the demo: the same sentence, liking versus disliking.
DEMO_PAIRS: tuple[tuple[str, str], ...] = (
    ("I love this movie", "I hate this movie"),
    ("I love this song", "I hate this song"),
    ("this book is great", "this book is awful"),
    ("the food was wonderful", "the food was terrible"),
    ("what a happy day", "what a sad day"),
    ("I really like it", "I really dislike it"),
    ("the weather is nice today", "the weather is awful today"),
    ("she was glad to see us", "she was sorry to see us"),
)
DEMO_PROMPT = "I think this movie is"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default=None, help="keep the model, pairs and vector here (default: temporary)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model (default: 0)")


@contextmanager
def _work_directory(path: str | None) -> Iterator[tuple[Path, bool]]:
    if path is not None:
        directory = Path(path).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        yield directory, True
        return
    with tempfile.TemporaryDirectory(prefix="tdsteer-demo-") as temporary:
        yield Path(temporary), False


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _work_directory(args.output_dir) as (root, kept):
        texts = [text for pair in DEMO_PAIRS for text in pair] + [DEMO_PROMPT]
        model_dir = save_tiny_gpt2(root / "tiny-gpt2", texts, seed=args.seed)
        pairs = root / "pairs.tsv"
        pairs.write_text("".join(f"{pos}\t{neg}\n" for pos, neg in DEMO_PAIRS), encoding="utf-8")
        vector = root / "liking.safetensors"
        print(
            f"tdsteer demo: a tiny random GPT-2 (2 layers, hidden size 32) and a word-level tokenizer in {model_dir}, "
            f"{len(DEMO_PAIRS)} contrastive pairs (liking vs disliking) in {pairs}. Nothing is downloaded."
        )
        steps = [
            ["extract", "--model", str(model_dir), "--pairs", str(pairs), "--layers", "1", "--device", "cpu"]
            + ["--no-progress", "-o", str(vector)],
            ["info", "--model", str(model_dir), "--vector", str(vector)],
            ["generate", "--model", str(model_dir), "--vector", str(vector), "--device", "cpu", "--scale=-4,0,4"]
            + ["--prompt", DEMO_PROMPT, "--max-new-tokens", "12", "--compare"],
        ]
        for argv in steps:
            print()
            print(f"$ tdsteer {shlex.join(argv)}")
            sys.stdout.flush()
            status = dispatch(argv)
            if status != 0:
                return status
        print()
        print(
            "The weights are random, so the completions are word salad: the point is that extraction, the vector "
            "file with its metadata, and steered generation (three scales in one batch) run end to end offline. "
            "Any lean towards the contrasted words comes from their embeddings, which the residual stream carries "
            "and GPT-2's tied output layer reads back, not from learned meaning. With --operator add, scale 0 "
            "leaves the model unchanged, so its row matches the unsteered one."
        )
        where = f"Files kept in {root}" if kept else "Files were in a temporary directory (use --output-dir to keep)"
        print(f"{where}. Done in {time.perf_counter() - started:.1f} s.")
    return 0


COMMAND = Command(
    name="demo",
    help="run extract, info and generate offline on a tiny random GPT-2",
    description=(
        "Build a tiny random GPT-2 and tokenizer, extract a vector from built-in contrastive pairs, inspect it "
        "and generate with scales -4, 0 and 4. Nothing is downloaded; the weights are random, so the text is "
        "gibberish: the demo shows the pipeline and the files, not a behaviour."
    ),
    add_arguments=_add_arguments,
    run=_run,
)
