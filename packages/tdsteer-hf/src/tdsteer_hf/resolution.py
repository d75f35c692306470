"""Finding the blocks of one Hugging Face model: the registered record, or the fallback.

The search order is: ``blocks_path`` when given; the registered record of ``config.model_type``;
the record of a registered sub-model (the language model inside a vision-language model); and, for
an unregistered type with ``fallback=True``, the module list whose block class is named in
``model._no_split_modules``, then the largest list of identical modules, each with a warning.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from tdsteer.adapter import warn_fallback
from tdsteer.errors import UnknownArchitectureError
from tdsteer.model_facts import config_model_type, model_hidden_size
from tdsteer_hf.architectures import SITE_KINDS, Architecture, architecture, supported

Source = Literal["registry", "nested", "blocks_path", "no_split_modules", "guess"]
FALLBACK_SOURCES: tuple[str, ...] = ("no_split_modules", "guess")
_REGISTER = "tdsteer_hf.register_architecture('my_type', blocks='layers', attn='self_attn', mlp='mlp')"


@dataclass(frozen=True)
class ModelLayout:
    """Where the blocks of one model instance are, and how they were found.

    Args:
        model_type: ``model.config.model_type``, or ``None`` for a model without a config.
        blocks_path: Path of the block list relative to the model passed in (``"model.layers"``).
        num_layers: Number of blocks.
        hidden_size: Width of the residual stream when the config tells it, else ``None``.
        source: How the blocks were found: ``"registry"`` (registered record), ``"nested"`` (the record
            of a registered sub-model, e.g. the language model of a vision-language model),
            ``"blocks_path"`` (given by the caller), ``"no_split_modules"`` (block class named by
            ``model._no_split_modules``) or ``"guess"`` (largest list of identical modules).
        architecture: The record used for sub-layer paths, or ``None`` when none applies.
        input_kwarg: Name of the block's first ``forward`` argument (the hidden states).
        kinds: The site kinds this layout can resolve (``resid_pre`` and ``resid_post`` only when
            no architecture record applies).

    Examples:
        >>> layout = ModelLayout("gpt2", "transformer.h", 12, 768, "registry", architecture("gpt2"))
        >>> layout.block(3)
        'transformer.h.3'
    """

    model_type: str | None
    blocks_path: str
    num_layers: int
    hidden_size: int | None
    source: Source
    architecture: Architecture | None
    input_kwarg: str = "hidden_states"
    kinds: tuple[str, ...] = field(default=SITE_KINDS)

    def block(self, index: int) -> str:
        """Path of block ``index`` (non-negative) relative to the model root."""
        return f"{self.blocks_path}.{index}" if self.blocks_path else str(index)


def _module_path(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _is_block_list(module: Any) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0


def _identical_blocks(module: nn.Module) -> bool:
    children = list(module.children())
    return bool(children) and len({type(child) for child in children}) == 1


def _find_record_blocks(model: nn.Module, prefix: str, record: Architecture) -> str | None:
    """Path of ``record.blocks`` under ``prefix``, or the one module list whose path ends with it."""
    modules = dict(model.named_modules())
    exact = _join(prefix, record.blocks)
    if _is_block_list(modules.get(exact)):
        return exact
    matches = [
        name
        for name, module in modules.items()
        if (name == record.blocks or name.endswith("." + record.blocks)) and _is_block_list(module)
    ]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(
            f"The {type(model).__name__} has several block lists matching {record.blocks!r} of the "
            f"{record.model_type!r} record: {matches}. Pass blocks_path= with the one to steer."
        )
    return None


def _first_argument(block: nn.Module) -> str:
    try:
        parameters = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        return "hidden_states"
    for parameter in parameters:
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return parameter.name
    return "hidden_states"


def _layout(
    model: nn.Module, path: str, source: Source, record: Architecture | None, model_type: str | None
) -> ModelLayout:
    blocks = model.get_submodule(path) if path else model
    assert isinstance(blocks, (nn.ModuleList, nn.Sequential))
    kinds = SITE_KINDS if record is not None else ("resid_pre", "resid_post")
    return ModelLayout(
        model_type=model_type,
        blocks_path=path,
        num_layers=len(blocks),
        hidden_size=model_hidden_size(model),
        source=source,
        architecture=record,
        input_kwarg=_first_argument(blocks[0]),
        kinds=kinds,
    )


def _unknown(model: nn.Module, model_type: str | None, reason: str) -> UnknownArchitectureError:
    what = f"model type {model_type!r}" if model_type else "no config.model_type"
    return UnknownArchitectureError(
        "tdsteer_hf",
        f"{type(model).__name__} ({what})",
        supported(),
        _REGISTER,
        "blocks_path='path.to.blocks' (the nn.ModuleList of transformer blocks, as in model.named_modules())",
        reason,
    )


def resolve(model: nn.Module, *, blocks_path: str | None = None, fallback: bool = True) -> ModelLayout:
    """Find the blocks of ``model`` and the record that names its sub-layers.

    The search order is: ``blocks_path`` when given; the registered record of
    ``model.config.model_type`` (its path tried under ``model.base_model``, then as a unique path
    suffix, so head models, bare models and wrappers all work); the record of a registered sub-model
    (the language model inside a vision-language model); then, with ``fallback=True`` and a warning,
    the module list whose block class is named in ``model._no_split_modules``, and last the largest
    list of identical modules.

    Args:
        model: A Hugging Face model (head or bare) or any ``nn.Module`` with a list of blocks.
        blocks_path: Path of the block list relative to ``model``, overriding every lookup.
        fallback: Guess the blocks of an unregistered model (with a warning) instead of refusing.

    Returns:
        A :class:`ModelLayout`.

    Raises:
        UnknownArchitectureError: Nothing registered fits and the fallback is off or finds nothing;
            the message lists the supported model types and the ``blocks_path=`` override.
        ValueError: ``blocks_path`` names no module list.
        TypeError: ``model`` is not a ``torch.nn.Module`` (a model name, say).

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> resolve(model).blocks_path
        'transformer.h'
    """
    if not isinstance(model, nn.Module):
        hint = (
            f"; load the model first, e.g. transformers.AutoModelForCausalLM.from_pretrained({model!r})"
            if isinstance(model, str)
            else ""
        )
        raise TypeError(f"tdsteer_hf expects a torch.nn.Module, got {type(model).__name__}{hint}")
    model_type = config_model_type(model)
    record = architecture(model_type) if model_type else None

    if blocks_path is not None:
        try:
            blocks = model.get_submodule(blocks_path) if blocks_path else model
        except AttributeError:
            blocks = None
        if not _is_block_list(blocks):
            raise ValueError(
                f"blocks_path={blocks_path!r} does not name a non-empty nn.ModuleList of {type(model).__name__}; "
                "pick the list of transformer blocks from model.named_modules()"
            )
        return _layout(model, blocks_path, "blocks_path", record, model_type)

    if record is not None:
        base = getattr(model, "base_model", model)
        prefix = _module_path(model, base) if isinstance(base, nn.Module) else ""
        path = _find_record_blocks(model, prefix or "", record)
        if path is None:
            raise ValueError(
                f"The {record.model_type!r} record places the blocks at {record.blocks!r} under the base model, "
                f"but {type(model).__name__} has no such module list. Pass blocks_path= or replace the record "
                "with tdsteer_hf.register_architecture(..., overwrite=True)."
            )
        return _layout(model, path, "registry", record, model_type)

    # A registered sub-model: the language tower of a vision-language model, a wrapped decoder.
    nested: list[tuple[str, Architecture]] = []
    for name, module in model.named_modules():
        sub_type = config_model_type(module) if name else None
        sub_record = architecture(sub_type) if sub_type else None
        inside_found = any(name.startswith(found + ".") for found, _ in nested)
        if sub_record is not None and not inside_found:
            nested.append((name, sub_record))
    if nested:
        if len(nested) > 1:
            text_type = None
            get_text_config = getattr(getattr(model, "config", None), "get_text_config", None)
            if callable(get_text_config):
                text_type = getattr(get_text_config(), "model_type", None)
            preferred = [item for item in nested if item[1].model_type == text_type]
            if len(preferred) != 1:
                raise ValueError(
                    f"{type(model).__name__} holds several registered sub-models "
                    f"{[(name, rec.model_type) for name, rec in nested]}; pass blocks_path= with the blocks to use"
                )
            nested = preferred
        name, sub_record = nested[0]
        path = _find_record_blocks(model, name, sub_record)
        if path is not None:
            return _layout(model, path, "nested", sub_record, model_type)

    if not fallback:
        raise _unknown(model, model_type, "fallback=False: no guess from _no_split_modules or the module tree")
    candidates = [
        (name, module) for name, module in model.named_modules() if _is_block_list(module) and _identical_blocks(module)
    ]
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    named = [(name, module) for name, module in candidates if type(module[0]).__name__ in no_split]
    if named:
        text_like = [item for item in named if any(k in item[0] for k in ("language_model", "text_model", "decoder"))]
        chosen = max(text_like or named, key=lambda item: _size(item[1]))
        others = f" (of {[name for name, _ in named]})" if len(named) > 1 else ""
        warn_fallback(
            "tdsteer_hf",
            model,
            f"the blocks are {chosen[0]!r}{others}, the list of the block class named in _no_split_modules; "
            "pass blocks_path= to choose another",
            _REGISTER,
        )
        return _layout(model, chosen[0], "no_split_modules", None, model_type)

    if candidates:
        chosen = max(candidates, key=lambda item: (_size(item[1]), -item[0].count(".")))
        warn_fallback(
            "tdsteer_hf",
            model,
            f"the blocks are the largest list of identical modules, {chosen[0]!r} "
            f"({len(chosen[1])} x {type(chosen[1][0]).__name__}), since _no_split_modules names no block class; "
            "pass blocks_path= to choose another",
            _REGISTER,
        )
        return _layout(model, chosen[0], "guess", None, model_type)

    raise _unknown(model, model_type, "found no list of identical blocks to fall back on")


def _size(module: nn.Module) -> int:
    """Parameter count: a list of blocks outweighs any list nested inside its blocks (MoE experts)."""
    return sum(parameter.numel() for parameter in module.parameters())
