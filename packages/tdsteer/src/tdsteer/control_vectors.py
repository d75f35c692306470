"""llama.cpp GGUF control vectors: ``direction.{i}`` tensors, each added to the output of block ``i``.

Read and written as data (the optional ``gguf`` package, ``tdsteer[gguf]``), atomically, never with
a NaN or infinite direction; :meth:`tdsteer.SteeringVector.to_gguf` / ``from_gguf`` wrap them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tdsteer.errors import SteeringVectorFileError
from tdsteer.formats import VectorParts
from tdsteer.safe_io import atomic_path, require_finite
from tdsteer.sites import Site

_TRAILING_INDEX = re.compile(r"(\d+)$")
_GGUF_FLOAT_TYPES = ("F32", "F16", "F64")


def _layer_of(key: str) -> int:
    match = _TRAILING_INDEX.search(key.split("#")[0].split(":")[0])
    if not match:
        raise ValueError(f"Cannot tell the layer number of site {key!r}; pass layer_of={{site: layer}}")
    return int(match.group(1))


def _direction_index(key: str, site: Site | None) -> int:
    """The ``direction.N`` of a site from its path: block ``N``'s output, or block ``N + 1``'s input."""
    index = _layer_of(key)
    if site is not None and site.io == "input":
        if index == 0:
            raise ValueError(
                f"Site {key!r} is the input of block 0 (the embeddings), which a llama.cpp control vector cannot "
                "steer; export block outputs (resid_post) from block 1 on"
            )
        return index - 1
    return index


def save_gguf(
    directions: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    sites: Mapping[str, Site] | None = None,
    layer_of: Mapping[str, int] | Callable[[str], int] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write a llama.cpp control vector (GGUF, tensors ``direction.{layer}``); needs ``tdsteer[gguf]``.

    llama.cpp adds ``direction.{i}`` to the output of block ``i`` for ``i >= 1`` (it refuses a file
    with ``direction.0``), so the sites should be block outputs (``resid_post``); the input of block
    ``i`` (``resid_pre``) is the output of block ``i - 1`` and is written as ``direction.{i - 1}``.

    Args:
        directions: Site key -> ``[C]`` direction at a block output.
        path: Destination ``.gguf`` file.
        sites: Site key -> site (tells block inputs from outputs; default: every site an output).
        layer_of: The ``direction`` index of each site; default: the trailing number of the site
            path, less one for a block's input.
        model_hint: ``controlvector.model_hint`` (the model type; ``"unknown"`` when ``None``).

    Returns:
        The path written (atomically).

    Raises:
        ValueError: A direction that is not ``[C]``, two sites on one layer, a site at
            ``direction.0`` or at the input of block 0, or a NaN or infinite direction (nothing is
            written).
    """
    gguf = _import_gguf()
    path = Path(path)
    require_finite(directions, f"write {str(path)!r}")
    layers: dict[int, Tensor] = {}
    for key, direction in directions.items():
        if direction.ndim != 1:
            raise ValueError(f"Site {key!r}: GGUF control vectors hold one [C] vector per layer")
        if layer_of is None:
            layer = _direction_index(key, None if sites is None else sites.get(key))
        elif callable(layer_of):
            layer = layer_of(key)
        else:
            layer = layer_of[key]
        if layer == 0:
            raise ValueError(
                f"Site {key!r} would be direction.0, which llama.cpp refuses (the output of block 0 cannot be "
                "steered by a control vector): leave the site out (vector.select(...)) or steer a later block"
            )
        if layer in layers:
            raise ValueError(f"Two sites map to layer {layer}")
        layers[layer] = direction
    arch = "controlvector"
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_string(f"{arch}.model_hint", model_hint or "unknown")
            writer.add_uint32(f"{arch}.layer_count", len(layers))
            for layer in sorted(layers):
                writer.add_tensor(f"direction.{layer}", layers[layer].detach().float().cpu().numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def load_gguf(path: str | os.PathLike[str], *, path_template: str, layout: str = "NLC") -> VectorParts:
    """Read a llama.cpp control vector; needs ``tdsteer[gguf]``.

    Args:
        path: The ``.gguf`` file.
        path_template: Site path of block ``i`` with ``{i}``, e.g. ``"model.layers.{i}"``.
        layout: Layout of the sites.

    Returns:
        The directions, one per block, in block order, and metadata.

    Raises:
        SteeringVectorFileError: Not a readable GGUF file, no ``direction.N`` tensors, a quantized
            or empty direction, or NaN or infinite values.
    """
    gguf = _import_gguf()
    path = Path(path)
    if "{i}" not in path_template:
        raise ValueError(f"path_template must contain '{{i}}', got {path_template!r}")
    if not path.is_file():
        raise SteeringVectorFileError(f"No GGUF file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: _gguf_direction(path, t) for t in reader.tensors if re.fullmatch(r"direction\.\d+", t.name)}
        hint_field = reader.fields.get("controlvector.model_hint")
        hint = bytes(hint_field.parts[hint_field.data[0]]).decode() if hint_field is not None else None
    except SteeringVectorFileError:
        raise
    except Exception as error:
        raise SteeringVectorFileError(f"{str(path)!r} is not a readable GGUF file: {error}") from None
    directions: dict[str, Tensor] = {}
    sites: dict[str, Site] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"direction\.(\d+)", name)
        if not match:
            continue
        site = Site(path_template.format(i=int(match.group(1))), layout=layout)  # type: ignore[arg-type]
        directions[site.key] = tensor
        sites[site.key] = site
    if not directions:
        raise SteeringVectorFileError(f"{str(path)!r} holds no direction.N tensors: not a control vector")
    ordered = sorted(directions, key=_layer_of)
    metadata = {"method": "gguf", "model_type": hint, "source": str(path)}
    return VectorParts({k: directions[k] for k in ordered}, {k: sites[k] for k in ordered}, metadata)


def _gguf_direction(path: Path, tensor: Any) -> Tensor:
    """One ``direction.N`` tensor of a GGUF file as float32 ``[C]``: plain floats, finite, not empty."""
    kind = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
    if kind not in _GGUF_FLOAT_TYPES:
        raise SteeringVectorFileError(
            f"{str(path)!r}: {tensor.name} is stored as {kind}; tdsteer reads control vectors stored as "
            f"{', '.join(_GGUF_FLOAT_TYPES)}"
        )
    direction = torch.tensor(tensor.data.copy()).float().reshape(-1)
    if direction.numel() == 0 or not bool(torch.isfinite(direction).all()):
        raise SteeringVectorFileError(f"{str(path)!r}: {tensor.name} is empty or holds NaN or infinite values")
    return direction


def _import_gguf() -> Any:
    try:  # gguf is an optional extra (tdsteer[gguf]): imported only when a GGUF file is read or written
        import gguf
    except ImportError:
        raise ImportError("GGUF files need the gguf package: pip install 'tdsteer[gguf]'") from None
    return gguf
