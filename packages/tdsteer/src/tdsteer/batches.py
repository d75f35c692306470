"""Model inputs as batches hold them: moving them to a device, counting their rows, fingerprinting them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import Tensor

from tdsteer.safe_io import tensor_bytes


def to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` (a tensor, a TensorDict or a mapping of them) on ``device``; ``None`` leaves it where it is."""
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, TensorDictBase):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def batch_size(inputs: Any) -> int:
    """Rows of model inputs: a tensor's first dimension, or that of the first tensor in a mapping.

    Raises:
        ValueError: The inputs hold no tensor.

    Examples:
        >>> batch_size({"input_ids": torch.zeros(3, 5)})
        3
    """
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    for value in inputs.values():
        if isinstance(value, Tensor):
            return int(value.shape[0])
    raise ValueError("Batch inputs hold no tensor")


def digest(hasher: Any, value: Any) -> None:
    """Feed ``value``'s shapes and bytes (keys in sorted order) to ``hasher`` (a ``hashlib`` object).

    A tensor's bytes are its values in row-major order, whatever its dtype (``bfloat16`` included);
    a contiguous CPU tensor is hashed in place, through a view of its memory, with no copy.

    Args:
        hasher: A ``hashlib`` object (anything with ``update(bytes)``).
        value: A tensor, or a mapping (or TensorDict) of them, nested to any depth; other values
            add nothing.

    Examples:
        >>> import hashlib
        >>> hasher = hashlib.sha256()
        >>> digest(hasher, {"input_ids": torch.arange(6).reshape(2, 3)})
        >>> hasher.hexdigest()[:16]
        '53b8dbd9a54d6689'
    """
    if isinstance(value, Tensor):
        hasher.update(str(tuple(value.shape)).encode())
        hasher.update(tensor_bytes(value.detach().cpu()))
    elif isinstance(value, (Mapping, TensorDictBase)):
        for key in sorted(value.keys()):
            hasher.update(str(key).encode())
            digest(hasher, value[key])
