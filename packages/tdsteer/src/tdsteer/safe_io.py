"""Writing and reading tdsteer's files safely: atomic replacement, checksums and bounded JSON.

The one owner of how tdsteer writes a file. Every output (vector files, lm-eval and GGUF exports,
the activation cache's header and progress) is written to a unique temporary file in the
destination's folder (``.NAME.<random>.tmp``, created exclusively, so no other file is touched),
flushed to disk, and renamed over the destination in one step: a reader sees the old file or the
new one, never a half-written one, and a failed write removes its temporary file and leaves the
old file as it was.

Files are data, never code: JSON read from a file goes through :func:`parse_json`, which bounds
its size and nesting and turns every parse failure into a :class:`ValueError` that the caller
names; records are checked field by field before anything is allocated from them.
:func:`crc32_of` and :func:`file_crc32` compute the CRC-32 checksums stored with vector files and
cache chunks (``zlib``: several GB/s, detects any flipped bit and any burst of up to 32).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import stat
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from tdsteer.sites import LAYOUTS, Site

TEMP_SUFFIX = ".tmp"
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64
_READ_BLOCK = 8 * 2**20
_TEXT_METADATA = ("model_name", "model_type", "method", "data_fingerprint", "tdsteer_version", "created", "operator")
_SITE_FIELDS = {
    "path": str,
    "slot": int,
    "layout": str,
    "prefix_tokens": int,
    "io": str,
    "kwarg": str,
    "name": str,
    "class_token": bool,
}


def temp_prefix(dest: Path) -> str:
    """The name prefix of ``dest``'s temporary files: ``.NAME.`` (they end with ``.tmp``)."""
    return f".{dest.name}."


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary path beside ``path``; on success it replaces ``path`` in one step.

    Write the file at the yielded path (any writer that takes a path). When the block ends
    normally, the file is flushed to disk, given the mode of the file it replaces (or the mode a
    new file gets there) and renamed over ``path``; the folder is flushed too. When the block
    raises, the temporary file is removed and ``path`` is untouched. A symlink at ``path`` is
    followed: its target is replaced and the link kept.

    Args:
        path: The destination; its folder is created when missing.

    Returns:
        A context manager yielding the temporary path.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> dest = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(dest) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> dest.read_text(), sorted(p.name for p in dest.parent.iterdir())
        ('hello', ['out.txt'])
    """
    dest = Path(path)
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))
    folder = dest.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(dest)
    # the replaced file's mode, else the one a new file gets here (umask applied): some writers
    # (safetensors) recreate the path with mode 0600
    mode = stat.S_IMODE((dest if dest.is_file() else tmp).stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically with ``data`` as indented JSON (see :func:`atomic_path`).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> dest = Path(tempfile.mkdtemp()) / "p.json"
        >>> write_json(dest, {"rows": 3})
        >>> parse_json(dest.read_bytes())
        {'rows': 3}
    """
    write_bytes(path, json.dumps(data, indent=1).encode("utf-8"))


def seal_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with a ``"crc32"`` field: the CRC-32 of its canonical JSON, checked by :func:`unseal_json`.

    Examples:
        >>> sealed = seal_json({"rows": 3})
        >>> unseal_json(sealed)
        ({'rows': 3}, True)
        >>> unseal_json({**sealed, "rows": 2})
        ({'rows': 2}, False)
    """
    body = {key: value for key, value in data.items() if key != "crc32"}
    return {**body, "crc32": _canonical_crc32(body)}


def unseal_json(data: dict[str, Any]) -> tuple[dict[str, Any], bool | None]:
    """``data`` without its ``"crc32"`` field, and whether the field matches (``None``: there is none)."""
    body = {key: value for key, value in data.items() if key != "crc32"}
    if "crc32" not in data:
        return body, None
    try:
        return body, data["crc32"] == _canonical_crc32(body)
    except (TypeError, ValueError, RecursionError):
        return body, False


def _canonical_crc32(body: Mapping[str, Any]) -> int:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return zlib.crc32(text.encode("ascii"))


def remove_stale_temps(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete temporary files that a killed writer left behind for the files ``names`` in ``folder``.

    Only call it while holding the folder's lock: a live writer's temporary file looks the same.

    Returns:
        The files removed.
    """
    removed = []
    prefixes = tuple(temp_prefix(folder / name) for name in names)
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.name.startswith(prefixes) and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
            with suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (new and renamed files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def crc32_of(data: Any, value: int = 0) -> int:
    """CRC-32 of a bytes-like object or a tensor's bytes, continuing from ``value``.

    Args:
        data: ``bytes``, a buffer (a NumPy array, a ``memoryview``) or a CPU tensor (read without a copy
            when contiguous).
        value: The CRC of the bytes before these, to checksum a file written in pieces.

    Returns:
        The CRC-32, an int in ``[0, 2**32)``.

    Examples:
        >>> import torch
        >>> crc32_of(b"ab") == crc32_of(b"b", crc32_of(b"a"))
        True
        >>> crc32_of(torch.zeros(2, dtype=torch.bfloat16)) == crc32_of(bytes(4))
        True
    """
    if isinstance(data, Tensor):
        data = tensor_bytes(data)
    return zlib.crc32(data, value)


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous (any dtype)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(cast(Any, flat.view(torch.uint8).numpy()))


def file_crc32(path: Path, nbytes: int) -> int:
    """CRC-32 of the first ``nbytes`` bytes of ``path``, read in blocks (nothing mapped, little memory)."""
    value = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < nbytes:
            block = os.pread(fd, min(_READ_BLOCK, nbytes - offset), offset)
            if not block:
                raise ValueError(f"{str(path)!r} ends after {offset} bytes, {nbytes} expected")
            value = zlib.crc32(block, value)
            offset += len(block)
    finally:
        os.close(fd)
    return value


def parse_json(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON read from a file, refusing what could only come from a broken or hostile file.

    Args:
        data: The file's bytes (UTF-8) or text.
        max_depth: Deepest nesting of lists and objects accepted.
        max_bytes: Largest input accepted.

    Returns:
        The parsed value.

    Raises:
        ValueError: Not UTF-8, not JSON, too large, nested too deeply, or a number too long to read;
            the message says which.

    Examples:
        >>> parse_json(b'{"a": [1, 2]}')
        {'a': [1, 2]}
        >>> parse_json("[" * 100 + "]" * 100)
        Traceback (most recent call last):
        ValueError: nested more than 64 levels deep
    """
    if len(data) > max_bytes:
        raise ValueError(f"{len(data)} bytes, more than the {max_bytes} accepted")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {max_depth} levels deep") from None
    except ValueError as error:  # JSONDecodeError, and integers too long to convert
        raise ValueError(f"not valid JSON ({error})") from None
    if _depth(value) > max_depth:
        raise ValueError(f"nested more than {max_depth} levels deep")
    return value


def _depth(value: Any) -> int:
    """Deepest nesting of lists and objects in a parsed JSON value (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def require_finite(directions: Mapping[str, Tensor], doing: str) -> None:
    """Refuse to ``doing`` (``"save 'v.safetensors'"``) a vector with a NaN or infinite value, naming the site.

    Raises:
        ValueError: A direction is not finite.

    Examples:
        >>> require_finite({"h.0": torch.tensor([1.0, float("nan")])}, "save 'v.safetensors'")
        Traceback (most recent call last):
        ValueError: Cannot save 'v.safetensors': the direction at site 'h.0' has 1 NaN or infinite value(s) of 2; ...
    """
    for key, direction in directions.items():
        bad = int((~torch.isfinite(direction.detach())).sum())
        if bad:
            raise ValueError(
                f"Cannot {doing}: the direction at site {key!r} has {bad} NaN or infinite value(s) of "
                f"{direction.numel()}; the data or the method produced no usable direction (check the inputs, "
                "or the scale it was multiplied by)"
            )


def json_default(value: Any) -> Any:
    """``json.dumps`` ``default=`` for metadata: tensors become lists, paths strings, non-finite floats strings."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable")


def site_from_record(record: Any) -> Site:
    """A :class:`~tdsteer.Site` from a record read from a file, every field's type checked first.

    Raises:
        ValueError: The record is not an object, has unknown or mistyped fields, or describes no valid site.

    Examples:
        >>> site_from_record({"path": "h.0", "slot": 0}).key
        'h.0'
        >>> site_from_record({"path": 3})
        Traceback (most recent call last):
        ValueError: site field 'path' must be a str, got int
    """
    if not isinstance(record, dict):
        raise ValueError(f"a site record must be an object, got {type(record).__name__}")
    unknown = sorted(set(record) - {f.name for f in dataclasses.fields(Site)})
    if unknown:
        raise ValueError(f"site record has unknown fields {unknown}")
    for name, kind in _SITE_FIELDS.items():  # the types of the fields it knows; Site checks any newer one
        value = record.get(name)
        if name == "path" and value is None:
            raise ValueError("site record has no 'path'")
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise ValueError(f"site field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    if record.get("layout", "NLC") not in LAYOUTS:
        raise ValueError(f"site layout {record['layout']!r} is not one of {', '.join(LAYOUTS)}")
    try:
        return Site(**record)
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, to quote a value read from a file in an error message.

    Examples:
        >>> short_repr("x" * 100, limit=10)
        "'xxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_vector_metadata(metadata: Mapping[str, Any]) -> None:
    """Check the metadata fields that tdsteer reads back from a vector file (the rest is free-form).

    Raises:
        ValueError: A field has another type than tdsteer writes (``model_hidden_size`` a list, ...).

    Examples:
        >>> check_vector_metadata({"method": "mean_diff", "model_hidden_size": 768, "extra": [1]})
        >>> check_vector_metadata({"model_hidden_size": 1e400})
        Traceback (most recent call last):
        ValueError: metadata field 'model_hidden_size' is inf, not a count
    """
    for name in _TEXT_METADATA:
        if metadata.get(name) is not None and not isinstance(metadata[name], str):
            raise ValueError(f"metadata field {name!r} is {short_repr(metadata[name])}, not text")
    for name in ("model_hidden_size", "num_examples"):
        value = metadata.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**62):
            raise ValueError(f"metadata field {name!r} is {short_repr(value)}, not a count")
    sizes = metadata.get("hidden_sizes")
    if sizes is not None and not (
        isinstance(sizes, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values())
    ):
        raise ValueError(f"metadata field 'hidden_sizes' is {short_repr(sizes)}, not site -> size")
    read = metadata.get("read")
    if read is not None and (not isinstance(read, (str, int)) or isinstance(read, bool)):
        raise ValueError(f"metadata field 'read' is {short_repr(read)}, not a read position")


def _create_temp(dest: Path) -> Path:
    """Create a new, empty temporary file beside ``dest`` (exclusively: never an existing file)."""
    for _ in range(100):
        tmp = dest.with_name(f"{temp_prefix(dest)}{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"Could not create a temporary file beside {str(dest)!r}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
