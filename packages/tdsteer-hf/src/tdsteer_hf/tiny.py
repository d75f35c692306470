"""Tiny random GPT-2 models and tokenizers trained on the spot: for the demo, tests and benchmarks.

Nothing is downloaded. The one place a tiny GPT-2 is built, so that the demo, the test suites and the
benchmarks all build it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def word_tokenizer(texts: Iterable[str], *, lowercase: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (split on white space and punctuation) trained on ``texts``.

    Special tokens: ``<pad>`` (pad), ``<unk>`` (unknown), ``<|endoftext|>`` (eos and bos).

    Examples:
        >>> tokenizer = word_tokenizer(["I love it", "I hate it"])
        >>> tokenizer.decode(tokenizer("i love it")["input_ids"])
        'i love it'
    """
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    if lowercase:
        core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    core.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", EOS]))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token=EOS, bos_token=EOS
    )


def bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``; ``<|endoftext|>`` is eos, bos and pad.

    Examples:
        >>> tokenizer = bpe_tokenizer(["the cat sat on the mat"] * 4)
        >>> tokenizer.decode(tokenizer("the cat")["input_ids"])
        'the cat'
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def tiny_gpt2(
    tokenizer: Any | None = None,
    *,
    vocab_size: int | None = None,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 128,
    seed: int | None = 0,
    **config: Any,
) -> GPT2LMHeadModel:
    """A random GPT-2 in eval mode, sized for a tokenizer (or ``vocab_size``).

    Args:
        tokenizer: Takes the vocabulary size and the bos, eos and pad ids from it.
        vocab_size: Vocabulary size without a tokenizer.
        n_layer: Blocks.
        n_embd: Hidden size.
        n_head: Attention heads.
        n_positions: Longest sequence.
        seed: ``torch.manual_seed`` before the weights are drawn (``None``: the current state).
        **config: Other ``GPT2Config`` fields (``initializer_range=0.1`` for livelier random text).

    Examples:
        >>> tiny_gpt2(vocab_size=64).config.n_layer
        2
    """
    if tokenizer is not None:
        config.setdefault("bos_token_id", tokenizer.bos_token_id)
        config.setdefault("eos_token_id", tokenizer.eos_token_id)
        config.setdefault("pad_token_id", tokenizer.pad_token_id)
        vocab_size = len(tokenizer)
    if vocab_size is None:
        raise ValueError("tiny_gpt2 needs a tokenizer or vocab_size")
    if seed is not None:
        torch.manual_seed(seed)
    gpt2 = GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, **config
    )
    return GPT2LMHeadModel(gpt2).eval()


def save_tiny_gpt2(directory: str | Path, texts: Iterable[str], *, seed: int = 0, **sizes: Any) -> Path:
    """Save a tiny random GPT-2 and a word-level tokenizer trained on ``texts`` into ``directory``.

    Args:
        directory: Where to write (``from_pretrained`` reads it back).
        texts: What the tokenizer learns its words from.
        seed: Seed of the weights.
        **sizes: Passed to :func:`tiny_gpt2`.

    Returns:
        The directory.
    """
    folder = Path(directory)
    tokenizer = word_tokenizer(texts)
    model = tiny_gpt2(tokenizer, seed=seed, **{"initializer_range": 0.1, **sizes})
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
