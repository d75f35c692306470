"""Models that accelerate places across devices or offloads (``device_map``, ``cpu_offload``, ``dispatch_model``).

accelerate is never imported: its hooks are duck-typed through the attributes it sets. A module
it manages has ``_hf_hook`` (an ``AlignDevicesHook``, or a ``SequentialHook`` holding several in
``hooks``) whose ``execution_device`` is where the module runs, and, when its weights are offloaded
(its parameters then live on the ``meta`` device), whose ``weights_map`` maps each of the module's
tensor names to its values: a ``PrefixedDataset`` (``dataset`` and ``prefix``) over a plain state
dict (offloaded to CPU memory) or an ``OffloadedWeightsLoader`` (``state_dict``, ``index`` and
``save_folder``: values in memory, in the checkpoint's safetensors files, or in ``.dat`` files of
the offload folder). A model loaded with a ``device_map`` also has ``hf_device_map``.

:func:`execution_device` and :func:`device_map_device` say where a model runs; :class:`OffloadedValues` finds where
an offloaded tensor's values lie and reads some of them, mapping only the values it reads (never the
whole tensor when they lie in a file).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

OFFLOADED = ("disk", "meta")  # hf_device_map entries that do not run anywhere themselves
# safetensors dtype codes -> torch dtype (values read as signed integers of the same width, then viewed)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_WIDTH_TYPES = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def accelerate_hooks(module: nn.Module) -> Iterator[Any]:
    """The accelerate hooks on ``module`` (none, one, or each of a ``SequentialHook``'s)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    inner = getattr(hook, "hooks", None)
    yield from inner if isinstance(inner, (list, tuple)) else (hook,)


def execution_device(model: nn.Module) -> torch.device | None:
    """Where accelerate runs ``model``: the ``execution_device`` of the first module (the model itself
    first) whose accelerate hook names one; its hooks move the inputs there anyway. ``None`` for a
    model without such hooks."""
    for module in model.modules():
        for hook in accelerate_hooks(module):
            device = getattr(hook, "execution_device", None)
            if device is not None and not isinstance(device, Mapping):
                return torch.device(device)
    return None


def device_map_device(model: nn.Module) -> torch.device | None:
    """The device that ``model.hf_device_map`` runs it on: its first entry on an accelerator, else
    ``"cpu"`` when an entry is on the CPU (entries on ``"disk"`` run elsewhere); ``None`` without one."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, Mapping):
        return None
    places = [place for place in device_map.values() if str(place) not in OFFLOADED]
    accelerators = [place for place in places if str(place) != "cpu"]
    if accelerators:
        return torch.device(accelerators[0])
    return torch.device("cpu") if places else None


class Stored(NamedTuple):
    """Where an offloaded tensor's values are, and how to read some of them."""

    source: tuple[Any, ...]  # what holds the values: tensors tied together share it
    read: Callable[[Tensor], Tensor | None]  # flat positions -> the values there, on the CPU


class OffloadedValues:
    """Finds the values of ``model``'s offloaded (``meta``) tensors in accelerate's weights maps.

    One instance per pass over a model: it keeps the safetensors headers it parsed.

    Args:
        model: The model whose tensor names :meth:`find` takes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def find(self, name: str, like: Tensor) -> Stored | None:
        """Where the values of the tensor ``name`` (as ``model.named_parameters`` or ``named_buffers``
        names it) lie, read in ``like``'s dtype; ``None`` when no weights map holds them.

        Args:
            name: The tensor's dotted name in the model.
            like: The tensor itself (on ``meta``): its dtype and shape.
        """
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # the hook of the tensor's module, else of a module above
            try:
                module = self.model.get_submodule(".".join(parts[:depth]))
            except AttributeError:
                continue
            for hook in accelerate_hooks(module):
                weights = getattr(hook, "weights_map", None)
                stored = None if weights is None else self._find(weights, ".".join(parts[depth:]), like)
                if stored is not None:
                    return stored
        return None

    def _find(self, weights: Any, key: str, like: Tensor) -> Stored | None:
        """Where ``key`` of a weights map lies (``None``: not in it)."""
        while hasattr(weights, "dataset") and isinstance(getattr(weights, "prefix", None), str):  # PrefixedDataset
            key, weights = weights.prefix + key, weights.dataset
        in_memory = getattr(weights, "state_dict", None)
        if isinstance(in_memory, Mapping) and key in in_memory:
            return _in_memory(in_memory[key], like)
        index = getattr(weights, "index", None)
        if isinstance(index, Mapping) and key in index:
            info = index[key]
            cast = getattr(torch, str(info.get("dtype")), None)
            cast = cast if isinstance(cast, torch.dtype) else like.dtype
            if info.get("safetensors_file") is not None:
                path, tensor = Path(info["safetensors_file"]), info.get("weight_name", key)
                return Stored(
                    ("safetensors", str(path.resolve()), tensor),
                    lambda positions: _cast(self._from_safetensors(path, tensor, positions), cast, like.dtype),
                )
            if getattr(weights, "save_folder", None) is None:
                return None
            path = Path(weights.save_folder) / f"{key}.dat"
            return Stored(
                ("dat", str(path.resolve())),
                lambda positions: _cast(_from_dat(path, info, positions), cast, like.dtype),
            )
        if isinstance(weights, Mapping) and index is None:  # a state dict (cpu_offload)
            try:
                value = weights[key]
            except KeyError:
                return None
            return _in_memory(value, like)
        return None

    def _from_safetensors(self, path: Path, name: str, positions: Tensor) -> Tensor | None:
        """Values of tensor ``name`` in a safetensors file, mapped from the file (only those read);
        ``None`` when the file is gone or not a safetensors file holding it."""
        try:
            return self._map_safetensors(path, name, positions)
        except (OSError, ValueError, KeyError, struct.error):  # gone, cut short or not safetensors: no values
            return None

    def _map_safetensors(self, path: Path, name: str, positions: Tensor) -> Tensor | None:
        key = str(path)
        if key not in self._headers:
            with path.open("rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                self._headers[key] = (8 + length, json.loads(file.read(length)))
        start, header = self._headers[key]
        entry = header.get(name)
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry, dict) else None
        if entry is None or dtype is None:
            return None
        begin, end = entry["data_offsets"]
        width = torch.empty((), dtype=dtype).element_size()
        if end == begin:
            return None
        flat = np.memmap(
            path, dtype=_WIDTH_TYPES[width], mode="r", offset=start + begin, shape=((end - begin) // width,)
        )
        return torch.from_numpy(np.ascontiguousarray(flat[positions.numpy()])).view(dtype)


def _in_memory(value: Any, like: Tensor) -> Stored | None:
    """A weights map's tensor in memory (CPU or accelerator), identified by its storage."""
    if not isinstance(value, Tensor) or value.is_meta or value.shape != like.shape:
        return None
    source = ("memory", str(value.device), value.untyped_storage().data_ptr(), value.storage_offset(), value.stride())
    return Stored(source, lambda positions: _take(value, positions).to(like.dtype))


def _cast(values: Tensor | None, stored: torch.dtype, dtype: torch.dtype) -> Tensor | None:
    """Values as accelerate hands them over: in the weights map's dtype, then in the tensor's."""
    return None if values is None else values.to(stored).to(dtype)


def _take(tensor: Tensor, positions: Tensor) -> Tensor:
    """The values of ``tensor`` at flat ``positions``, on the CPU (only those copied)."""
    flat = tensor.detach().reshape(-1)
    return flat[positions.to(flat.device)].cpu()


def _from_dat(path: Path, info: Mapping[str, Any], positions: Tensor) -> Tensor | None:
    """Values in an accelerate ``.dat`` offload file (a raw array; bfloat16 and float8 stored as integers)."""
    if not os.path.isfile(path):
        return None
    dtype = str(info["dtype"])
    stored = "int16" if dtype == "bfloat16" else "int8" if dtype.startswith("float8_") else dtype
    count = int(np.prod(info["shape"])) if info["shape"] else 1
    try:
        flat = np.memmap(path, dtype=stored, mode="r", shape=(count,))
        values = torch.from_numpy(np.ascontiguousarray(flat[positions.numpy()]))
    except (OSError, ValueError, TypeError):  # cut short, or a dtype numpy lacks: no values
        return None
    return values.view(getattr(torch, dtype)) if stored != dtype else values
