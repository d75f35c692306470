"""Train the demo model: a small GPT-2 that writes the demo language, from a seed, on a CPU.

Run ``python -m tdsteer_hf.demo.train --out DIR --seed 0`` to write the checkpoint and tokenizer
that ship in ``tdsteer_hf/demo/model`` (``--data DIR`` also writes the demo data files). The
defaults of :class:`TrainConfig` are the shipped model's. Training is deterministic: the documents
come from :class:`~tdsteer_hf.demo.language.Grammar` seeded by ``seed``, the weights from
``torch.manual_seed(seed)``, and the run uses deterministic algorithms on a fixed number of threads.

Examples:
    >>> model, tokenizer = train(TrainConfig(steps=2, batch_size=4, n_layer=1, n_embd=16, n_head=2), progress=False)
    >>> model.config.n_layer, tokenizer.decode(tokenizer("the film was great .")["input_ids"])
    (1, 'the film was great.')
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from tdsteer_hf.demo.corpus import heldout_texts, write_data
from tdsteer_hf.demo.language import VOCABULARY, Grammar
from tdsteer_hf.tiny import EOS, tiny_gpt2

SPECIAL_TOKENS = ("<pad>", "<unk>", EOS)
BUCKETS = 8
#: The files :func:`save` writes (transformers 4 also writes ``special_tokens_map.json``).
WRITTEN = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
)
SAMPLE_PROMPTS = ("the film was", "i ate the soup on monday .", "my friend", "the hotel was")


@dataclass(frozen=True)
class TrainConfig:
    """How the demo model is trained; the defaults train the shipped model.

    Attributes:
        seed: Seed of the documents and of the weights.
        steps: Optimiser steps.
        batch_size: Documents per step, one a row.
        lr: Peak learning rate (AdamW), reached after ``warmup`` steps, then cosine decay to 10 %.
        warmup: Steps of linear warm-up.
        weight_decay: AdamW weight decay.
        n_layer: GPT-2 blocks.
        n_embd: Hidden size.
        n_head: Attention heads.
        n_positions: Longest sequence (documents are at most 60 tokens).
        threads: ``torch.set_num_threads`` during training (``None``: leave it); results can depend on it.
    """

    seed: int = 0
    steps: int = 2500
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 64
    threads: int | None = 1


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo tokenizer: word level over :data:`~tdsteer_hf.demo.language.VOCABULARY`, lower-casing.

    Its vocabulary is the language's, in a fixed order (``<pad>``, ``<unk>``, ``<|endoftext|>``,
    then the sorted tokens), so it is the same on every run. ``<|endoftext|>`` is eos and bos,
    ``<pad>`` pads; no special token is added to encoded text.

    Examples:
        >>> tokenizer = build_tokenizer()
        >>> tokenizer.tokenize("Choices: (A) the film was great.")
        ['choices', ':', '(', 'a', ')', 'the', 'film', 'was', 'great', '.']
    """
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token=EOS, bos_token=EOS
    )


@contextmanager
def _deterministic(threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count while the block runs; restored afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


def _batches(
    grammar: Grammar, tokenizer: PreTrainedTokenizerFast, size: int, limit: int, skip: frozenset[str]
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of ``size`` fresh documents, one a row, each followed by eos, right-padded.

    Documents are drawn ``BUCKETS * size`` at a time, sorted by length and cut into ``BUCKETS``
    batches (less padding), which are yielded in an order drawn from ``grammar``. One document a row
    matters: with several documents packed into a row, the model attends across them and learns to
    keep a review's sentiment far more slowly. Held-out documents are skipped.
    """
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    while True:
        documents: list[str] = []
        while len(documents) < BUCKETS * size:
            document = grammar.document()
            if document not in skip:
                documents.append(document)
        encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
        rows = sorted(([*ids[: limit - 1], eos] for ids in encoded), key=len)
        order = list(range(BUCKETS))
        grammar.random.shuffle(order)
        for bucket in order:
            chunk = rows[bucket * size : (bucket + 1) * size]
            length = len(chunk[-1])
            input_ids = torch.full((size, length), pad, dtype=torch.long)
            mask = torch.zeros((size, length), dtype=torch.long)
            for index, row in enumerate(chunk):
                input_ids[index, : len(row)] = torch.tensor(row)
                mask[index, : len(row)] = 1
            yield {"input_ids": input_ids, "attention_mask": mask}


def _loss(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the real (non-padding) tokens."""
    logits = model(**batch).logits[:, :-1]
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(
    config: TrainConfig = TrainConfig(), *, progress: bool = True
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Train the demo model from scratch.

    Args:
        config: Sizes, steps, learning rate and seed.
        progress: Show a tqdm progress bar with the running loss.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU.

    Examples:
        >>> small = TrainConfig(steps=2, batch_size=4, n_layer=1, n_embd=16, n_head=2)
        >>> first, _ = train(small, progress=False)
        >>> second, _ = train(small, progress=False)
        >>> all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
        True
    """
    tokenizer = build_tokenizer()
    grammar = Grammar(f"{config.seed}:train")
    skip = frozenset(heldout_texts(config.seed))
    with _deterministic(config.threads):
        model = tiny_gpt2(
            tokenizer,
            n_layer=config.n_layer,
            n_embd=config.n_embd,
            n_head=config.n_head,
            n_positions=config.n_positions,
            seed=config.seed,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model.train()
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        bar = tqdm(range(config.steps), desc="training the demo model", unit="step", disable=not progress)
        average = None
        batches = _batches(grammar, tokenizer, config.batch_size, config.n_positions, skip)
        for step in bar:
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(config, step)
            loss = _loss(model, next(batches))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            average = loss.item() if average is None else 0.95 * average + 0.05 * loss.item()
            if step % 20 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{average:.3f}")
        bar.close()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write the checkpoint (float32 safetensors) and the tokenizer into ``directory``.

    The tokenizer's config names the class ``PreTrainedTokenizerFast``, which every
    ``transformers`` release this package supports reads back, and its longest input is the
    model's ``n_positions``.

    Returns:
        The directory; ``from_pretrained`` reads it back.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.model_max_length = int(model.config.n_positions)
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in folder.iterdir():
        if path.name in WRITTEN:
            path.chmod(0o644)  # safetensors writes owner-only files; the checkpoint is meant to be shared
    return folder


def samples(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], max_new_tokens: int = 24
) -> list[str]:
    """Greedy continuations of ``prompts`` (prompt included), one generate call per prompt."""
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(str(tokenizer.decode(output[0], skip_special_tokens=True)))
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, save, print the timings, the size and a few greedy samples."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m tdsteer_hf.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the checkpoint and tokenizer")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default: 0, the shipped model)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"steps (default: {defaults.steps})")
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help=f"torch threads (default: {defaults.threads})"
    )
    parser.add_argument("--data", default=None, help="also write the demo data files into this directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = replace(defaults, seed=args.seed, steps=args.steps, threads=args.threads)
    print(f"config: {asdict(config)}")
    wall, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = train(config, progress=not args.no_progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    folder = save(model, tokenizer, args.out)
    size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"trained in {wall:.1f} s wall, {cpu:.1f} s CPU; {parameters:,} parameters; {size / 1e6:.2f} MB in {folder}")
    if args.data:
        for path in write_data(args.data, seed=args.seed):
            print(f"wrote {path}")
    print("greedy samples:")
    for text in samples(model, tokenizer, SAMPLE_PROMPTS):
        print(f"  {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
