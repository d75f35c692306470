"""The demo model: a small GPT-2 trained on a synthetic review language, shipped with its data.

The model (4 blocks, hidden size 64, float32 safetensors, 0.9 MB) and its word-level tokenizer are
package data in ``tdsteer_hf/demo/model``; :func:`load_demo_model` opens them, offline. The data
files in ``tdsteer_hf/demo/data`` (:func:`data_path`) are contrastive pairs (positive vs negative
versions of the same text), an A/B task in the CAA format whose matching answer is the positive
one, held-out neutral text for perplexity, and prompts to continue. :mod:`tdsteer_hf.demo.language`
describes the language, :mod:`tdsteer_hf.demo.train` trains the model from a seed,
:mod:`tdsteer_hf.demo.corpus` writes the data and :mod:`tdsteer_hf.demo.metrics` measures steered
text, A/B propensity and perplexity.

A mean-difference vector from the pairs at :data:`DEMO_LAYER`, applied at :data:`DEMO_SCALES`,
turns neutral continuations positive or negative; ``docs/demo-model.md`` shows the curves.

Examples:
    >>> import tdsteer_hf
    >>> model, tokenizer = load_demo_model()
    >>> model.config.model_type, model.config.n_layer, model.config.n_embd
    ('gpt2', 4, 64)
    >>> len(tdsteer_hf.read_pairs(data_path("pairs")))
    200
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tdsteer_hf.demo.language import NEGATIVE_WORDS, POSITIVE_WORDS, Grammar, negative_fraction, positive_fraction

__all__ = [
    "DATA_FILES",
    "DEMO_LAYER",
    "DEMO_SCALES",
    "NEGATIVE_WORDS",
    "POSITIVE_WORDS",
    "Grammar",
    "data_path",
    "load_demo_model",
    "model_path",
    "negative_fraction",
    "positive_fraction",
]

#: Short name -> file name of each demo data file.
DATA_FILES: dict[str, str] = {
    "pairs": "pairs.jsonl",
    "ab": "sentiment_ab.json",
    "heldout": "neutral_heldout.txt",
    "prompts": "prompts.txt",
}

#: The block whose output (``kind="resid_post"``) the demo reads and steers: the first of four. The
#: model settles its A/B answers in blocks 1 and 2, so steering must come before them; from block 1 on
#: it still moves the words but less of the answers, and from block 2 on none.
DEMO_LAYER = 0
#: Multipliers of the demo's mean-difference vector. The vector is the gap between a positive and a
#: negative text, so 0.5 takes a neutral text about as far as a positive one; the model leaves its
#: language beyond about 1.
DEMO_SCALES: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5)


def _folder(name: str) -> Path:
    folder = Path(str(resources.files(__name__).joinpath(name)))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the demo {name} folder {str(folder)!r} is missing: reinstall tdsteer-hf, or rebuild it with "
            f"python -m tdsteer_hf.demo.train --out {folder.parent / 'model'} --data {folder.parent / 'data'} --seed 0"
        )
    return folder


def model_path() -> Path:
    """Directory of the shipped demo checkpoint and tokenizer (``from_pretrained`` reads it).

    Returns:
        The folder ``tdsteer_hf/demo/model`` of the installed package.

    Raises:
        FileNotFoundError: The package was installed without its data.

    Examples:
        >>> (model_path() / "model.safetensors").is_file()
        True
    """
    return _folder("model")


def data_path(name: str) -> Path:
    """Path of a shipped demo data file.

    Args:
        name: A short name, ``"pairs"`` (JSON Lines ``{"positive", "negative"}``), ``"ab"`` (CAA
            JSON list), ``"heldout"`` (neutral text, one review a line) or ``"prompts"`` (one a
            line); or a file name of :data:`DATA_FILES`.

    Returns:
        The file's path in the installed package.

    Raises:
        KeyError: An unknown name.

    Examples:
        >>> data_path("ab").name
        'sentiment_ab.json'
    """
    files = {**DATA_FILES, **{file: file for file in DATA_FILES.values()}}
    if name not in files:
        raise KeyError(f"no demo data file {name!r}; known: {', '.join(sorted(files))}")
    return _folder("data") / files[name]


def load_demo_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The shipped demo model (eval mode, CPU, float32) and its tokenizer.

    Returns:
        ``(model, tokenizer)``, read with ``AutoModelForCausalLM`` and ``AutoTokenizer`` from
        :func:`model_path`.
    """
    folder = model_path()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
