"""The small files of a cache folder: the header, the progress record and the recording lock.

``cache.json`` (the header) is written once, before any row, and never changes: model, weights
fingerprint, sites, read position, dtype, hidden sizes, and the model's hidden size and base-model
path that vectors fitted from the cache carry (optional: older caches lack them).
``progress.json`` is replaced atomically at every checkpoint and is the only claim of what the chunk
files hold: rows, examples, the data-order hash of those examples, and per chunk its rows and the
CRC-32 of each column's filled part. Each carries a CRC-32 of its own content (format 2). Both are
parsed as untrusted data: the checksum, then every field is type- and range-checked, so a damaged
file gives an :class:`~tdsteer.cache.ActivationCacheError`, never a ``KeyError``,
``RecursionError`` or a huge allocation. ``record.lock`` holds an exclusive ``flock`` for as long as a process records into the
folder, with that process's id inside.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import torch

from tdsteer.errors import ActivationCacheError
from tdsteer.safe_io import (
    TEMP_SUFFIX,
    parse_json,
    remove_stale_temps,
    seal_json,
    short_repr,
    site_from_record,
    temp_prefix,
    unseal_json,
    write_json,
)

if sys.platform != "win32":  # flock is POSIX; importing tdsteer on Windows must still work
    import fcntl

FORMAT = "tdsteer.activation_cache"
FORMAT_VERSION = 2  # 2: weights fingerprint, data order by example, CRC-32 per chunk column
ROW_FIELDS = ("label", "pair", "index", "length")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMPTY_HASH = hashlib.sha256().hexdigest()
HEADER = "cache.json"
PROGRESS = "progress.json"
LOCK = "record.lock"
OWN_FILES = (HEADER, PROGRESS, LOCK)
MAX_INT = 2**62  # larger counts only come from a damaged file
MAX_WIDTH = 2**31


@dataclass(frozen=True)
class ChunkState:
    """One chunk as ``progress.json`` claims it: its rows, and the CRC-32 of each column's filled part."""

    rows: int
    crc32: dict[str, int] | None = None  # None: written by format 1, no checksums


@dataclass(frozen=True)
class Progress:
    """How far a recording got: rows written, examples consumed, the data-order hash of those examples,
    and the chunks that hold them."""

    rows: int = 0
    examples: int = 0
    data_order: str = EMPTY_HASH
    chunks: tuple[ChunkState, ...] = field(default_factory=tuple)


def read_header(path: Path) -> dict[str, Any]:
    """``cache.json`` of the cache at ``path``, every field checked (any format this tdsteer reads).

    Raises:
        ActivationCacheError: Missing, unreadable, a failed checksum, not a cache, written by a newer
            tdsteer, or a field of the wrong type.
    """
    header, intact = unseal_json(read_json(path / HEADER, "cache header"))
    corrupted = ActivationCacheError(
        f"The cache header at {str(path / HEADER)!r} fails its checksum: it is corrupted; record the cache again"
    )
    if intact is False:
        raise corrupted
    if header.get("format") != FORMAT:
        raise ActivationCacheError(f"{str(path)!r} is not a tdsteer activation cache")
    version = header.get("format_version")
    if not _is_int(version) or version < 1:
        raise ActivationCacheError(f"The cache header at {str(path)!r} has a bad format_version {short_repr(version)}")
    if version > FORMAT_VERSION:
        raise ActivationCacheError(
            f"{str(path)!r} was written by a newer tdsteer (cache format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade tdsteer"
        )
    if intact is None and version >= 2:
        raise corrupted
    check_header(header, f"The cache header at {str(path)!r}")
    return header


def check_header(header: Mapping[str, Any], where: str) -> None:
    """Check the fields of a cache header; ``where`` starts the error message."""

    def bad(message: str) -> ActivationCacheError:
        return ActivationCacheError(f"{where} {message}; the cache is damaged: record it again")

    sites = header.get("sites")
    if not isinstance(sites, list) or not sites:
        raise bad("has no list of sites")
    keys = []
    for record in sites:
        try:
            keys.append(site_from_record(record).key)
        except ValueError as error:
            raise bad(f"has a bad site ({error})") from None
    if len(set(keys)) != len(keys):
        raise bad(f"names a site twice ({keys})")
    widths = header.get("hidden_sizes")
    if not isinstance(widths, dict) or set(widths) != set(keys):
        raise bad(f"has hidden sizes {short_repr(widths)} that do not match its sites {keys}")
    for key, width in widths.items():
        if not _is_int(width) or not 0 < width <= MAX_WIDTH:
            raise bad(f"has hidden size {short_repr(width)} for site {key!r}")
    if not isinstance(header.get("dtype"), str) or header["dtype"] not in DTYPES:
        raise bad(f"has dtype {short_repr(header.get('dtype'))}; known dtypes are {sorted(DTYPES)}")
    if not isinstance(header.get("read"), (str, int)) or isinstance(header.get("read"), bool):
        raise bad(f"has read position {short_repr(header.get('read'))}")
    size = header.get("model_hidden_size")  # absent from caches recorded before it was kept
    if size is not None and (not _is_int(size) or not 0 < size <= MAX_WIDTH):
        raise bad(f"has model_hidden_size {short_repr(size)}")
    text_fields = ["model_name", "model_type", "data_fingerprint", "tdsteer_version", "base_model_path"]
    if header.get("format_version", FORMAT_VERSION) >= 2:
        text_fields.append("weights_fingerprint")
    for name in text_fields:
        if header.get(name) is not None and not isinstance(header[name], str):
            raise bad(f"has {name} {short_repr(header[name])}, not a string")


def read_progress(path: Path, columns: list[str], version: int) -> Progress:
    """``progress.json`` of the cache at ``path``, checked against the cache's ``columns``.

    A cache whose header exists but whose progress file does not (a recording killed between the
    two writes) has recorded nothing yet: its progress is empty.

    Raises:
        ActivationCacheError: Unreadable, or a field of the wrong type or out of range.
    """
    if not (path / PROGRESS).exists():
        return Progress()
    saved, intact = unseal_json(read_json(path / PROGRESS, "cache progress"))
    where = f"The cache progress at {str(path / PROGRESS)!r}"
    if intact is False or (intact is None and version >= 2):
        raise ActivationCacheError(f"{where} fails its checksum: it is corrupted; record the cache again")

    def bad(message: str) -> ActivationCacheError:
        return ActivationCacheError(f"{where} {message}; the cache is damaged: record it again")

    rows, examples = saved.get("rows"), saved.get("examples")
    for name, value in (("rows", rows), ("examples", examples)):
        if not _is_int(value) or not 0 <= value <= MAX_INT:
            raise bad(f"has {name} {short_repr(value)}")
    data_order = saved.get("data_order" if version >= 2 else "hash")
    if not isinstance(data_order, str) or len(data_order) != 64:
        raise bad(f"has a bad data hash {short_repr(data_order)}")
    raw_chunks = saved.get("chunks")
    if not isinstance(raw_chunks, list):
        raise bad("has no list of chunks")
    chunks = [_chunk_state(raw, columns, version, bad) for raw in raw_chunks]
    capacity = sum(c.rows for c in chunks)
    assert isinstance(rows, int) and isinstance(examples, int)
    if capacity < rows:
        raise bad(f"claims {rows} rows but its chunks hold {capacity}")
    return Progress(rows, examples, data_order, tuple(chunks))


def write_progress(path: Path, progress: Progress) -> None:
    """Replace ``progress.json`` atomically (format 2)."""
    saved = {
        "rows": progress.rows,
        "examples": progress.examples,
        "data_order": progress.data_order,
        "chunks": [{"rows": c.rows, "crc32": c.crc32} for c in progress.chunks],
    }
    write_json(path / PROGRESS, seal_json(saved))


def write_header(path: Path, header: Mapping[str, Any]) -> None:
    """Write ``cache.json`` atomically, with its checksum (once, before any row)."""
    write_json(path / HEADER, seal_json(header))


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object at ``path``, or an :class:`ActivationCacheError` naming ``what`` is wrong."""
    if not path.is_file():
        raise ActivationCacheError(f"No {what} at {str(path)!r}: not an activation cache (or an unfinished one)")
    try:
        with open(path, "rb") as handle:
            data = parse_json(handle.read())
    except (OSError, ValueError) as error:
        raise ActivationCacheError(f"The {what} at {str(path)!r} is unreadable: {error}") from None
    if not isinstance(data, dict):
        raise ActivationCacheError(f"The {what} at {str(path)!r} is not a JSON object")
    return data


def holds_only_cache_files(path: Path) -> bool:
    """Whether ``path`` is missing, empty, or holds only files a recording makes (a fresh or killed one)."""
    if not path.exists():
        return True
    temps = tuple(temp_prefix(path / name) for name in (HEADER, PROGRESS))
    return all(
        entry.name in OWN_FILES or (entry.name.startswith(temps) and entry.name.endswith(TEMP_SUFFIX))
        for entry in path.iterdir()
    )


@contextmanager
def recording_lock(path: Path) -> Iterator[None]:
    """Hold the folder's exclusive recording lock (created with the folder when missing).

    Leftover temporary files of a killed recording are removed once the lock is held.

    Raises:
        ActivationCacheError: Another process (or another recording in this one) holds the lock.
    """
    if sys.platform == "win32":
        raise ActivationCacheError(
            "Recording a cache to disk needs POSIX files (Linux, macOS); record in memory (path=None)"
        )
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ActivationCacheError(
                f"The folder {str(path)!r} is being recorded by another process (pid {owner}); wait for it to "
                "finish, or record to another path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temps(path, (HEADER, PROGRESS))
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _chunk_state(raw: Any, columns: list[str], version: int, bad: Any) -> ChunkState:
    if version < 2:
        if not _is_int(raw) or not 0 < raw <= MAX_INT:
            raise bad(f"has a chunk of {short_repr(raw)} rows")
        return ChunkState(raw)
    if not isinstance(raw, dict) or not _is_int(raw.get("rows")) or not 0 < raw["rows"] <= MAX_INT:
        raise bad(f"has a bad chunk record {short_repr(raw)}")
    crc = raw.get("crc32")
    if not isinstance(crc, dict) or set(crc) != set(columns):
        raise bad(f"has checksums for {short_repr(crc)}, not for the columns {columns}")
    if not all(_is_int(v) and 0 <= v < 2**32 for v in crc.values()):
        raise bad(f"has a bad checksum in {short_repr(crc)}")
    return ChunkState(raw["rows"], dict(crc))


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
