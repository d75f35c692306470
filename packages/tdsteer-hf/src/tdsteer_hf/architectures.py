"""Architecture table: where the transformer blocks of a Hugging Face model live.

One frozen :class:`Architecture` record per ``config.model_type`` (in the spirit of timm's
``feature_info``) gives the path of the list of blocks, relative to the *base* model
(``model.base_model``: ``GPT2Model`` inside ``GPT2LMHeadModel``), and for each site kind the sub-path
of the module inside a block and the slot of its output:

========== ===================================================================================
kind       activation
========== ===================================================================================
resid_pre  the residual stream entering the block (the block's input)
resid_post the residual stream leaving the block (the block's output)
attn_out   what the attention sub-layer adds to the residual stream
mlp_out    what the MLP (or mixture-of-experts) sub-layer adds to the residual stream
========== ===================================================================================

``attn_out`` and ``mlp_out`` are taken where the sub-layer's contribution is complete: after a
post-sub-layer norm when the model has one (Gemma 2/3, OLMo 2), at the output projection when the
attention or MLP module adds the residual itself (BLOOM) or normalises after the add (BERT,
RoBERTa). Scalar residual multipliers (Granite) are applied after the hooked module.

Users add their own records with :func:`register_architecture`; :func:`resolve` finds the blocks of
any model, falling back to ``model._no_split_modules`` and then to a guess for unknown types.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from torch import nn

SiteKind = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)
Source = Literal["table", "nested", "blocks_path", "no_split_modules", "guess"]


@dataclass(frozen=True)
class Architecture:
    """Where the blocks and sub-layers of one ``config.model_type`` live.

    Args:
        model_type: The ``config.model_type`` this record describes (``"llama"``).
        blocks: Path of the ``nn.ModuleList`` of blocks relative to the base model
            (``model.base_model``): ``"h"`` for GPT-2, ``"layers"`` for Llama, ``"decoder.layers"``
            for OPT, ``"encoder.layer"`` for BERT.
        attn: Path inside a block of the module whose output is the attention contribution
            (``"self_attn"``), or ``None`` when the model has no such module.
        mlp: Path inside a block of the module whose output is the MLP contribution (``"mlp"``), or
            ``None`` when the model has no such module.
        block_slot: Slot of the hidden states in the block's output when the block returns a tuple
            (``0``); ``None`` when it returns a tensor.
        attn_slot: Slot of the hidden states in the attention module's output.
        mlp_slot: Slot of the hidden states in the MLP module's output.
        note: Why a sub-layer is missing or placed unusually; shown in error messages.

    Examples:
        >>> Architecture("mymodel", blocks="layers", attn="self_attn", mlp="mlp").blocks
        'layers'
    """

    model_type: str
    blocks: str
    attn: str | None = None
    mlp: str | None = None
    block_slot: int | None = None
    attn_slot: int | None = 0
    mlp_slot: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not self.model_type or not isinstance(self.model_type, str):
            raise ValueError(f"Architecture needs a model_type string, got {self.model_type!r}")
        if not self.blocks or not isinstance(self.blocks, str):
            raise ValueError(f"Architecture {self.model_type!r} needs a blocks path such as 'layers'")

    def sub_path(self, kind: str) -> tuple[str | None, int | None]:
        """Return ``(path inside a block, output slot)`` of a site kind; ``path`` ``""`` is the block."""
        if kind in ("resid_pre", "resid_post"):
            return "", self.block_slot if kind == "resid_post" else 0
        if kind == "attn_out":
            return self.attn, self.attn_slot
        if kind == "mlp_out":
            return self.mlp, self.mlp_slot
        raise ValueError(f"Unknown site kind {kind!r}; use one of {', '.join(SITE_KINDS)}")


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(
    spec: Architecture | str,
    *,
    blocks: str | None = None,
    attn: str | None = None,
    mlp: str | None = None,
    block_slot: int | None = None,
    attn_slot: int | None = 0,
    mlp_slot: int | None = None,
    note: str = "",
    overwrite: bool = False,
) -> Architecture:
    """Add an architecture record to the table, so :func:`tdsteer_hf.sites` knows the model type.

    Args:
        spec: An :class:`Architecture`, or a ``config.model_type`` string with the fields given as
            keywords.
        blocks: With a string ``spec``: path of the blocks relative to the base model.
        attn: With a string ``spec``: path of the attention module inside a block.
        mlp: With a string ``spec``: path of the MLP module inside a block.
        block_slot: With a string ``spec``: slot of the hidden states in a block's tuple output.
        attn_slot: With a string ``spec``: slot of the hidden states in the attention output.
        mlp_slot: With a string ``spec``: slot of the hidden states in the MLP output.
        note: With a string ``spec``: remark shown in error messages.
        overwrite: Replace an existing record of the same model type instead of raising.

    Returns:
        The registered record.

    Raises:
        ValueError: The model type is already registered and ``overwrite`` is false.

    Examples:
        >>> record = register_architecture("my_llama_like", blocks="layers", attn="self_attn", mlp="mlp")
        >>> architecture("my_llama_like").attn
        'self_attn'
    """
    if isinstance(spec, Architecture):
        record = spec
    elif isinstance(spec, str):
        if blocks is None:
            raise ValueError(f"register_architecture({spec!r}) needs blocks=, the path of the block list")
        record = Architecture(spec, blocks, attn, mlp, block_slot, attn_slot, mlp_slot, note)
    else:
        raise TypeError(
            f"register_architecture takes an Architecture or a model type string, got {type(spec).__name__}"
        )
    if record.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"Architecture {record.model_type!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[record.model_type] = record
    return record


def architecture_for(
    model_type: str, *, overwrite: bool = False
) -> Callable[[Callable[[], Architecture]], Callable[[], Architecture]]:
    """Decorator form of :func:`register_architecture`: register the record a function returns.

    Examples:
        >>> @architecture_for("my_decoder")
        ... def my_decoder() -> Architecture:
        ...     return Architecture("my_decoder", blocks="decoder.blocks", attn="attn", mlp="ffn")
        >>> architecture("my_decoder").mlp
        'ffn'
    """

    def decorator(factory: Callable[[], Architecture]) -> Callable[[], Architecture]:
        record = factory()
        if not isinstance(record, Architecture) or record.model_type != model_type:
            raise ValueError(
                f"@architecture_for({model_type!r}) must decorate a function returning Architecture({model_type!r}, ...)"
            )
        register_architecture(record, overwrite=overwrite)
        return factory

    return decorator


def architecture(model_type: str) -> Architecture | None:
    """Return the record registered for ``model_type``, or ``None``.

    Examples:
        >>> architecture("gpt2").blocks
        'h'
    """
    return _REGISTRY.get(model_type)


def supported_model_types() -> list[str]:
    """Sorted list of the registered ``config.model_type`` values.

    Examples:
        >>> "llama" in supported_model_types()
        True
    """
    return sorted(_REGISTRY)


# --- the table --------------------------------------------------------------------------------------

_LLAMA_LIKE = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "phi",
    "phi3",
    "olmo",
    "cohere",
    "stablelm",
    "starcoder2",
    "granite",
    "olmoe",
    "phimoe",
    "deepseek_v3",
    "smollm3",
)
for _type in _LLAMA_LIKE:
    register_architecture(_type, blocks="layers", attn="self_attn", mlp="mlp")

# Sub-layers normalised before the residual add: the contribution is the post-norm's output.
for _type in ("gemma2", "gemma3_text", "olmo2"):
    register_architecture(
        _type, blocks="layers", attn="post_attention_layernorm", attn_slot=None, mlp="post_feedforward_layernorm"
    )
register_architecture(
    "gemma3",
    blocks="language_model.layers",
    attn="post_attention_layernorm",
    attn_slot=None,
    mlp="post_feedforward_layernorm",
)
register_architecture("gpt2", blocks="h", attn="attn", mlp="mlp")
register_architecture("granitemoe", blocks="layers", attn="self_attn", mlp="block_sparse_moe")
register_architecture("gpt_bigcode", blocks="h", attn="attn", mlp="mlp")
register_architecture("codegen", blocks="h", attn="attn", mlp="mlp")
register_architecture("gpt_neo", blocks="h", attn="attn", mlp="mlp", block_slot=0)
register_architecture("gptj", blocks="h", attn="attn", mlp="mlp")
register_architecture("gpt_neox", blocks="layers", attn="attention", mlp="mlp")
register_architecture(
    "opt",
    blocks="decoder.layers",
    attn="self_attn",
    mlp=None,
    note="OPT has no MLP module; its fc1/fc2 layers run on flattened [batch*tokens, hidden] tensors",
)
# BLOOM's attention and MLP modules add the residual themselves: hook their output projections.
register_architecture(
    "bloom", blocks="h", attn="self_attention.dense", attn_slot=None, mlp="mlp.dense_4h_to_h", block_slot=0
)
register_architecture("falcon", blocks="h", attn="self_attention", mlp="mlp", block_slot=0)
# Post-norm encoders: attention.output and output add the residual and normalise; hook the projections.
for _type in ("bert", "roberta"):
    register_architecture(
        _type, blocks="encoder.layer", attn="attention.output.dense", attn_slot=None, mlp="output.dense"
    )
register_architecture("distilbert", blocks="transformer.layer", attn="attention", mlp="ffn")


# --- resolution -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    """Where the blocks of one model instance are, and how they were found.

    Args:
        model_type: ``model.config.model_type``, or ``None`` for a model without a config.
        blocks_path: Path of the block list relative to the model passed in (``"model.layers"``).
        num_layers: Number of blocks.
        hidden_size: Width of the residual stream when the config tells it, else ``None``.
        source: How the blocks were found: ``"table"`` (registered record), ``"nested"`` (the record
            of a registered sub-model, e.g. the language model of a vision-language model),
            ``"blocks_path"`` (given by the caller), ``"no_split_modules"`` (block class named by
            ``model._no_split_modules``) or ``"guess"`` (largest list of identical modules).
        architecture: The record used for sub-layer paths, or ``None`` when none applies.
        input_kwarg: Name of the block's first ``forward`` argument (the hidden states).
        kinds: The site kinds this layout can resolve (``resid_pre`` and ``resid_post`` only when
            no architecture record applies).

    Examples:
        >>> layout = ModelLayout("gpt2", "transformer.h", 12, 768, "table", architecture("gpt2"))
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


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) and value else None


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    candidates = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            candidates.insert(0, get_text_config())
        except Exception:  # noqa: BLE001 - a config without a text part
            pass
    for cfg in candidates:
        for attr in ("hidden_size", "n_embd", "d_model", "dim"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


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
        hidden_size=_hidden_size(model),
        source=source,
        architecture=record,
        input_kwarg=_first_argument(blocks[0]),
        kinds=kinds,
    )


def _unsupported_message(model: nn.Module, model_type: str | None) -> str:
    what = f"model type {model_type!r}" if model_type else "a model without config.model_type"
    return (
        f"tdsteer_hf does not know where the blocks of {type(model).__name__} ({what}) are, and found no "
        f"list of identical blocks to fall back on. Supported model types: {', '.join(supported_model_types())}. "
        "Pass blocks_path='path.to.blocks' (the nn.ModuleList of transformer blocks, as in "
        "model.named_modules()), or register the model type with "
        "tdsteer_hf.register_architecture('my_type', blocks='layers', attn='self_attn', mlp='mlp')."
    )


def resolve(model: nn.Module, *, blocks_path: str | None = None) -> ModelLayout:
    """Find the blocks of ``model`` and the record that names its sub-layers.

    The search order is: ``blocks_path`` when given; the registered record of
    ``model.config.model_type`` (its path tried under ``model.base_model``, then as a unique path
    suffix, so head models, bare models and wrappers all work); the record of a registered sub-model
    (the language model inside a vision-language model); the module list whose block class is named
    in ``model._no_split_modules``; and last, with a warning, the largest list of identical modules.

    Args:
        model: A Hugging Face model (head or bare) or any ``nn.Module`` with a list of blocks.
        blocks_path: Path of the block list relative to ``model``, overriding every lookup.

    Returns:
        A :class:`ModelLayout`.

    Raises:
        ValueError: ``blocks_path`` names no module list, or nothing fits; the message lists the
            supported model types and the ``blocks_path=`` override.

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> resolve(model).blocks_path
        'transformer.h'
    """
    model_type = _model_type(model)
    record = _REGISTRY.get(model_type) if model_type else None

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
        return _layout(model, path, "table", record, model_type)

    # A registered sub-model: the language tower of a vision-language model, a wrapped decoder.
    nested: list[tuple[str, Architecture]] = []
    for name, module in model.named_modules():
        sub_type = _model_type(module) if name else None
        inside_found = any(name.startswith(found + ".") for found, _ in nested)
        if sub_type and sub_type in _REGISTRY and not inside_found:
            nested.append((name, _REGISTRY[sub_type]))
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

    candidates = [
        (name, module) for name, module in model.named_modules() if _is_block_list(module) and _identical_blocks(module)
    ]
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    named = [(name, module) for name, module in candidates if type(module[0]).__name__ in no_split]
    if named:
        if len(named) > 1:
            text_like = [
                item for item in named if any(k in item[0] for k in ("language_model", "text_model", "decoder"))
            ]
            chosen = max(text_like or named, key=lambda item: _size(item[1]))
            warnings.warn(
                f"{type(model).__name__} has several block lists named by _no_split_modules "
                f"({[name for name, _ in named]}); using {chosen[0]!r}. Pass blocks_path= to choose another.",
                UserWarning,
                stacklevel=3,
            )
        else:
            chosen = named[0]
        return _layout(model, chosen[0], "no_split_modules", None, model_type)

    if candidates:
        chosen = max(candidates, key=lambda item: (_size(item[1]), -item[0].count(".")))
        warnings.warn(
            f"Model type {model_type!r} is not registered and names no block class in _no_split_modules; "
            f"guessing that the blocks are the largest list of identical modules, {chosen[0]!r} ({len(chosen[1])} x {type(chosen[1][0]).__name__}). "
            "Pass blocks_path= or tdsteer_hf.register_architecture(...) to make this explicit.",
            UserWarning,
            stacklevel=3,
        )
        return _layout(model, chosen[0], "guess", None, model_type)

    raise ValueError(_unsupported_message(model, model_type))


def _size(module: nn.Module) -> int:
    """Parameter count: a list of blocks outweighs any list nested inside its blocks (MoE experts)."""
    return sum(parameter.numel() for parameter in module.parameters())
