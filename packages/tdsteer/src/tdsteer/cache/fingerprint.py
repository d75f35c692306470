"""What decides whether a recording may resume: the data in example order, and the model's weights.

:class:`DataOrder` hashes the examples of a dataset in order, the same however they are batched:
each tensor of a batch whose first dimension is the batch size is hashed example by example, with
the padding around each example's real tokens stripped (through the ``attention_mask`` beside it),
so a cache recorded with one batch size can resume with another at any example, and data that
differs in any example, or comes in another order, is refused. :func:`weights_fingerprint` hashes
the names, dtypes and shapes of every parameter and buffer and a sample of their values (a few
hundred evenly spaced values of each tensor, more of the first, middle and last; the values of a
tensor accelerate offloaded are read where its hooks keep them): another checkpoint of the same
architecture, or the same one in another dtype, gets another fingerprint, and the same checkpoint
gets the same one in memory and offloaded.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from tdsteer.offload import OffloadedValues, Stored
from tdsteer.safe_io import tensor_bytes

MASK_KEY = "attention_mask"
_SAMPLE = 256  # values sampled from every parameter and buffer
_SAMPLE_ENDS = 65536  # values sampled from the first, middle and last ones
_NO_VALUES = b"meta: no values;"  # hashed for a tensor on meta whose values nothing holds


class Stream(NamedTuple):
    """One hashed stream of a batch: bytes in example order and where each example's bytes end."""

    key: str
    data: memoryview
    ends: list[int]  # ends[i]: bytes of the examples before example i (len: batch size + 1)


class DataOrder:
    """A running SHA-256 of a dataset's examples in order, independent of the batch size.

    Examples:
        >>> import torch
        >>> x = torch.arange(12.0).reshape(6, 2)
        >>> a, b = DataOrder(), DataOrder()
        >>> a.update({"inputs": x}, 6)
        >>> for part in (x[:4], x[4:]):
        ...     b.update({"inputs": part}, len(part))
        >>> a.hexdigest() == b.hexdigest()
        True
    """

    def __init__(self) -> None:
        self.examples = 0
        self._streams: dict[str, Any] = {}

    def update(self, batch: Any, size: int) -> None:
        """Add the ``size`` examples of ``batch``."""
        for stream in batch_streams(batch, size, self.examples):
            self._hasher(stream.key).update(stream.data)
        self.examples += size

    def hexdigest_at(self, batch: Any, size: int, cut: int) -> str:
        """The digest after the first ``cut`` examples of ``batch`` (``batch`` not added)."""
        streams = {key: hasher.copy() for key, hasher in self._streams.items()}
        for stream in batch_streams(batch, size, self.examples):
            hasher = streams.setdefault(stream.key, hashlib.sha256())
            hasher.update(stream.data[: stream.ends[cut]])
        return _combine(streams)

    def hexdigest(self) -> str:
        """The digest of every example added so far."""
        return _combine(self._streams)

    def _hasher(self, key: str) -> Any:
        if key not in self._streams:
            self._streams[key] = hashlib.sha256()
        return self._streams[key]


def batch_streams(batch: Any, size: int, first_example: int) -> Iterator[Stream]:
    """The hashed streams of one batch: per tensor, its values and the shape of each example's part."""
    number = torch.arange(first_example, first_example + size, dtype=torch.int64)[:, None]
    for path, value, span in _leaves(batch, size, "", None):
        if isinstance(value, list):  # one string per example
            encoded = [text.encode("utf-8") for text in value]
            lengths = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
            yield Stream(f"{path}|str", memoryview(b"".join(encoded)), _ends(lengths))
            yield _shape_stream(f"{path}|str", torch.cat([number, lengths[:, None]], 1))
            continue
        tensor = value.detach().cpu()
        name = f"{path}|{str(tensor.dtype).removeprefix('torch.')}"
        if tensor.ndim == 0 or tensor.shape[0] != size:  # a batch-level value: counted with the first example
            data = tensor_bytes(tensor)
            yield Stream(name, data, [0] + [len(data)] * size)
            shape = torch.tensor([[first_example, -1, *tensor.shape]], dtype=torch.int64)
            yield Stream(name + "|shape", tensor_bytes(shape), [0] + [shape.numel() * 8] * size)
            continue
        rest = list(tensor.shape[2:] if span is not None else tensor.shape[1:])
        if span is not None:
            lengths, values = span.sum(-1).to(torch.int64), tensor[span]
        else:
            lengths, values = torch.ones(size, dtype=torch.int64), tensor
        yield Stream(name, tensor_bytes(values), _ends(lengths * math.prod(rest) * tensor.element_size()))
        trailing = torch.tensor(rest, dtype=torch.int64).expand(size, len(rest))
        yield _shape_stream(name, torch.cat([number, lengths[:, None], trailing], 1))


def slice_examples(value: Any, start: int, size: int) -> Any:
    """``value`` (a batch or part of one) without its first ``start`` examples; other values unchanged."""
    if isinstance(value, Tensor):
        return value[start:] if value.ndim >= 1 and value.shape[0] == size else value
    if isinstance(value, TensorDictBase):
        if value.batch_dims >= 1 and value.batch_size[0] == size:
            return value[start:]
        return {key: slice_examples(item, start, size) for key, item in value.items()}
    if isinstance(value, Mapping):
        return {key: slice_examples(item, start, size) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == size:
        return value[start:]
    return value


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the names, dtypes and shapes of ``model``'s parameters and buffers, and samples of their values.

    Cheap for any model size: a few hundred evenly spaced values of each tensor (65,536 of the
    first, middle and last), gathered where the tensor lives. A tensor that accelerate offloaded
    (on ``meta``, its values in the weights map of its module's hook: CPU memory, the checkpoint's
    safetensors files or the offload folder) is sampled there, reading only the sampled values, so
    the same checkpoint gets the same fingerprint in memory and offloaded. A ``meta`` tensor whose
    values nothing holds counts by name, dtype and shape only, with a mark saying so, and a warning:
    two checkpoints that differ only there get the same fingerprint.

    Args:
        model: The model.

    Returns:
        A hex digest.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0); a = torch.nn.Linear(3, 3)  # doctest: +ELLIPSIS
        <...>
        >>> b = torch.nn.Linear(3, 3)
        >>> weights_fingerprint(a) == weights_fingerprint(a), weights_fingerprint(a) == weights_fingerprint(b)
        (True, False)
    """
    offloaded = OffloadedValues(model)
    named = _distinct_tensors(model, offloaded)
    hasher = hashlib.sha256(f"{len(named)} tensors;".encode())
    ends = {0, len(named) // 2, len(named) - 1}
    without_values = []
    for i, (name, tensor, stored) in enumerate(named):
        hasher.update(f"{name}:{str(tensor.dtype)}:{tuple(tensor.shape)};".encode())
        if tensor.numel() == 0:
            continue
        positions = _positions(tensor.numel(), _SAMPLE_ENDS if i in ends else _SAMPLE)
        try:
            if not tensor.is_meta:
                values: Tensor | None = _sample(tensor.detach(), positions)
            else:
                values = None if stored is None else stored.read(positions)
            if values is None:
                without_values.append(name)
                hasher.update(_NO_VALUES)
                continue
            sample = tensor_bytes(values)
        except (RuntimeError, TypeError):  # a tensor type without plain bytes (quantized): name and shape only
            continue
        hasher.update(sample)
    if without_values:
        warnings.warn(
            f"{len(without_values)} of the model's tensors are on the meta device and no accelerate weights map "
            f"holds their values (the first: {without_values[0]!r}); its weights fingerprint counts them by name, "
            "dtype and shape only, so a cache resume cannot tell apart checkpoints that differ only there",
            stacklevel=2,
        )
    return hasher.hexdigest()


def _distinct_tensors(model: nn.Module, offloaded: OffloadedValues) -> list[tuple[str, Tensor, Stored | None]]:
    """``model``'s parameters and buffers, each offloaded one with where its values lie. Parameters tied
    together count once, as ``named_parameters`` counts them: offloading can untie them (accelerate's
    ``cpu_offload`` gives each its own ``meta`` tensor), but their values still lie in one place."""
    found: list[tuple[str, Tensor, Stored | None]] = []
    sources = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        stored = offloaded.find(name, tensor) if tensor.is_meta else None
        if stored is not None:
            if stored.source in sources:
                continue
            sources.add(stored.source)
        found.append((name, tensor, stored))
    return found


def _positions(numel: int, count: int) -> Tensor:
    """``count`` evenly spaced flat positions of a tensor of ``numel`` values (all when it has fewer)."""
    positions = torch.linspace(0, numel - 1, min(count, numel), dtype=torch.float64).round().to(torch.int64)
    return positions.clamp_(max=numel - 1)


def _sample(tensor: Tensor, positions: Tensor) -> Tensor:
    """The values of ``tensor`` at the flat ``positions``, on the CPU, without copying it."""
    if tensor.ndim == 0:
        return tensor.reshape(1).cpu()
    index = torch.unravel_index(positions.to(tensor.device), tensor.shape)
    return tensor[index].cpu()


def _leaves(value: Any, size: int, path: str, span: Tensor | None) -> Iterator[tuple[str, Any, Tensor | None]]:
    """Every tensor (or list of one string per example) under ``value``, with its path and the
    real-token span it is cut to (``None``: kept whole). Other values are not data: skipped."""
    if isinstance(value, Tensor):
        yield path, value, span if span is not None and value.shape[:2] == span.shape else None
    elif isinstance(value, (Mapping, TensorDictBase)):
        mask = value.get(MASK_KEY) if MASK_KEY in value.keys() else None  # noqa: SIM118 (TensorDict)
        if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[0] == size:
            span = _real_span(mask.detach().cpu())
        for key in sorted(value.keys(), key=str):
            yield from _leaves(value[key], size, f"{path}/{key}", span)
    elif isinstance(value, (list, tuple)) and len(value) == size:
        if all(isinstance(item, str) for item in value):
            yield path, list(value), None
            return
        try:
            yield path, torch.as_tensor(value), None
        except (TypeError, ValueError, RuntimeError):  # not numbers: not hashed, like other Python objects
            return


def _real_span(mask: Tensor) -> Tensor:
    """``[B, L]`` bool: the positions from each row's first real token to its last (padding around them off)."""
    real = mask != 0
    position = torch.arange(mask.shape[1])
    first = torch.where(real, position, mask.shape[1]).min(-1, keepdim=True).values
    last = torch.where(real, position, -1).max(-1, keepdim=True).values
    return (position >= first) & (position <= last)


def _ends(lengths: Tensor) -> list[int]:
    """Cumulative byte offsets ``[0, l0, l0 + l1, ...]`` of per-example byte counts."""
    return [0, *torch.cumsum(lengths, 0).tolist()]


def _shape_stream(name: str, shapes: Tensor) -> Stream:
    """The stream of each example's number, length and trailing shape (int64 rows)."""
    width = shapes.shape[1] * 8
    return Stream(name + "|shape", tensor_bytes(shapes.contiguous()), list(range(0, (len(shapes) + 1) * width, width)))


def _combine(streams: Mapping[str, Any]) -> str:
    combined = hashlib.sha256()
    for key in sorted(streams):
        combined.update(f"{key}={streams[key].hexdigest()};".encode())
    return combined.hexdigest()
