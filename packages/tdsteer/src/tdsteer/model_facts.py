"""What tdsteer reads off a model for a vector's metadata and checks: type, name and hidden size.

The one owner of these rules: extraction, the activation cache, vector validation and both adapters
read a model through these functions, so a vector records exactly what a later check compares.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_HIDDEN_SIZE_ATTRIBUTES = ("hidden_size", "n_embd", "d_model", "dim")


def model_type_of(model: nn.Module) -> str:
    """The model type recorded in vectors: ``config.model_type`` when there is one, else the class name.

    Examples:
        >>> import torch
        >>> model_type_of(torch.nn.Linear(2, 2))
        'Linear'
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return str(model_type) if isinstance(model_type, str) and model_type else type(model).__name__


def config_model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of ``model``, or ``None`` when it has no config or no type."""
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) and value else None


def model_hidden_size(model: nn.Module) -> int | None:
    """Width of the model's residual stream when its config tells it, else ``None``.

    The text part of a multi-modal config is read first (``get_text_config()``, ``text_config``),
    then the config itself; the first of ``hidden_size``, ``n_embd``, ``d_model``, ``dim`` that is an
    int wins.

    Examples:
        >>> import torch
        >>> model_hidden_size(torch.nn.Linear(2, 2)) is None
        True
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    candidates: list[Any] = []
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            candidates.append(get_text_config())
        except Exception:  # noqa: BLE001 - a config without a text part
            pass
    candidates += [getattr(config, "text_config", None), config]
    for candidate in candidates:
        if candidate is None:
            continue
        for attribute in _HIDDEN_SIZE_ATTRIBUTES:
            value = getattr(candidate, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def model_name_of(model: nn.Module) -> str | None:
    """The model name recorded in vectors, when the model tells it.

    ``config.name_or_path`` (or ``_name_or_path``) for Hugging Face models; the ``architecture`` of
    ``pretrained_cfg`` (or ``default_cfg``) for timm models (``"vit_tiny_patch16_224"``).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> model.pretrained_cfg = {"architecture": "tiny_net"}
        >>> model_name_of(model)
        'tiny_net'
    """
    config = getattr(model, "config", None)
    for attribute in ("name_or_path", "_name_or_path"):
        value = getattr(config, attribute, None)
        if value:
            return str(value)
    for attribute in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attribute, None)
        name = cfg.get("architecture") if isinstance(cfg, dict) else None
        if isinstance(name, str) and name:
            return name
    return None


def base_model_prefix(model: nn.Module) -> str:
    """Path of ``model.base_model`` inside ``model``: what lm-eval's hookpoints are relative to.

    Returns:
        The module path (``"transformer"`` for GPT-2, ``"model"`` for Llama), or ``""`` when the
        model is its own base model or has none.

    Examples:
        >>> import torch
        >>> base_model_prefix(torch.nn.Linear(2, 2))
        ''
    """
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""
