"""From "layer 6, residual stream after the block" to :class:`tdsteer.Site` records.

The three functions of the adapter contract (:mod:`tdsteer.adapter`): :func:`describe` builds one
:class:`tdsteer.ModelDescription` with every site of every kind, and :func:`sites` and
:func:`num_layers` read it, so the one index rule (:func:`tdsteer.take_indices`) applies.
"""

from __future__ import annotations

from torch import nn

from tdsteer import ModelDescription, Site, SiteInfo
from tdsteer.indices import IndexSpec
from tdsteer_hf.architectures import DEFAULT_KIND, SITE_KINDS
from tdsteer_hf.resolution import FALLBACK_SOURCES, ModelLayout, resolve


def _kind_sites(layout: ModelLayout, kind: str) -> list[Site] | str:
    """The sites of ``kind`` at every layer, or why the model has none."""
    record = layout.architecture
    if kind == "resid_pre":
        return [Site(layout.block(i), slot=0, io="input", kwarg=layout.input_kwarg) for i in range(layout.num_layers)]
    slot = record.block_slot if record is not None else None
    if kind == "resid_post":
        return [Site(layout.block(i), slot=slot) for i in range(layout.num_layers)]
    if record is None:
        return (
            f"model type {layout.model_type!r} is not registered (blocks found by {layout.source}), so its "
            "sub-layers are unknown; register it with tdsteer_hf.register_architecture('my_type', blocks='layers', "
            "attn='self_attn', mlp='mlp')"
        )
    sub, slot = record.sub_path(kind)
    if sub is None:
        return record.note or f"model type {record.model_type!r} has no module for it"
    return [Site(f"{layout.block(i)}.{sub}", slot=slot) for i in range(layout.num_layers)]


def describe(model: nn.Module, *, blocks_path: str | None = None, fallback: bool = True) -> ModelDescription:
    """How tdsteer_hf sees ``model``: every site of every kind, the layer count, the hidden size.

    Args:
        model: A Hugging Face model (head or bare) or any ``nn.Module`` with a list of blocks.
        blocks_path: Path of the block list, overriding the architecture table.
        fallback: Guess the blocks of an unregistered model (with a warning) instead of refusing.

    Returns:
        A :class:`tdsteer.ModelDescription`; ``architecture`` is the ``config.model_type``.

    Raises:
        tdsteer.UnknownArchitectureError: The blocks cannot be found (the message lists the
            supported types and ``blocks_path=``).
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> info = describe(model)
        >>> info.num_layers(), info.hidden_size, info.of_kind("attn_out")[1].path
        (2, 32, 'transformer.h.1.attn')
    """
    layout = resolve(model, blocks_path=blocks_path, fallback=fallback)
    records: list[SiteInfo] = []
    unavailable: dict[str, str] = {}
    for kind in SITE_KINDS:
        found = _kind_sites(layout, kind)
        if isinstance(found, str):
            unavailable[kind] = found
            continue
        records += [SiteInfo(kind, i, site, layout.hidden_size) for i, site in enumerate(found)]
    return ModelDescription(
        adapter="tdsteer_hf",
        model_class=type(model).__name__,
        architecture=layout.model_type or type(model).__name__,
        source=layout.source,
        guessed=layout.source in FALLBACK_SOURCES,
        hidden_size=layout.hidden_size,
        sites=tuple(records),
        kinds=SITE_KINDS,
        default_kind=DEFAULT_KIND,
        unavailable=unavailable,
    )


def sites(
    model: nn.Module,
    layers: IndexSpec = None,
    kind: str = DEFAULT_KIND,
    *,
    blocks_path: str | None = None,
    fallback: bool = True,
) -> list[Site]:
    """Sites of a Hugging Face model, one per chosen layer, paths relative to ``model``.

    Args:
        model: The model as you will call it (``LlamaForCausalLM`` or the bare ``LlamaModel``).
        layers: Which blocks: ``None`` for all, an int for one, a sequence, a ``slice`` or ``range``;
            negative indices count from the end (:func:`tdsteer.take_indices`).
        kind: ``"resid_post"`` (block output, default), ``"resid_pre"`` (block input),
            ``"attn_out"`` or ``"mlp_out"`` (what the sub-layer adds to the residual stream).
        blocks_path: Path of the block list relative to ``model``, overriding the architecture table
            (``"model.layers"``).
        fallback: Guess the blocks of an unregistered model (with a warning) instead of refusing.

    Returns:
        One :class:`tdsteer.Site` per layer, in the order given.

    Raises:
        ValueError: Unknown ``kind``, or a kind the architecture has no module for.
        tdsteer.UnknownArchitectureError: The blocks cannot be found.
        IndexError: A layer index is out of range (the message names the valid range).
        TypeError: ``model`` is not a ``torch.nn.Module`` (a model name, say).

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
    return describe(model, blocks_path=blocks_path, fallback=fallback).select(layers, kind)


def num_layers(
    model: nn.Module, kind: str = DEFAULT_KIND, *, blocks_path: str | None = None, fallback: bool = True
) -> int:
    """Number of layers of ``kind`` that ``layers`` indexes into (the transformer blocks).

    Args:
        model: A Hugging Face model.
        kind: A site kind (every kind has one site per block).
        blocks_path: Path of the block list, overriding the architecture table.
        fallback: Guess the blocks of an unregistered model (with a warning) instead of refusing.

    Returns:
        The number of blocks.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
        ...                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
        >>> num_layers(LlamaForCausalLM(config))
        3
    """
    return describe(model, blocks_path=blocks_path, fallback=fallback).num_layers(kind)
