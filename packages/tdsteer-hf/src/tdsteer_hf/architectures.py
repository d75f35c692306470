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

Users add their own records with :func:`register_architecture` or :func:`architecture_for`;
:func:`tdsteer_hf.resolution.resolve` finds the blocks of any model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, get_args

SiteKind = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)
DEFAULT_KIND = "resid_post"


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
    key: Architecture | str,
    spec: Architecture | None = None,
    /,
    *,
    overwrite: bool = False,
    blocks: str | None = None,
    attn: str | None = None,
    mlp: str | None = None,
    block_slot: int | None = None,
    attn_slot: int | None = 0,
    mlp_slot: int | None = None,
    note: str = "",
) -> Architecture:
    """Add an architecture record to the table, so :func:`tdsteer_hf.sites` knows the model type.

    Args:
        key: A ``config.model_type`` string, or an :class:`Architecture` (registered under its own type).
        spec: With a string ``key``: the :class:`Architecture` to register under it; or leave it out
            and give the fields as keywords.
        overwrite: Replace an existing record of the same model type instead of raising.
        blocks: Path of the blocks relative to the base model.
        attn: Path of the attention module inside a block.
        mlp: Path of the MLP module inside a block.
        block_slot: Slot of the hidden states in a block's tuple output.
        attn_slot: Slot of the hidden states in the attention output.
        mlp_slot: Slot of the hidden states in the MLP output.
        note: Remark shown in error messages.

    Returns:
        The registered record.

    Raises:
        ValueError: The model type is already registered and ``overwrite`` is false.
        TypeError: ``key`` is neither a string nor an :class:`Architecture`, or ``spec`` is not an
            :class:`Architecture`.

    Examples:
        >>> record = register_architecture("my_llama_like", blocks="layers", attn="self_attn", mlp="mlp")
        >>> architecture("my_llama_like").attn
        'self_attn'
    """
    if isinstance(key, Architecture):
        record = key
    elif isinstance(key, str) and isinstance(spec, Architecture):
        record = replace(spec, model_type=key)
    elif isinstance(key, str) and spec is None:
        if blocks is None:
            raise ValueError(f"register_architecture({key!r}) needs blocks=, the path of the block list")
        record = Architecture(key, blocks, attn, mlp, block_slot, attn_slot, mlp_slot, note)
    elif isinstance(key, str):
        raise TypeError(
            f"register_architecture({key!r}, spec): spec must be an Architecture (or leave it out and give the "
            f"fields as keywords), got {type(spec).__name__}"
        )
    else:
        raise TypeError(
            "register_architecture takes a model type string (with an Architecture or keyword fields) or an "
            f"Architecture, got {type(key).__name__}"
        )
    if record.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"Architecture {record.model_type!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[record.model_type] = record
    return record


def architecture_for(
    *model_types: str, overwrite: bool = False
) -> Callable[[Callable[[], Architecture]], Callable[[], Architecture]]:
    """Decorator form of :func:`register_architecture`: register the record a function returns.

    The function takes no argument and returns an :class:`Architecture`; it is registered under each
    of ``model_types`` (the record's own ``model_type`` must be one of them).

    Examples:
        >>> @architecture_for("my_decoder")
        ... def my_decoder() -> Architecture:
        ...     return Architecture("my_decoder", blocks="decoder.blocks", attn="attn", mlp="ffn")
        >>> architecture("my_decoder").mlp
        'ffn'
    """
    if not model_types:
        raise TypeError("architecture_for needs at least one model type")

    def decorator(factory: Callable[[], Architecture]) -> Callable[[], Architecture]:
        record = factory()
        if not isinstance(record, Architecture) or record.model_type not in model_types:
            raise ValueError(
                f"@architecture_for({', '.join(map(repr, model_types))}) must decorate a function returning "
                f"Architecture({model_types[0]!r}, ...)"
            )
        for model_type in model_types:
            register_architecture(model_type, record, overwrite=overwrite)
        return factory

    return decorator


def architecture(model_type: str) -> Architecture | None:
    """Return the record registered for ``model_type``, or ``None``.

    Examples:
        >>> architecture("gpt2").blocks
        'h'
    """
    return _REGISTRY.get(model_type)


def supported() -> list[str]:
    """Sorted list of the registered ``config.model_type`` values.

    Examples:
        >>> "llama" in supported()
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
