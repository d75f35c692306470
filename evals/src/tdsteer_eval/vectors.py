"""Steering-vector files as the evaluation reads them: tdsteer ``.safetensors`` and lm-eval ``.pt``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tdsteer import Condition, SteeringVector
from tdsteer.vector import VectorSource, is_lm_eval_file


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


def describe_condition(source: str | os.PathLike[str] | None, condition: Condition | None) -> str | None:
    """The provenance record of a condition: its file's resolved path when it came from one, else its
    description; ``None`` without a condition.

    Examples:
        >>> import torch
        >>> describe_condition(None, None) is None
        True
        >>> describe_condition(None, Condition({"h.0": torch.ones(2)}, threshold=0.1)).startswith("Condition(")
        True
    """
    if condition is None:
        return None
    return str(Path(source).expanduser().resolve()) if source else repr(condition)
