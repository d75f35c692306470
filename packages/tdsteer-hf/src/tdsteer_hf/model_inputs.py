"""What a Hugging Face model's forward takes: how many positions, and whether it wants ``position_ids``
for left-padded rows (the rules :func:`tdsteer_hf.contrastive_batches` follows with ``model=``)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


class TextTooLongError(ValueError):
    """A text has more tokens than the model has positions (its embedding would fail with an IndexError).

    Attributes:
        longest: Tokens in the longest text.
        limit: Positions the model takes (``config.max_position_embeddings``).
        item: Index of the data item that holds the longest text.
    """

    def __init__(self, longest: int, limit: int, item: int) -> None:
        self.longest, self.limit, self.item = longest, limit, item
        super().__init__(
            f"data item {item} has a text of {longest} tokens but the model takes at most {limit} positions; "
            f"pass max_length={limit} to keep the last {limit} tokens of each text"
        )


def position_limit(model: Any) -> int | None:
    """How many positions ``model`` takes: ``config.max_position_embeddings`` (GPT-2's ``n_positions``).

    The one rule for "does this text fit": :func:`contrastive_batches` (with ``model=``) and
    ``tdsteer extract`` refuse a longer text. ``None`` when the model has no config or states no limit
    (ALiBi models such as BLOOM).

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> position_limit(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=64)))
        64
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config):
        config = text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def wants_position_ids(model: nn.Module) -> bool:
    """Whether left-padded rows of ``model`` need ``position_ids`` to read as they read unpadded.

    As ``generate`` decides: the forward names a ``position_ids`` parameter, and the model is not an
    encoder-decoder. Models that count positions from the token ids themselves (RoBERTa, XLM-R, ESM:
    ``create_position_ids_from_input_ids``, offset by the pad id) already place left-padded rows right,
    and 0-based ``position_ids`` would shift them.
    """
    parameters = _forward_parameters(model)
    if parameters is None or not any(parameter.name == "position_ids" for parameter in parameters):
        return False
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return not any(callable(getattr(module, "create_position_ids_from_input_ids", None)) for module in model.modules())


def accepts_position_ids(model: nn.Module) -> bool:
    """Whether ``model(..., position_ids=...)`` can be called at all (named, or taken by ``**kwargs``)."""
    parameters = _forward_parameters(model)
    return parameters is None or any(
        parameter.name == "position_ids" or parameter.kind is parameter.VAR_KEYWORD for parameter in parameters
    )
