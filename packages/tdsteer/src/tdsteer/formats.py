"""Interchange formats: lm-eval's ``steered`` ``.pt`` files and llama.cpp GGUF control vectors.

Both are data, never code: ``.pt`` files are read with ``torch.load(weights_only=True)``, so a pickle
that would run code is refused. These functions read and write the parts of a vector (directions,
sites, metadata); :class:`tdsteer.SteeringVector` wraps them as ``to_lm_eval`` / ``from_lm_eval`` /
``to_gguf`` / ``from_gguf``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tdsteer.errors import SteeringVectorFileError
from tdsteer.sites import Site

_TRAILING_INDEX = re.compile(r"(\d+)$")


class VectorParts(NamedTuple):
    """What a file holds: site key -> direction, site key -> :class:`~tdsteer.Site`, and metadata."""

    directions: dict[str, Tensor]
    sites: dict[str, Site]
    metadata: dict[str, Any]


def _strip(path: str, prefix: str) -> str:
    if prefix and path.startswith(prefix + "."):
        return path[len(prefix) + 1 :]
    if prefix and path != prefix:
        raise ValueError(f"Site path {path!r} does not start with the prefix {prefix!r}")
    return path


def save_lm_eval(
    directions: Mapping[str, Tensor],
    sites: Mapping[str, Site],
    path: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    action: str = "add",
    prefix: str = "",
) -> Path:
    """Write lm-eval's ``steered`` model file: ``{hookpoint: {"steering_vector", "steering_coefficient",
    "action", "bias", "head_index"}}``.

    lm-eval names hookpoints relative to ``model.base_model``; pass that module's path as ``prefix``
    (``"transformer"`` for GPT-2, ``"model"`` for Llama) so it is stripped from the site paths.
    lm-eval steers every position of the output of each hookpoint, with one coefficient per file.

    Args:
        directions: Site key -> ``[C]`` direction at a module output.
        sites: Site key -> site.
        path: Destination ``.pt`` file.
        scale: ``steering_coefficient`` (for ``action="clamp"``: the projection value).
        action: ``"add"`` or ``"clamp"``.
        prefix: Path of ``model.base_model`` inside the model the sites refer to.

    Returns:
        The path written.
    """
    if action not in ("add", "clamp"):
        raise ValueError(f"lm-eval supports action 'add' or 'clamp', got {action!r}")
    config: dict[str, dict[str, Any]] = {}
    for key, direction in directions.items():
        site = sites[key]
        if direction.ndim != 1 or site.io != "output" or site.slot not in (None, 0):
            raise ValueError(
                f"Site {key!r}: lm-eval files hold one [C] vector per module output (slot 0); "
                f"this site has shape {tuple(direction.shape)}, io={site.io}, slot={site.slot}"
            )
        config[_strip(site.path, prefix)] = {
            "steering_vector": direction.detach().float().cpu().clone(),
            "steering_coefficient": float(scale),
            "action": action,
            "bias": None,
            "head_index": None,
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(config, path)
    return path


def load_lm_eval(path: str | os.PathLike[str], *, prefix: str = "") -> VectorParts:
    """Read an lm-eval ``steered`` ``.pt`` file.

    ``add`` entries become ``coefficient * vector``, to be applied with ``operator="add"``;
    ``clamp`` entries become ``value * unit vector``, to be applied with ``operator="clamp"`` and
    ``scale=1``. A file that mixes both, or uses a bias or head index, is refused.

    Args:
        path: The ``.pt`` file.
        prefix: Path of ``model.base_model``, prepended to the hookpoints to make site paths.

    Returns:
        The directions (plain module-output sites) and metadata.

    Raises:
        SteeringVectorFileError: Not a readable file, a pickle that needs code to load, or entries
            tdsteer cannot represent.
    """
    path = Path(path)
    if not path.is_file():
        raise SteeringVectorFileError(f"No lm-eval steering file at {str(path)!r}")
    try:
        config = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise SteeringVectorFileError(
            f"{str(path)!r} is not a plain-data lm-eval steering file: loading it would need code from the "
            f"pickle, which tdsteer refuses ({error})"
        ) from None
    except Exception as error:
        raise SteeringVectorFileError(f"{str(path)!r} could not be read (truncated or corrupted?): {error}") from None
    if not isinstance(config, Mapping) or not config:
        raise SteeringVectorFileError(f"{str(path)!r} does not hold a non-empty mapping of hookpoints")
    directions: dict[str, Tensor] = {}
    actions: set[str] = set()
    for hookpoint, entry in config.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("steering_vector"), Tensor):
            raise SteeringVectorFileError(f"{str(path)!r}: hookpoint {hookpoint!r} has no steering_vector tensor")
        if entry.get("bias") is not None or entry.get("head_index") is not None:
            raise SteeringVectorFileError(
                f"{str(path)!r}: hookpoint {hookpoint!r} uses a bias or head_index, which tdsteer does not represent"
            )
        action = entry.get("action", "add")
        actions.add(action)
        vector = entry["steering_vector"].float().reshape(-1)
        coefficient = float(entry.get("steering_coefficient", 1.0))
        if action == "add":
            directions[f"{prefix}.{hookpoint}" if prefix else hookpoint] = vector * coefficient
        elif action == "clamp":
            unit = vector / vector.norm().clamp_min(1e-12)
            directions[f"{prefix}.{hookpoint}" if prefix else hookpoint] = unit * coefficient
        else:
            raise SteeringVectorFileError(f"{str(path)!r}: unknown action {action!r} at {hookpoint!r}")
    if len(actions) > 1:
        raise SteeringVectorFileError(f"{str(path)!r} mixes actions {sorted(actions)}; split it per action")
    metadata = {"method": "lm_eval", "operator": actions.pop(), "source": str(path)}
    return VectorParts(directions, {key: Site(key) for key in directions}, metadata)


def _layer_of(key: str) -> int:
    match = _TRAILING_INDEX.search(key.split("#")[0].split(":")[0])
    if not match:
        raise ValueError(f"Cannot tell the layer number of site {key!r}; pass layer_of={{site: layer}}")
    return int(match.group(1))


def save_gguf(
    directions: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    layer_of: Mapping[str, int] | Callable[[str], int] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write a llama.cpp control vector (GGUF, tensors ``direction.{layer}``); needs ``tdsteer[gguf]``.

    llama.cpp adds ``direction.{i}`` to the output of block ``i``, so the sites should be block
    outputs (``resid_post``); block 0 cannot be steered there.

    Args:
        directions: Site key -> ``[C]`` direction at a block output.
        path: Destination ``.gguf`` file.
        layer_of: Block index of each site; default: the trailing number of the site path.
        model_hint: ``controlvector.model_hint`` (the model type; ``"unknown"`` when ``None``).

    Returns:
        The path written.
    """
    gguf = _import_gguf()
    layers: dict[int, Tensor] = {}
    for key, direction in directions.items():
        if direction.ndim != 1:
            raise ValueError(f"Site {key!r}: GGUF control vectors hold one [C] vector per layer")
        if layer_of is None:
            layer = _layer_of(key)
        elif callable(layer_of):
            layer = layer_of(key)
        else:
            layer = layer_of[key]
        if layer in layers:
            raise ValueError(f"Two sites map to layer {layer}")
        layers[layer] = direction
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = "controlvector"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint or "unknown")
    writer.add_uint32(f"{arch}.layer_count", len(layers))
    for layer in sorted(layers):
        writer.add_tensor(f"direction.{layer}", layers[layer].detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
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
        SteeringVectorFileError: Not a readable GGUF file or no ``direction.N`` tensors.
    """
    gguf = _import_gguf()
    path = Path(path)
    if "{i}" not in path_template:
        raise ValueError(f"path_template must contain '{{i}}', got {path_template!r}")
    if not path.is_file():
        raise SteeringVectorFileError(f"No GGUF file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: torch.tensor(t.data.copy()).float().reshape(-1) for t in reader.tensors}
        hint_field = reader.fields.get("controlvector.model_hint")
        hint = bytes(hint_field.parts[hint_field.data[0]]).decode() if hint_field is not None else None
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


def _import_gguf() -> Any:
    try:  # gguf is an optional extra (tdsteer[gguf]): imported only when a GGUF file is read or written
        import gguf
    except ImportError:
        raise ImportError("GGUF files need the gguf package: pip install 'tdsteer[gguf]'") from None
    return gguf
