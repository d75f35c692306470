"""Steering-vector files as the evaluation reads them: tdsteer ``.safetensors`` and lm-eval ``.pt``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch import nn

import tdsteer
from tdsteer import SteeringVector
from tdsteer.vector import VectorSource

LM_EVAL_SUFFIX = ".pt"


def is_lm_eval_file(source: object) -> bool:
    """Whether ``source`` names an lm-eval ``steered`` file (a path ending in ``.pt``).

    Examples:
        >>> is_lm_eval_file("steer.pt"), is_lm_eval_file("v.safetensors")
        (True, False)
    """
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == LM_EVAL_SUFFIX


def base_model_prefix(model: nn.Module) -> str:
    """Path of ``model.base_model`` inside ``model``: what lm-eval's hookpoints are relative to.

    Args:
        model: A Hugging Face model (``transformer`` for GPT-2, ``model`` for Llama).

    Returns:
        The module path, or ``""`` when the model is its own base model (or has none).

    Examples:
        >>> import torch
        >>> base_model_prefix(torch.nn.Linear(2, 2))
        ''
    """
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def load_vector(source: VectorSource, model: nn.Module | None = None) -> SteeringVector:
    """Load a steering vector from any source the evaluation accepts.

    Args:
        source: A :class:`tdsteer.SteeringVector`, a mapping ``{site path: tensor}``, a tdsteer
            ``.safetensors`` file, or an lm-eval ``steered`` ``.pt`` file.
        model: For a ``.pt`` file: the model, whose :func:`base_model_prefix` turns lm-eval's
            hookpoints into site paths (without it the hookpoints are used as they are).

    Returns:
        The vector.

    Raises:
        tdsteer.SteeringVectorFileError: A missing or unreadable file.
        TypeError: ``source`` is none of the accepted types.

    Examples:
        >>> import torch
        >>> load_vector({"transformer.h.0": torch.ones(2)}).keys()
        ['transformer.h.0']
    """
    if is_lm_eval_file(source):
        assert isinstance(source, (str, os.PathLike))
        prefix = base_model_prefix(model) if model is not None else ""
        return SteeringVector.from_lm_eval(Path(source).expanduser(), prefix=prefix)
    return tdsteer.as_vector(source)


def hidden_sizes(vector: SteeringVector) -> set[int]:
    """The hidden sizes a vector was made for: each direction's width and the recorded model size.

    Examples:
        >>> import torch
        >>> sorted(hidden_sizes(SteeringVector({"h.0": torch.ones(4)}, metadata={"model_hidden_size": 4})))
        [4]
    """
    sizes = {int(direction.shape[-1]) for direction in vector.directions.values()}
    recorded = vector.metadata.get("model_hidden_size")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        sizes.add(recorded)
    return sizes


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in blocks.

    Examples:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp(), "empty")
        >>> _ = path.write_bytes(b"")
        >>> file_sha256(path)[:16]
        'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_vector(source: VectorSource, vector: SteeringVector) -> dict[str, Any]:
    """The provenance record of a vector: its file (path and SHA-256) when it came from one, its sites
    and its metadata.

    Examples:
        >>> import torch
        >>> vector = SteeringVector({"h.0": torch.ones(2)}, metadata={"method": "mean_diff"})
        >>> describe_vector(vector, vector)["metadata"]["method"]
        'mean_diff'
    """
    record: dict[str, Any] = {"sites": vector.keys(), "metadata": dict(vector.metadata)}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser().resolve()
        record.update(
            path=str(path), sha256=file_sha256(path), format="lm-eval" if is_lm_eval_file(path) else "tdsteer"
        )
    return record
