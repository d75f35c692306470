"""The ``tdsteer`` command: extract, apply and inspect steering vectors of Hugging Face models.

Commands:

* ``tdsteer extract``: read contrastive pairs from a file, compute a steering vector at chosen
  layers of a model and save it as a tdsteer ``.safetensors`` file;
* ``tdsteer generate``: generate text with a saved vector applied, at one or several scales (all
  scales run in one batch, one row per scale);
* ``tdsteer info``: how tdsteer sees a model (blocks, layer count, site paths) and what a vector
  file holds (sites, shapes, norms, metadata);
* ``tdsteer demo``: the whole pipeline, offline, on a tiny random GPT-2 built on the spot.

User errors (a missing model, a layer out of range, a vector made for another model, a corrupted
vector file, an empty pairs file...) end with a one-line message on stderr and exit status 2.

Examples:
    From a shell::

        tdsteer extract --model gpt2 --pairs sentiment.tsv --layers 6 -o sentiment.safetensors
        tdsteer generate --model gpt2 --vector sentiment.safetensors --scale -4,0,4 --prompt "I think"
        tdsteer info --vector sentiment.safetensors
        tdsteer demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

import tdsteer
import tdsteer_hf
from tdsteer import SteeringVector, SteeringVectorFileError
from tdsteer.aggregators import METHODS
from tdsteer.operators import OPERATORS
from tdsteer.positions import as_policy
from tdsteer.vector import model_type_of

PROG = "tdsteer"
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
READS = ("last", "answer", "mean", "all")
CHECKS = ("warn", "error", "ignore")
#: Options whose value may start with a minus sign (``--scale -4,0,4``, ``--layers -2:``).
_SIGNED_OPTIONS = ("--scale", "--layers")
_SIGNED_VALUE = re.compile(r"^-[\d.:]")
_NUMBER = re.compile(r"^-?\d+(\.\d*)?$")
_TSV_HEADERS = (["positive", "negative"], ["prompt", "positive", "negative"])

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


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


# --- argument parsing ---------------------------------------------------------------------------------


def parse_layers(spec: str, count: int) -> list[int]:
    """Resolve a ``--layers`` value against a model with ``count`` blocks.

    Args:
        spec: ``"all"``, or comma-separated items, each an index (negative counts from the end) or a
            Python slice ``start:stop`` (``"2:5"``, ``"-2:"``).
        count: Number of blocks of the model.

    Returns:
        Non-negative layer indices, in the order given, without duplicates.

    Raises:
        CLIError: The value is malformed or selects no layer.
        IndexError: An index or slice bound is out of range (the message names the valid range).

    Examples:
        >>> parse_layers("6,7", 12), parse_layers("-1", 12), parse_layers("2:5", 12)
        ([6, 7], [11], [2, 3, 4])
        >>> parse_layers("all", 3)
        [0, 1, 2]
    """
    text = spec.strip()
    if text.lower() == "all":
        return list(range(count))
    chosen: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            if ":" in item:
                bounds = [int(b) if b.strip() else None for b in item.split(":")]
                if len(bounds) > 3:
                    raise ValueError(item)
                for bound in bounds[:2]:
                    if bound is not None and not -count <= bound <= count:
                        raise IndexError(
                            f"layer slice {item!r} is out of range: the model has {count} layers, "
                            f"so slice bounds lie in -{count}..{count}"
                        )
                picked = list(range(count))[slice(*bounds)]
            else:
                picked = tdsteer.take_indices(count, int(item), what="layer")
        except ValueError:
            raise CLIError(
                f"--layers {spec!r}: {item!r} is not a layer index or slice; use e.g. 6,7 or -1 or 2:5 or all"
            ) from None
        chosen.extend(i for i in picked if i not in chosen)
    if not chosen:
        raise CLIError(f"--layers {spec!r} selects no layer (the model has {count} layers, 0..{count - 1})")
    return chosen


def parse_scales(values: Sequence[str], option: str = "--scale") -> list[float]:
    """Scales from ``option`` values, each one number or several separated by commas.

    Examples:
        >>> parse_scales(["-4,0,4"]), parse_scales(["2", "-2"])
        ([-4.0, 0.0, 4.0], [2.0, -2.0])
    """
    scales: list[float] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                number = float(part)
            except ValueError:
                raise CLIError(f"{option} {part!r} is not a number; use e.g. {option} 4 or {option} -4,0,4") from None
            if not math.isfinite(number):
                raise CLIError(f"{option} {part!r} is not finite")
            scales.append(number)
    if not scales:
        raise CLIError(f"{option} needs at least one number, e.g. {option} 4 or {option} -4,0,4")
    return scales


def parse_positions(value: str) -> str | int:
    """A ``--positions`` value: ``all``, ``prompt``, ``generated``, ``K`` or ``from:K``.

    Examples:
        >>> parse_positions("3"), parse_positions("generated")
        (3, 'generated')
    """
    policy: str | int = int(value) if value.strip().isdigit() else value.strip()
    try:
        as_policy(policy)
    except (TypeError, ValueError) as error:
        raise CLIError(f"--positions {value!r}: {error}") from None
    return policy


def join_signed_values(argv: list[str], options: tuple[str, ...] = _SIGNED_OPTIONS) -> list[str]:
    """``--scale -4,0,4`` -> ``--scale=-4,0,4`` for ``options``: argparse would take ``-4,0,4`` for an option.

    Examples:
        >>> join_signed_values(["--scale", "-4,0,4", "--prompt", "hi"])
        ['--scale=-4,0,4', '--prompt', 'hi']
    """
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if (
            token in options
            and following is not None
            and _SIGNED_VALUE.match(following)
            and not _NUMBER.match(following)  # argparse reads a lone negative number as a value itself
        ):
            out.append(f"{token}={following}")
            index += 2
            continue
        out.append(token)
        index += 1
    return out


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model directory or Hugging Face model id")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="auto",
        help="dtype the model is loaded in (default: auto, the checkpoint's dtype)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tdsteer`` and its commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Extract, apply and inspect activation-steering vectors of Hugging Face models (tdsteer).",
        epilog="Run 'tdsteer COMMAND --help' for the options of a command; 'tdsteer demo' runs offline.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {tdsteer_hf.__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    extract = commands.add_parser(
        "extract",
        help="compute a steering vector from contrastive pairs and save it",
        description=(
            "Compute a steering vector from contrastive pairs. --pairs takes a CAA JSON/JSONL file (records with "
            "question, answer_matching_behavior, answer_not_matching_behavior), a JSON/JSONL file of "
            '{"positive", "negative"} or {"prompt", "positive", "negative"} records, or a tab-separated file '
            "with two (positive, negative) or three (prompt, positive, negative) columns."
        ),
        allow_abbrev=False,
    )
    _add_model_options(extract)
    extract.add_argument("--pairs", required=True, help="contrastive data file (.json, .jsonl, .tsv)")
    extract.add_argument("--layers", default=None, help="layers: 6,7 or -1 or 2:5 or all (default: the middle layer)")
    extract.add_argument(
        "--kind",
        choices=tdsteer_hf.SITE_KINDS,
        default="resid_post",
        help="activation read at each layer (default: resid_post, the block's output)",
    )
    extract.add_argument(
        "--method", choices=sorted(METHODS), default="mean_diff", help="aggregation method (default: mean_diff)"
    )
    extract.add_argument(
        "--read",
        choices=READS,
        default="last",
        help=(
            "token read: last (last token), answer (the answer token of CAA records and prompt/completion "
            "records), mean (mean over tokens), all (every token, for --method actadd) (default: last)"
        ),
    )
    extract.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    extract.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="format the texts with the tokenizer's chat template (default: no)",
    )
    extract.add_argument("--max-length", type=int, default=None, help="keep at most this many tokens per text")
    extract.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)"
    )
    extract.add_argument("-o", "--output", required=True, help="where to write the vector (.safetensors)")

    generate = commands.add_parser(
        "generate",
        help="generate text with a steering vector applied",
        description=(
            "Generate text with a saved steering vector applied. Several scales (--scale -4,0,4) run in one batch, "
            "one row per prompt and scale."
        ),
        allow_abbrev=False,
    )
    _add_model_options(generate)
    generate.add_argument("--vector", required=True, help="tdsteer steering-vector file (.safetensors)")
    generate.add_argument(
        "--scale",
        action="append",
        default=None,
        help="multiplier(s): 4, or -4,0,4 for one completion per scale; repeatable (default: 1)",
    )
    generate.add_argument(
        "--operator", choices=sorted(OPERATORS), default="add", help="how the vector acts (default: add)"
    )
    generate.add_argument(
        "--positions", default="all", help="steered tokens: all, prompt, generated, K or from:K (default: all)"
    )
    generate.add_argument("--sites", default=None, help="steer only these comma-separated sites of the vector")
    generate.add_argument(
        "--check",
        choices=CHECKS,
        default="warn",
        help="when the vector was made for another model type: warn, error or ignore (default: warn)",
    )
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)")
    sampling = generate.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", dest="sample", action="store_false", help="greedy decoding (default)")
    sampling.add_argument("--sample", dest="sample", action="store_true", help="sample instead of greedy decoding")
    generate.set_defaults(sample=False)
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    generate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    generate.add_argument("--compare", action="store_true", help="also print the unsteered completions")
    generate.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="format the prompts with the tokenizer's chat template (default: no)",
    )
    generate.add_argument("--json", action="store_true", help="print the completions as JSON")

    info = commands.add_parser(
        "info",
        help="describe a model (blocks, layers, site paths) and/or a vector file",
        description="Describe how tdsteer sees a model, what a vector file holds, and whether the two fit.",
        allow_abbrev=False,
    )
    info.add_argument("--model", default=None, help="local model directory or Hugging Face model id")
    info.add_argument("--vector", default=None, help="tdsteer steering-vector file (.safetensors)")
    info.add_argument("--json", action="store_true", help="print JSON")

    demo = commands.add_parser(
        "demo",
        help="run extract, info and generate offline on a tiny random GPT-2",
        description=(
            "Build a tiny random GPT-2 and tokenizer, extract a vector from built-in contrastive pairs, inspect it "
            "and generate with scales -4, 0 and 4. Nothing is downloaded; the weights are random, so the text is "
            "gibberish: the demo shows the pipeline and the files, not a behaviour."
        ),
        allow_abbrev=False,
    )
    demo.add_argument("--output-dir", default=None, help="keep the model, pairs and vector here (default: temporary)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random model (default: 0)")
    return parser


# --- output -------------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _warn(message: str, file: TextIO | None = None) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=file or sys.stderr)


@contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """Silence transformers' warnings (generation-time advice that does not apply to tdsteer's calls)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


@contextmanager
def _console() -> Iterator[None]:
    """Warnings as one-line messages on stderr; transformers' warnings (load reports) kept, progress bars off."""
    from transformers.utils import logging as hf_logging

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        _warn(str(message))

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.showwarning = show
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --- models and data ----------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path rather than a hub id (``org/model``)."""
    return (
        name.startswith(("/", ".", "~", "\\"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
        or bool(re.match(r"^[A-Za-z]:[\\/]", name))
    )


def _model_location(name: str) -> str:
    """Check a ``--model`` value: an existing model directory, or something that may be a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"model path {name!r} is a file; give the model's directory (with config.json)")
        if not (path / "config.json").is_file():
            raise CLIError(f"model directory {name!r} has no config.json; is it a Hugging Face model directory?")
        return str(path)
    if _looks_local(name):
        raise CLIError(f"model path {name!r} does not exist")
    return name


def _device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {requested!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {requested}: no CUDA GPU is available (torch.cuda.is_available() is False)")
    return device


def _dtype_kwargs(dtype: str) -> dict[str, Any]:
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: DTYPES[dtype]}


def _is_causal(config: Any) -> bool:
    """Whether the checkpoint is a causal LM, or at least not saved as another kind of model."""
    names = [str(name) for name in (getattr(config, "architectures", None) or [])]
    if not names:
        return True
    return any(name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for name in names)


def _load_config(location: str, name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"cannot load the model config of {name!r}: {_one_line(error)}") from None


def load_model(name: str, *, dtype: str = "auto", device: str | None = None, need_generate: bool = False) -> nn.Module:
    """Load a model for ``tdsteer``: ``AutoModelForCausalLM``, or ``AutoModel`` for other checkpoints.

    Args:
        name: Local model directory or hub id.
        dtype: A key of :data:`DTYPES`.
        device: Device name; ``None`` picks CUDA when available.
        need_generate: Fail unless the model can generate text.

    Returns:
        The model in eval mode, on its device.

    Raises:
        CLIError: The path does not exist, or the model cannot be loaded or cannot generate.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    location = _model_location(name)
    target = _device(device)
    config = _load_config(location, name)
    kwargs = _dtype_kwargs(dtype)
    try:
        if _is_causal(config) or need_generate:
            try:
                model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            except ValueError as error:
                if need_generate or "Unrecognized configuration class" not in str(error):
                    raise
                model = AutoModel.from_pretrained(location, **kwargs)
        else:
            model = AutoModel.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot load model {name!r}: {_one_line(error)}") from None
    if need_generate and not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise CLIError(f"model {name!r} ({type(model).__name__}) cannot generate text; use a causal language model")
    loaded: nn.Module = model
    return loaded.to(target).eval()


def _describe_model(name: str) -> tuple[nn.Module, bool]:
    """The model's structure for ``info``: built on the meta device from its config (no weights read).

    Returns:
        The model, and whether it was built without weights.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    location = _model_location(name)
    config = _load_config(location, name)
    try:
        with torch.device("meta"):
            auto = AutoModelForCausalLM if _is_causal(config) else AutoModel
            try:
                return auto.from_config(config), True
            except ValueError:
                return AutoModel.from_config(config), True
    except Exception:  # noqa: BLE001 - some models cannot be built on the meta device: read the weights
        return load_model(name, device="cpu"), False


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, with a pad token (its eos token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(_model_location(name))
    except (OSError, ValueError, TypeError) as error:
        raise CLIError(f"cannot load the tokenizer of {name!r}: {_one_line(error)}") from None
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pairs(path: str) -> list[Any]:
    """Read a contrastive data file into records that :func:`tdsteer_hf.contrastive_batches` takes.

    ``.json``: a list of records; ``.jsonl``: one record a line; anything else (``.tsv``, ``.txt``)
    is read as JSON or JSON Lines when it starts with ``[`` or ``{``, else as tab-separated columns
    ``positive<TAB>negative`` or ``prompt<TAB>positive<TAB>negative`` (blank lines, ``#`` comments
    and a header row are skipped).

    Raises:
        CLIError: The file is missing, malformed or holds no example.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"pairs file {path!r} does not exist")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read pairs file {path!r}: {_one_line(error)}") from None
    suffix = file.suffix.lower()
    start = text.lstrip()[:1]
    records: list[Any]
    if suffix == ".jsonl" or (suffix != ".json" and start == "{"):
        records = _json_lines(text, path)
    elif suffix == ".json" or start == "[":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as error:
            if start == "{" and "Extra data" in str(error):
                data = _json_lines(text, path)  # JSON Lines saved as .json
            else:
                raise CLIError(f"pairs file {path!r} is not valid JSON: {error}") from None
        if not isinstance(data, list):
            raise CLIError(f"pairs file {path!r} holds a JSON {type(data).__name__}; expected a list of records")
        records = data
    else:
        records = _tsv_rows(text, path)
    if not records:
        raise CLIError(f"pairs file {path!r} is empty: it holds no contrastive examples")
    return records


def _json_lines(text: str, path: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise CLIError(f"pairs file {path!r} line {number} is not valid JSON: {error}") from None
    return records


def _tsv_rows(text: str, path: str) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = line.rstrip("\r\n").split("\t")
        if len(cells) not in (2, 3):
            raise CLIError(
                f"pairs file {path!r} line {number} has {len(cells)} tab-separated columns; expected 2 "
                "(positive, negative) or 3 (prompt, positive, negative)"
            )
        if not rows and [cell.strip().lower() for cell in cells] in _TSV_HEADERS:
            continue
        rows.append(tuple(cells))
    return rows


def _select_layers(model: nn.Module, spec: str | None) -> list[int]:
    count = tdsteer_hf.num_layers(model)
    if spec is None:
        return [count // 2]
    return parse_layers(spec, count)


def check_vector(vector: SteeringVector, model: nn.Module, *, check: str = "warn", source: str = "the vector") -> None:
    """Check that ``vector`` fits ``model`` before steering it.

    In order: the model type recorded in the vector (``check``: ``warn``, ``error`` or ``ignore``),
    that every site exists in the model, and that the sites the adapter knows (block outputs and
    inputs, attention and MLP outputs) have the model's hidden size.

    Raises:
        CLIError: The vector does not fit.
    """
    recorded = vector.metadata.get("model_type")
    actual = model_type_of(model)
    if recorded and recorded != actual and check != "ignore":
        message = f"{source} was made for model type {recorded!r} but the model is {actual!r}"
        if check == "error":
            raise CLIError(f"{message}; pass --check warn or --check ignore to use it anyway")
        _warn(f"{message}; steering anyway (--check error refuses, --check ignore is silent)")
    for site in vector.sites.values():
        try:
            site.module(model)
        except ValueError as error:
            raise CLIError(f"{source} does not fit the model: {_one_line(error)}") from None
    expected = _known_site_sizes(model)
    for key, direction in vector.directions.items():
        size = expected.get(key)
        if size is not None and int(direction.shape[-1]) != size:
            raise CLIError(
                f"{source} has hidden size {int(direction.shape[-1])} at site {key!r} but the model's hidden size "
                f"is {size}: the vector was made for another model"
            )


def _known_site_sizes(model: nn.Module) -> dict[str, int]:
    """Site key -> hidden size for every site the adapter builds for ``model`` (empty when unknown)."""
    try:
        summary = tdsteer_hf.describe(model)
    except ValueError:
        return {}
    hidden = summary["hidden_size"]
    if not isinstance(hidden, int):
        return {}
    sizes: dict[str, int] = {}
    for kind in summary["sites"]:
        try:
            sizes.update((site.key, hidden) for site in tdsteer_hf.sites(model, None, kind))
        except ValueError:
            continue
    return sizes


def load_vector(path: str) -> SteeringVector:
    """Load a vector file; a missing or corrupted file raises :class:`tdsteer.SteeringVectorFileError`."""
    return SteeringVector.load(Path(path).expanduser())


# --- commands -----------------------------------------------------------------------------------------


def _cmd_extract(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    records = load_pairs(args.pairs)  # before the model: a bad file fails fast
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    layers = _select_layers(model, args.layers)
    sites = tdsteer_hf.sites(model, layers, kind=args.kind)
    tokenizer = load_tokenizer(args.model)
    batches = tdsteer_hf.contrastive_batches(
        tokenizer,
        records,
        batch_size=args.batch_size,
        read="answer" if args.read == "answer" else "last",
        padding_side="right",
        chat_template=args.chat_template,
        max_length=args.max_length,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    vector = tdsteer.extract(
        model, batches, sites, method=args.method, read=args.read, progress=progress, model_name=args.model
    )
    vector.metadata.update(
        site_kind=args.kind, layers=layers, chat_template=bool(args.chat_template), data_file=str(args.pairs)
    )
    output = vector.save(Path(args.output).expanduser())
    keys = ", ".join(vector.keys())
    print(
        f"Extracted vector: method {args.method}, read {args.read}, {batches.count} examples, "
        f"{len(vector)} site{'s' if len(vector) != 1 else ''} [{keys}] -> {output}"
    )
    return 0


def _format_prompts(tokenizer: Any, prompts: list[str], chat_template: bool) -> tuple[list[str], bool]:
    """Prompts as given, or through the chat template; and whether the tokenizer adds special tokens."""
    if not chat_template:
        return prompts, True
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError("--chat-template: the tokenizer has no chat template")
    formatted = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        for prompt in prompts
    ]
    return [str(text) for text in formatted], False


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    add_special_tokens: bool = True,
) -> list[str]:
    """One batched ``model.generate`` call (left-padded), the new text of each row decoded.

    Whatever steering context is open around the call applies to it.
    """
    if getattr(tokenizer, "pad_token_id", None) is None and len(prompts) > 1:
        raise CLIError("the tokenizer has neither a pad nor an eos token, so prompts cannot be batched")
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    device = next(model.parameters()).device
    inputs = {key: encoded[key].to(device) for key in ("input_ids", "attention_mask") if key in encoded}
    length = int(inputs["input_ids"].shape[1])
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    too_long = isinstance(limit, int) and length + max_new_tokens > limit
    beyond = (
        f"the prompt ({length} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's {limit} positions"
    )
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if tokenizer.pad_token_id is not None:
        options["pad_token_id"] = tokenizer.pad_token_id
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with torch.no_grad(), _transformers_errors_only():
            output = model.generate(**inputs, **options)  # type: ignore[operator]
    except IndexError:
        if too_long:
            raise CLIError(f"generation failed: {beyond}") from None
        raise
    if too_long:
        _warn(f"{beyond}; tokens past the last position may be unreliable")
    return [str(text) for text in tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)]


def _cmd_generate(args: argparse.Namespace) -> int:
    scales = parse_scales(args.scale or ["1"])
    positions = parse_positions(args.positions)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise CLIError("--sample needs --temperature > 0 and 0 < --top-p <= 1")
    vector = load_vector(args.vector)  # before the model: a bad file fails fast
    if args.sites:
        wanted = [key.strip() for key in args.sites.split(",") if key.strip()]
        try:
            vector = vector.select(wanted)
        except KeyError as error:
            raise CLIError(f"--sites: {_one_line(error.args[0] if error.args else error)}") from None
    model = load_model(args.model, dtype=args.dtype, device=args.device, need_generate=True)
    check_vector(vector, model, check=args.check, source=f"vector {args.vector!r}")
    tokenizer = load_tokenizer(args.model)
    prompts = list(args.prompt)
    texts, special = _format_prompts(tokenizer, prompts, args.chat_template)
    rows = [text for text in texts for _ in scales]
    row_scales = torch.tensor([scale for _ in texts for scale in scales], dtype=torch.float32)
    options: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        add_special_tokens=special,
    )
    try:
        with tdsteer.steer(
            model, vector, scale=row_scales, operator=args.operator, positions=positions, check="ignore"
        ):
            steered = generate_texts(model, tokenizer, rows, **options)
        plain = generate_texts(model, tokenizer, texts, **options) if args.compare else None
    except (ValueError, IndexError) as error:
        raise CLIError(f"generation failed: {_one_line(error)}") from None
    per_prompt: list[list[dict[str, Any]]] = []
    for p, prompt in enumerate(prompts):
        records = [
            {"prompt": prompt, "scale": scale, "completion": steered[p * len(scales) + s]}
            for s, scale in enumerate(scales)
        ]
        if plain is not None:
            records.append({"prompt": prompt, "scale": None, "completion": plain[p]})
        per_prompt.append(records)
    if args.json:
        print(json.dumps([record for records in per_prompt for record in records], ensure_ascii=False, indent=2))
        return 0
    method = vector.metadata.get("method", "?")
    decoding = f"sampling (T={args.temperature:g}, seed {args.seed})" if args.sample else "greedy"
    print(
        f"Steering {', '.join(vector.keys())} ({method} vector, operator {args.operator}, positions {positions}); "
        f"{decoding}, {args.max_new_tokens} new tokens"
    )
    width = max(len(f"{scale:g}") for scale in scales)
    label_width = max(len("unsteered") if plain is not None else 0, width + len("scale "))
    for p, (prompt, records) in enumerate(zip(prompts, per_prompt, strict=True)):
        print(f"prompt {p + 1}: {_quote(prompt)}")
        for record in records:
            label = "unsteered" if record["scale"] is None else f"scale {record['scale']:>{width}g}"
            print(f"  {label:<{label_width}} -> {_quote(record['completion'])}")
    return 0


def _model_summary(name: str) -> dict[str, Any]:
    model, meta = _describe_model(name)
    summary = dict(tdsteer_hf.describe(model))
    return {
        "model": name,
        "class": type(model).__name__,
        **summary,
        "layers": f"0..{summary['num_layers'] - 1}",
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "weights_read": not meta,
        "_module": model,
    }


def _vector_summary(path: str) -> dict[str, Any]:
    vector = load_vector(path)
    sites = []
    for key, direction in vector.directions.items():
        site = vector.sites[key]
        values = direction.float()
        sites.append(
            {
                "key": key,
                "path": site.path,
                "slot": site.slot,
                "io": site.io,
                "layout": site.layout,
                "shape": list(direction.shape),
                "dtype": str(direction.dtype).removeprefix("torch."),
                "norm": float(values.norm()),
                **({"position_norms": values.norm(dim=-1).tolist()} if direction.ndim == 2 else {}),
            }
        )
    return {"vector": path, "sites": sites, "metadata": vector.metadata, "_vector": vector}


def _print_model(summary: dict[str, Any]) -> None:
    weights = "" if summary["weights_read"] else " (structure from config.json; weights not read)"
    print(f"model:        {summary['model']}{weights}")
    print(f"class:        {summary['class']}")
    print(f"model_type:   {summary['model_type']}")
    print(f"num_layers:   {summary['num_layers']} (layers {summary['layers']})")
    print(f"hidden_size:  {summary['hidden_size']}")
    print(f"parameters:   {summary['parameters']:,}")
    print(f"blocks_path:  {summary['blocks_path']} (found by {summary['source']})")
    print("sites:")
    for kind, template in summary["sites"].items():
        print(f"  {kind:<11} {template}")


def _print_vector(summary: dict[str, Any]) -> None:
    print(f"vector: {summary['vector']}")
    print(f"sites:  {len(summary['sites'])}")
    for site in summary["sites"]:
        extra = []
        if site["slot"] not in (None, 0):
            extra.append(f"slot {site['slot']}")
        if site["io"] != "output":
            extra.append(f"io {site['io']}")
        if site["layout"] != "NLC":
            extra.append(f"layout {site['layout']}")
        shape = "(" + ", ".join(str(n) for n in site["shape"]) + ("," if len(site["shape"]) == 1 else "") + ")"
        note = f" [{', '.join(extra)}]" if extra else ""
        print(f"  {site['key']}{note}: shape {shape} {site['dtype']}, norm {site['norm']:.4g}")
    print("metadata:")
    for key, value in summary["metadata"].items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(f"  {key}: {shown}")


def _fit(vector: SteeringVector, model: nn.Module) -> tuple[str | None, str | None]:
    """Why ``vector`` does not fit ``model`` (``None`` when it does), and a note on a model-type difference."""
    recorded, actual = vector.metadata.get("model_type"), model_type_of(model)
    note = f"made for model type {recorded!r}, the model is {actual!r}" if recorded and recorded != actual else None
    try:
        check_vector(vector, model, check="ignore")
    except CLIError as error:
        return str(error), note
    return None, note


def _cmd_info(args: argparse.Namespace) -> int:
    if args.model is None and args.vector is None:
        raise CLIError("info needs --model PATH, --vector FILE, or both")
    vector_info = _vector_summary(args.vector) if args.vector is not None else None
    model_info = _model_summary(args.model) if args.model is not None else None
    problem = note = None
    if vector_info is not None and model_info is not None:
        problem, note = _fit(vector_info["_vector"], model_info["_module"])
    if args.json:
        out: dict[str, Any] = {}
        if model_info is not None:
            out["model"] = {k: v for k, v in model_info.items() if not k.startswith("_")}
        if vector_info is not None:
            out["vector"] = {k: v for k, v in vector_info.items() if not k.startswith("_")}
        if model_info is not None and vector_info is not None:
            out["fits"] = problem is None
            out["problem"] = problem
            out["model_type_note"] = note
        print(json.dumps(out, ensure_ascii=False, indent=2, default=str))
        return 0
    if model_info is not None:
        _print_model(model_info)
    if vector_info is not None:
        if model_info is not None:
            print()
        _print_vector(vector_info)
    if model_info is not None and vector_info is not None:
        print()
        print("fits the model: yes" if problem is None else f"fits the model: no ({problem})")
        if note is not None:
            print(f"note: the vector was {note}")
    return 0


def build_demo_model(directory: Path, *, seed: int = 0) -> Path:
    """Save a tiny random GPT-2 and a word-level tokenizer trained on the demo texts into ``directory``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [text for pair in DEMO_PAIRS for text in pair] + [DEMO_PROMPT]
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        initializer_range=0.1,  # livelier random text than GPT-2's 0.02
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@contextmanager
def _work_directory(path: str | None) -> Iterator[tuple[Path, bool]]:
    if path is not None:
        directory = Path(path).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        yield directory, True
        return
    with tempfile.TemporaryDirectory(prefix="tdsteer-demo-") as temporary:
        yield Path(temporary), False


def _cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _work_directory(args.output_dir) as (root, kept):
        model_dir = build_demo_model(root / "tiny-gpt2", seed=args.seed)
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
            print(f"$ {PROG} {shlex.join(argv)}")
            sys.stdout.flush()
            status = _dispatch(argv)
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


COMMANDS = {"extract": _cmd_extract, "generate": _cmd_generate, "info": _cmd_info, "demo": _cmd_demo}


def _dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(join_signed_values(argv))
    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tdsteer``.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: ``0`` on success, ``2`` for a usage or user error (one line on stderr).

    Examples:
        >>> main(["info", "--vector", "/nonexistent.safetensors"])  # doctest: +SKIP
        2
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in arguments
    try:
        with _console():
            return _dispatch(arguments)
    except SystemExit as exit_:  # argparse: --help, --version, usage errors
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, SteeringVectorFileError, ValueError, IndexError, OSError) as error:
        if show_traceback:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
