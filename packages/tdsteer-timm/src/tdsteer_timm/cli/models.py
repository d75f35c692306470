"""timm models for the command line: names, offline construction, checkpoints."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from timm.models import FeatureDictNet, FeatureHookNet, load_state_dict
from timm.models._features import FeatureGetterNet
from torch import nn

from tdsteer.cli import CLIError
from tdsteer.formats import HEADER_KEY

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


def _fit_classifier(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Resize the model's head to the number of classes of the checkpoint's (a fine-tuned model)."""
    key = _classifier_key(model)
    reset = getattr(model, "reset_classifier", None)
    weight = state.get(key) if key is not None else None
    if key is not None and isinstance(weight, torch.Tensor) and weight.ndim and callable(reset):
        classes = int(weight.shape[0])
        if classes != model.get_parameter(key).shape[0]:
            reset(classes)


def _steering_vector_file(file: Path) -> bool:
    """Whether ``file`` is a tdsteer steering-vector ``.safetensors`` file (its header holds tdsteer's record)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return HEADER_KEY in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file at all: not a vector file either
        return False


def _lm_eval_file(state: Mapping[str, Any]) -> bool:
    """Whether a loaded ``.pt`` file is lm-eval's ``steered`` format: ``{hookpoint: {"steering_vector": ...}}``."""
    return bool(state) and all(isinstance(v, Mapping) and "steering_vector" in v for v in state.values())


def checkpoint_filter(model: nn.Module) -> tuple[Callable[..., Any], nn.Module, str] | None:
    """timm's checkpoint filter for ``model``, the module it takes, and the key prefix of that module.

    The filter is the ``checkpoint_filter_fn`` of the module that defines the model's class: what
    ``timm.create_model(pretrained=True)`` runs on a checkpoint, which resamples a ViT's ``pos_embed``
    or a Swin's relative position tables to the model's input size. A ``features_only`` getter
    (``FeatureGetterNet``) holds the model under ``model.``; a ``FeatureListNet`` has renamed its
    modules, so it has none.

    Examples:
        >>> fn, target, prefix = checkpoint_filter(create("vit_tiny_patch16_224"))
        >>> fn.__module__, prefix
        ('timm.models.vision_transformer', '')
        >>> checkpoint_filter(create("resnet10t")) is None  # ResNet checkpoints need no filter
        True
    """
    target, prefix = model, ""
    if isinstance(model, FeatureGetterNet):
        target, prefix = model.model, "model."
    elif isinstance(model, FeatureHookNet) and "body" in model and len(model) == 1:
        target, prefix = model["body"], "body."
    elif isinstance(model, FeatureDictNet):
        return None
    fn = getattr(sys.modules.get(type(target).__module__), "checkpoint_filter_fn", None)
    return (fn, target, prefix) if callable(fn) else None


def _filtered(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through timm's checkpoint filter for ``model`` (:func:`checkpoint_filter`), or as it is."""
    found = checkpoint_filter(model)
    if found is None:
        return state
    fn, target, prefix = found
    inner = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if prefix and len(inner) != len(state):  # not a checkpoint of the wrapper: leave it to the key check
        return state
    try:
        with warnings.catch_warnings():  # the filter logs each resample; the load below checks the result
            warnings.simplefilter("ignore")
            out = fn(inner, target)
    except Exception:  # noqa: BLE001 - a filter that cannot read this checkpoint: load it as it is
        return state
    if not isinstance(out, Mapping):
        return state
    return {prefix + key: value for key, value in out.items()}


def load_checkpoint(model: nn.Module, path: str, *, image_size: int | None = None) -> None:
    """Load the weights of a ``.safetensors`` or ``.pth`` file into ``model``.

    timm's loader unwraps ``state_dict`` / ``model`` entries and DataParallel prefixes. The weights
    then go through timm's checkpoint filter for the model (:func:`checkpoint_filter`), as with
    ``timm.create_model(pretrained=True, img_size=...)``: a ViT checkpoint for 224 pixels loads into a
    model built for ``--image-size 64``, its position embeddings resampled. A checkpoint whose
    classifier has another number of classes (a fine-tuned model) resizes the model's head first.

    Args:
        model: The model, built by :func:`create`.
        path: The ``--checkpoint`` value.
        image_size: The ``--image-size`` the model was built for, if any (named in a size mismatch).

    Raises:
        CLIError: The file is missing, unreadable, a steering vector, or does not fit the model.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"--checkpoint {path}: no such file")
    vector = (
        f"--checkpoint {path} is a tdsteer steering vector, not model weights; --checkpoint takes the model's "
        "weights (.safetensors or .pth)"
    )
    if _steering_vector_file(file):
        raise CLIError(vector)
    try:
        state = load_state_dict(str(file), use_ema=False, device="cpu")
    except Exception as error:  # noqa: BLE001 - pickle, safetensors and zip errors alike: the file is bad
        raise CLIError(f"--checkpoint {path}: cannot read it ({type(error).__name__}: {error})") from None
    if _lm_eval_file(state):
        raise CLIError(vector.replace("a tdsteer steering vector", "an lm-eval steering vector (steered .pt)"))
    _fit_classifier(model, state)
    state = _filtered(model, dict(state))
    _fit_classifier(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # size mismatches, one per line after a heading
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        hint = (
            f"; it may be for another input size than --image-size {image_size}: try without --image-size"
            if image_size is not None and "size mismatch" in str(error)
            else ""
        )
        first = problems[0].rstrip(".")
        raise CLIError(f"--checkpoint {path} does not fit {type(model).__name__}: {first}{more}{hint}") from None
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys (e.g. {missing[0]!r})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})"] if unexpected else []
        raise CLIError(f"--checkpoint {path} does not fit {type(model).__name__}: {', '.join(parts)}")


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(param.numel() for param in model.parameters())
