"""timm models for the command line: names, offline construction, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import load_state_dict
from torch import nn

from tdsteer.cli import CLIError

HUB_PREFIX = "timm/"


def timm_name(name: str) -> str:
    """``name`` without an optional ``timm/`` prefix (how models are named on the Hugging Face Hub)."""
    return name[len(HUB_PREFIX) :] if name.startswith(HUB_PREFIX) else name


def is_timm_model(name: str) -> bool:
    """Whether timm can build ``name`` (a model name, with an optional ``.tag`` and ``timm/`` prefix)."""
    return bool(name) and timm.is_model(timm_name(name))


def _build(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(timm_name(name), pretrained=False, **kwargs).eval()
    except RuntimeError as error:  # a bad pretrained tag ("resnet18.bogus")
        raise CLIError(f"timm model {name!r}: {error}") from None


def create(name: str, image_size: int | None = None, *, features_only: bool = False) -> nn.Module:
    """Build ``name`` offline with random weights (``pretrained=False``), in eval mode, on the CPU.

    Args:
        name: A timm model name.
        image_size: Input resolution; a model built for one size (ViT, Swin) is built for this one,
            a convolutional network takes any size as it is.
        features_only: Build timm's feature extractor (``features_only=True``) instead of the classifier.

    Raises:
        CLIError: timm has no such model, or no such pretrained tag.
    """
    if not is_timm_model(name):
        raise CLIError(f"unknown timm model {name!r}; see timm.list_models()")
    extra: dict[str, Any] = {"features_only": True} if features_only else {}
    if image_size is not None:
        try:
            return _build(name, img_size=image_size, **extra)
        except TypeError as error:  # the class takes no img_size: it takes any input size
            if "img_size" not in str(error):
                raise
    return _build(name, **extra)


def architecture_name(model: nn.Module) -> str | None:
    """The timm architecture a model was built as (``pretrained_cfg["architecture"]``), or ``None``.

    Examples:
        >>> architecture_name(create("timm/resnet10t.c3_in1k"))
        'resnet10t'
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and name else None


def _classifier_key(model: nn.Module) -> str | None:
    """The parameter name of the classifier weight (``head.weight``, ``fc.weight``...), when there is one."""
    get_classifier = getattr(model, "get_classifier", None)
    weight = getattr(get_classifier(), "weight", None) if callable(get_classifier) else None
    if not isinstance(weight, torch.Tensor):
        return None
    return next((key for key, param in model.named_parameters() if param is weight), None)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load the weights of a ``.safetensors`` or ``.pth`` file into ``model``.

    timm's loader unwraps ``state_dict`` / ``model`` entries and DataParallel prefixes. A checkpoint
    whose classifier has another number of classes (a fine-tuned model) resizes the model's head first.

    Raises:
        CLIError: The file is missing, unreadable, or does not fit the model.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"--checkpoint {path}: no such file")
    try:
        state = load_state_dict(str(file), use_ema=False, device="cpu")
    except Exception as error:  # noqa: BLE001 - pickle, safetensors and zip errors alike: the file is bad
        raise CLIError(f"--checkpoint {path}: cannot read it ({type(error).__name__}: {error})") from None
    key = _classifier_key(model)
    reset = getattr(model, "reset_classifier", None)
    if key is not None and key in state and callable(reset):
        classes = int(state[key].shape[0])
        if classes != model.get_parameter(key).shape[0]:
            reset(classes)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # size mismatches, one per line after a heading
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CLIError(f"--checkpoint {path} does not fit {type(model).__name__}: {problems[0]}{more}") from None
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]!r})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})"] if unexpected else []
        raise CLIError(f"--checkpoint {path} does not fit {type(model).__name__}: {', '.join(parts)}")


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(param.numel() for param in model.parameters())
