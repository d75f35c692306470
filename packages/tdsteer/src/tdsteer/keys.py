"""Accepted keys of contrastive batches."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class BatchKeys:
    """Names of the entries of a contrastive batch.

    A batch is a mapping (dict or TensorDict) with the positive and negative model inputs (each a
    tensor, called as ``model(x)``, or a mapping of keyword arguments, called as ``model(**x)``),
    and optionally per-example read indices.

    Args:
        positive: Entry holding the positive inputs.
        negative: Entry holding the negative inputs.
        positive_index: Per-example read positions of the positives (``read="index"``).
        negative_index: Per-example read positions of the negatives.
        attention_mask: Entry, inside each inputs mapping, holding the mask of real tokens.

    Examples:
        >>> BatchKeys().set_keys(positive="chosen", negative="rejected").positive
        'chosen'
    """

    positive: str = "positive"
    negative: str = "negative"
    positive_index: str = "positive_index"
    negative_index: str = "negative_index"
    attention_mask: str = "attention_mask"

    def set_keys(self, **keys: str) -> BatchKeys:
        """A copy with some keys renamed; unknown names are refused.

        Raises:
            ValueError: A name that is not one of this class's fields.
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"Unknown batch keys {unknown}; accepted keys are {sorted(known)}")
        for name, value in keys.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"Batch key {name!r} must be a non-empty string, got {value!r}")
        return replace(self, **keys)
