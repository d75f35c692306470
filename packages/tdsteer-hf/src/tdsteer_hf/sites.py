"""From "layer 6, residual stream after the block" to :class:`tdsteer.Site` records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from tdsteer import Site, take_indices
from tdsteer_hf.architectures import SITE_KINDS, ModelLayout, resolve

Layers = int | Sequence[int] | slice | range | None


def sites(
    model: nn.Module,
    layers: Layers = None,
    kind: str = "resid_post",
    *,
    blocks_path: str | None = None,
) -> list[Site]:
    """Sites of a Hugging Face model, one per chosen layer, paths relative to ``model``.

    Args:
        model: The model as you will call it (``LlamaForCausalLM`` or the bare ``LlamaModel``).
        layers: Which blocks: ``None`` for all, an int, a sequence of ints, a ``slice`` or ``range``;
            negative indices count from the end (:func:`tdsteer.take_indices`).
        kind: ``"resid_post"`` (block output, default), ``"resid_pre"`` (block input),
            ``"attn_out"`` or ``"mlp_out"`` (what the sub-layer adds to the residual stream).
        blocks_path: Path of the block list relative to ``model``, overriding the architecture table
            (``"model.layers"``).

    Returns:
        One :class:`tdsteer.Site` per layer, in the order given.

    Raises:
        ValueError: Unknown ``kind``, a kind the architecture has no module for, or a model whose
            blocks cannot be found (the message lists the supported types and ``blocks_path=``).
        IndexError: A layer index is out of range (the message names the valid range).

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64))
        >>> [s.path for s in sites(model, layers=[0, -1])]
        ['transformer.h.0', 'transformer.h.3']
        >>> sites(model, 1, kind="mlp_out")[0].path
        'transformer.h.1.mlp'
        >>> sites(model, 0, kind="resid_pre")[0].io
        'input'
    """
    if kind not in SITE_KINDS:
        raise ValueError(f"Unknown site kind {kind!r}; use one of {', '.join(SITE_KINDS)}")
    layout = resolve(model, blocks_path=blocks_path)
    indices = take_indices(layout.num_layers, layers, what="layer")
    if kind in ("resid_pre", "resid_post"):
        slot = layout.architecture.block_slot if layout.architecture is not None else None
        if kind == "resid_pre":
            return [Site(layout.block(i), slot=0, io="input", kwarg=layout.input_kwarg) for i in indices]
        return [Site(layout.block(i), slot=slot) for i in indices]
    record = layout.architecture
    if record is None:
        raise ValueError(
            f"Site kind {kind!r} needs to know the sub-layers of the blocks, but model type "
            f"{layout.model_type!r} is not registered (blocks found by {layout.source}). Register it with "
            "tdsteer_hf.register_architecture('my_type', blocks='layers', attn='self_attn', mlp='mlp'), or use "
            "kind='resid_post' / 'resid_pre'."
        )
    sub, slot = record.sub_path(kind)
    if sub is None:
        reason = f" ({record.note})" if record.note else ""
        raise ValueError(
            f"Model type {record.model_type!r} has no module for site kind {kind!r}{reason}; "
            f"use one of {', '.join(k for k in SITE_KINDS if record.sub_path(k)[0] is not None)}"
        )
    return [Site(f"{layout.block(i)}.{sub}", slot=slot) for i in indices]


def num_layers(model: nn.Module, *, blocks_path: str | None = None) -> int:
    """Number of transformer blocks of ``model``.

    Args:
        model: A Hugging Face model.
        blocks_path: Path of the block list, overriding the architecture table.

    Returns:
        The number of blocks.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
        ...                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
        >>> num_layers(LlamaForCausalLM(config))
        3
    """
    return resolve(model, blocks_path=blocks_path).num_layers


def describe(model: nn.Module, *, blocks_path: str | None = None) -> dict[str, Any]:
    """Summary of how tdsteer_hf sees ``model``: blocks, layer count, hidden size, site templates.

    Args:
        model: A Hugging Face model.
        blocks_path: Path of the block list, overriding the architecture table.

    Returns:
        A JSON-compatible dict with ``model_type``, ``blocks_path``, ``num_layers``, ``hidden_size``,
        ``source`` (how the blocks were found) and ``sites`` (kind -> path template with ``{i}``).

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> describe(model)["sites"]["attn_out"]
        'transformer.h.{i}.attn'
    """
    layout: ModelLayout = resolve(model, blocks_path=blocks_path)
    templates: dict[str, str] = {}
    block = f"{layout.blocks_path}.{{i}}" if layout.blocks_path else "{i}"
    for kind in layout.kinds:
        if kind == "resid_pre":
            templates[kind] = f"{block} (input)"
        elif kind == "resid_post":
            templates[kind] = block
        elif layout.architecture is not None:
            sub, _ = layout.architecture.sub_path(kind)
            if sub is not None:
                templates[kind] = f"{block}.{sub}"
    return {
        "model_type": layout.model_type,
        "blocks_path": layout.blocks_path,
        "num_layers": layout.num_layers,
        "hidden_size": layout.hidden_size,
        "source": layout.source,
        "sites": templates,
    }
