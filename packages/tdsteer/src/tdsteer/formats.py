"""The files of a vector: tdsteer's safetensors files and lm-eval's ``steered`` ``.pt`` files (llama.cpp
GGUF control vectors: :mod:`tdsteer.control_vectors`).

All are data, never code: ``.pt`` files are read with ``torch.load(weights_only=True)``, so a pickle
that would run code is refused, and every header is checked field by field. All are written
atomically (:func:`tdsteer.safe_io.atomic_path`), and none is written with, or read into, a NaN or
infinite direction. tdsteer's own files carry a CRC-32 of their header and of each tensor (format
2; format-1 files load without the check). These functions read and write the parts of a vector
(directions, sites, metadata); :class:`tdsteer.SteeringVector` wraps them as ``save`` / ``load``,
``to_lm_eval`` / ``from_lm_eval`` and ``to_gguf`` / ``from_gguf``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tdsteer.errors import SteeringVectorFileError
from tdsteer.safe_io import (
    atomic_path,
    check_vector_metadata,
    crc32_of,
    json_default,
    parse_json,
    require_finite,
    short_repr,
    site_from_record,
)
from tdsteer.sites import Site

FORMAT = "tdsteer.steering_vector"
FORMAT_VERSION = 2  # 2: CRC-32 of the header and of every tensor
HEADER_KEY = "tdsteer"
CHECKSUM_KEY = "tdsteer.crc32"  # CRC-32 of the header JSON, beside it in the safetensors metadata
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


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


def save_safetensors(
    directions: Mapping[str, Tensor],
    sites: Mapping[str, Site],
    metadata: Mapping[str, Any],
    path: str | os.PathLike[str],
) -> Path:
    """Write a tdsteer vector file: the tensors, and the sites, metadata and checksums as JSON in the header.

    Args:
        directions: Site key -> direction.
        sites: Site key -> site.
        metadata: JSON-compatible record (tensors, paths and non-finite floats are converted).
        path: Destination ``.safetensors`` file, written atomically.

    Returns:
        The path written.

    Raises:
        ValueError: A direction holds NaN or infinite values (nothing is written).
    """
    path = Path(path)
    require_finite(directions, f"save {str(path)!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in directions.items()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sites": {k: s.to_dict() for k, s in sites.items()},
        "metadata": dict(metadata),
        "crc32": {k: crc32_of(t) for k, t in tensors.items()},
    }
    raw = json.dumps(header, default=json_default)
    stored = {HEADER_KEY: raw, CHECKSUM_KEY: f"{crc32_of(raw.encode('utf-8')):08x}"}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=stored)
    return path


def load_safetensors(path: str | os.PathLike[str]) -> VectorParts:
    """Read a tdsteer vector file (on the CPU), checking its header, checksums and directions.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The directions, sites and metadata.

    Raises:
        SteeringVectorFileError: Missing, truncated, corrupted (a failed checksum), not a tdsteer
            file, or a direction that is not a finite floating-point ``[C]`` / ``[L, C]`` tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise SteeringVectorFileError(f"No steering-vector file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several error types for bad files
        raise SteeringVectorFileError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from None
    raw = stored.get(HEADER_KEY)
    if raw is None:
        raise SteeringVectorFileError(
            f"{str(path)!r} is a safetensors file without tdsteer metadata; "
            "wrap its tensors with SteeringVector({site: tensor}) instead"
        )
    sites, metadata, checksums = _read_header(path, raw, stored.get(CHECKSUM_KEY))
    if set(sites) != set(tensors):
        raise SteeringVectorFileError(
            f"{str(path)!r}: header names sites {sorted(sites)} but the file holds tensors {sorted(tensors)}"
        )
    for key, tensor in tensors.items():
        _check_direction(path, key, tensor, None if checksums is None else checksums.get(key))
    return VectorParts({k: tensors[k] for k in sites}, sites, metadata)


def save_lm_eval(
    directions: Mapping[str, Tensor],
    sites: Mapping[str, Site],
    path: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    action: str = "add",
    prefix: str = "",
) -> Path:
    """Write lm-eval's ``steered`` model file, one entry per hookpoint.

    Each entry is ``{"steering_vector", "steering_coefficient", "action", "bias", "head_index"}``.

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
        The path written (atomically).

    Raises:
        ValueError: An unknown action, a site lm-eval cannot name, or a NaN or infinite direction
            or scale (nothing is written).
    """
    if action not in ("add", "clamp"):
        raise ValueError(f"lm-eval supports action 'add' or 'clamp', got {action!r}")
    path = Path(path)
    if not math.isfinite(float(scale)):
        raise ValueError(f"Cannot write {str(path)!r}: the scale is {scale}; give a finite steering coefficient")
    require_finite(directions, f"write {str(path)!r}")
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
    with atomic_path(path) as tmp:
        torch.save(config, tmp)
    return path


def load_lm_eval(path: str | os.PathLike[str], *, prefix: str = "") -> VectorParts:
    """Read an lm-eval ``steered`` ``.pt`` file.

    ``add`` entries become ``coefficient * vector``, to be applied with ``operator="add"`` (and
    ``scale=1`` for the file's own strength; the coefficient shared by every entry is kept as
    ``metadata["steering_coefficient"]``);
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
        # torch checks each storage's size against its record before allocating it
        with path.open("rb") as handle:  # a stream: torch.load would pick its reader by the file's suffix
            config = torch.load(handle, map_location="cpu", weights_only=True)
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
        key, action, direction = _lm_eval_entry(path, hookpoint, entry)
        actions.add(action)
        directions[f"{prefix}.{key}" if prefix else key] = direction
    if len(actions) > 1:
        raise SteeringVectorFileError(f"{str(path)!r} mixes actions {sorted(actions)}; split it per action")
    metadata: dict[str, Any] = {"method": "lm_eval", "operator": actions.pop(), "source": str(path)}
    coefficients = {float(entry["steering_coefficient"]) for entry in config.values()}
    if len(coefficients) == 1:  # folded into the directions; kept so that a second scale can be noticed
        metadata["steering_coefficient"] = coefficients.pop()
    return VectorParts(directions, {key: Site(key) for key in directions}, metadata)


def _lm_eval_entry(path: Path, hookpoint: Any, entry: Any) -> tuple[str, str, Tensor]:
    """The hookpoint, action and direction of one entry of an lm-eval file, every field checked."""
    where = f"{str(path)!r}: hookpoint {short_repr(hookpoint)}"
    if not isinstance(hookpoint, str) or not hookpoint:
        raise SteeringVectorFileError(f"{where} is not a module path")
    if not isinstance(entry, Mapping) or not isinstance(entry.get("steering_vector"), Tensor):
        raise SteeringVectorFileError(f"{where} has no steering_vector tensor")
    if entry.get("bias") is not None or entry.get("head_index") is not None:
        raise SteeringVectorFileError(f"{where} uses a bias or head_index, which tdsteer does not represent")
    action = entry.get("action", "add")
    if action not in ("add", "clamp"):
        raise SteeringVectorFileError(
            f"{where} has unknown action {short_repr(action)}; tdsteer reads 'add' and 'clamp'"
        )
    vector = entry["steering_vector"]
    if not (vector.is_floating_point() or vector.dtype in _INTEGER_DTYPES) or vector.numel() == 0:
        raise SteeringVectorFileError(
            f"{where}: steering_vector is an empty or {vector.dtype} tensor, not real numbers"
        )
    coefficient = entry.get("steering_coefficient", 1.0)
    if isinstance(coefficient, Tensor) and coefficient.numel() == 1:
        coefficient = coefficient.item()
    if not isinstance(coefficient, (int, float)) or isinstance(coefficient, bool):
        raise SteeringVectorFileError(f"{where}: steering_coefficient {short_repr(coefficient)} is not a number")
    vector = vector.to(torch.float32, copy=True).reshape(-1)
    if action == "clamp":
        vector = vector / vector.norm().clamp_min(1e-12)
    direction = vector * float(coefficient)
    if not bool(torch.isfinite(direction).all()):
        raise SteeringVectorFileError(
            f"{where}: the direction (steering_vector x steering_coefficient {coefficient}) holds NaN or infinite "
            "values; the file is broken, export it again"
        )
    return hookpoint, action, direction


def _read_header(
    path: Path, raw: str, checksum: str | None
) -> tuple[dict[str, Site], dict[str, Any], dict[str, int] | None]:
    """The sites, metadata and tensor checksums (``None`` before format 2) of a file's tdsteer header."""

    def bad(message: str) -> SteeringVectorFileError:
        return SteeringVectorFileError(f"{str(path)!r} has a bad tdsteer header: {message}")

    if checksum is not None:
        expected = int(checksum, 16) if len(checksum) == 8 and all(c in "0123456789abcdef" for c in checksum) else -1
        if crc32_of(raw.encode("utf-8")) != expected:
            raise SteeringVectorFileError(
                f"{str(path)!r} fails its checksum: its tdsteer header is corrupted; save the vector again"
            )
    try:
        header = parse_json(raw)
    except ValueError as error:
        raise bad(str(error)) from None
    if not isinstance(header, dict):
        raise bad(f"it is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT:
        raise bad(f"format is {short_repr(header.get('format'))}, not {FORMAT!r}")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad(f"format_version {short_repr(version)} is not an integer")
    if version > FORMAT_VERSION:
        raise SteeringVectorFileError(
            f"{str(path)!r} was written by a newer tdsteer (vector format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade tdsteer"
        )
    if version >= 2 and checksum is None:
        raise SteeringVectorFileError(f"{str(path)!r} has lost its checksum: the file is corrupted; save it again")
    records, metadata = header.get("sites"), header.get("metadata", {})
    if not isinstance(records, dict) or not isinstance(metadata, dict):
        raise bad("'sites' and 'metadata' must be objects")
    try:
        check_vector_metadata(metadata)
    except ValueError as error:
        raise bad(str(error)) from None
    sites = {}
    for key, record in records.items():
        try:
            sites[key] = site_from_record(record)
        except ValueError as error:
            raise bad(f"site {key!r}: {error}") from None
    if version < 2:
        return sites, metadata, None
    checksums = header.get("crc32")
    if not isinstance(checksums, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in checksums.values()
    ):
        raise bad("'crc32' must map each site to a CRC-32")
    return sites, metadata, checksums


def _check_direction(path: Path, key: str, tensor: Tensor, checksum: int | None) -> None:
    """Refuse a stored direction that is not a finite float ``[C]`` / ``[L, C]`` tensor matching its checksum."""
    if checksum is not None and crc32_of(tensor) != checksum:
        raise SteeringVectorFileError(
            f"{str(path)!r}: direction {key!r} fails its checksum: the file is corrupted; save the vector again"
        )
    if not tensor.is_floating_point() or tensor.ndim not in (1, 2) or tensor.numel() == 0:
        raise SteeringVectorFileError(
            f"{str(path)!r}: direction {key!r} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; "
            "a direction is a non-empty floating-point [C] or [L, C] tensor"
        )
    if not torch.isfinite(tensor).all():
        raise SteeringVectorFileError(f"{str(path)!r}: direction {key!r} contains NaN or infinite values")


LM_EVAL_SUFFIX = ".pt"


def is_lm_eval_file(source: object) -> bool:
    """Whether ``source`` names an lm-eval ``steered`` file: the one rule every command and loader follows.

    An existing file is told by its first bytes (a ``torch.save`` zip archive or pickle, not a
    safetensors header), whatever its name; a path that does not exist yet, by its ``.pt`` suffix.

    Examples:
        >>> is_lm_eval_file("steer.pt"), is_lm_eval_file("v.safetensors")
        (True, False)
    """
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source).expanduser()
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:  # missing, a folder, unreadable: the name decides (the loader reports the rest)
        return path.suffix.lower() == LM_EVAL_SUFFIX
    # safetensors first: its 8-byte little-endian header length may start with any byte (0x80 for a
    # 128-byte-aligned header), but JSON always follows it
    if len(head) == 9 and head[8:9] == b"{":
        return False
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return True  # torch.save: a zip archive, or a legacy pickle (protocol 2-5)
    return path.suffix.lower() == LM_EVAL_SUFFIX
