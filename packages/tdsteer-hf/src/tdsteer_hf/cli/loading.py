"""Opening Hugging Face models and tokenizers for the command line, with one-line errors."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from tdsteer.cli import CLIError, one_line, parse_device

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def add_model_options(parser: Any) -> None:
    """``--model``, ``--dtype`` and ``--device``."""
    parser.add_argument("--model", required=True, help="local model directory or Hugging Face model id")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="auto",
        help="dtype the model is loaded in (default: auto, the checkpoint's dtype)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available, else cpu)")


@contextmanager
def transformers_console(*, quiet: bool = False) -> Iterator[None]:
    """transformers' own warnings kept (``quiet``: errors only), its progress bars off."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.set_verbosity_error()
    else:
        hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path rather than a hub id (``org/model``)."""
    return (
        name.startswith(("/", ".", "~", "\\"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
        or bool(re.match(r"^[A-Za-z]:[\\/]", name))
    )


def model_location(name: str) -> str:
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


def _dtype_kwargs(dtype: str) -> dict[str, Any]:
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: DTYPES[dtype]}


def _is_causal(config: Any) -> bool:
    """Whether the checkpoint is a causal LM, or at least not saved as another kind of model."""
    names = [str(name) for name in (getattr(config, "architectures", None) or [])]
    if not names:
        return True
    return any(name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for name in names)


def load_config(name: str) -> Any:
    """The model's config; a missing or unreadable one is a :class:`CLIError`."""
    location = model_location(name)
    try:
        return AutoConfig.from_pretrained(location)
    except Exception as error:  # noqa: BLE001 - a malformed config.json fails in many ways inside transformers
        if not Path(location).is_dir():
            raise CLIError(
                f"cannot load the model {name!r}: it is not a local folder, and as a Hugging Face hub id it could not "
                f"be fetched (offline, a typo, or a private model?): {one_line(error)}"
            ) from None
        raise CLIError(
            f"cannot load the model config of {name!r} (is config.json a JSON object?): {one_line(error)}"
        ) from None


def load_model(name: str, *, dtype: str = "auto", device: str | None = None, need_generate: bool = False) -> nn.Module:
    """Load a model: ``AutoModelForCausalLM``, or ``AutoModel`` for other checkpoints.

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
    location = model_location(name)
    target = parse_device(device)
    config = load_config(name)
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
    except Exception as error:  # noqa: BLE001 - truncated or corrupted weights fail in many ways (safetensors, torch)
        raise CLIError(f"cannot load model {name!r} (truncated or corrupted weights?): {one_line(error)}") from None
    if need_generate and not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise CLIError(f"model {name!r} ({type(model).__name__}) cannot generate text; use a causal language model")
    loaded: nn.Module = model
    return loaded.to(target).eval()


def load_structure(name: str) -> tuple[nn.Module, bool]:
    """The model built on the meta device from its config (no weights read), else loaded on the CPU.

    Returns:
        The model, and whether its weights were read.
    """
    config = load_config(name)
    try:
        with torch.device("meta"):
            auto = AutoModelForCausalLM if _is_causal(config) else AutoModel
            try:
                return auto.from_config(config), False
            except ValueError:
                return AutoModel.from_config(config), False
    except Exception:  # noqa: BLE001 - some models cannot be built on the meta device: read the weights
        return load_model(name, device="cpu"), True


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, with a pad token (its eos token when it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_location(name))
    except CLIError:
        raise
    except Exception as error:  # noqa: BLE001 - a missing or corrupted tokenizer fails in many ways
        raise CLIError(f"cannot load the tokenizer of {name!r}: {one_line(error)}") from None
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
