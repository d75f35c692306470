"""Where a cache's rows live: typed columns split into chunks, in memory or in files on disk.

A cache folder holds ``cache.json`` (the header: model, sites, read position, dtype, hidden sizes),
``progress.json`` (rows, examples and data hash saved so far, and the rows of every chunk) and one
folder per chunk, ``chunk-00000`` and on, with one raw file per column. Writes go through the files
(``pwrite``), reads map them lazily; ``progress.json`` is replaced atomically after the written files
are flushed, so what it claims is always on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tensordict import MemoryMappedTensor
from torch import Tensor

from tdsteer.sites import Site

FORMAT = "tdsteer.activation_cache"
FORMAT_VERSION = 1
ROW_FIELDS = ("label", "pair", "index", "length")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMPTY_HASH = hashlib.sha256().hexdigest()


class ActivationCacheError(ValueError):
    """A cache that cannot be opened, resumed or appended to as asked."""


@dataclass(frozen=True)
class Column:
    """One stored column: a site's readings (``width`` values a row) or a row field (one int64 a row)."""

    name: str
    dtype: torch.dtype
    width: int | None  # None: one value per row

    def shape(self, rows: int) -> torch.Size:
        return torch.Size([rows] if self.width is None else [rows, self.width])

    def nbytes(self, rows: int) -> int:
        return rows * (self.width or 1) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def file_name(self) -> str:
        return self.name.replace("/", "_") + ".bin"


def columns_of(header: Mapping[str, Any]) -> list[Column]:
    """The columns a header describes: one per site (in the cache dtype), then the int64 row fields."""
    dtype = DTYPES[header["dtype"]]
    keys = [Site.from_dict(s).key for s in header["sites"]]
    return [Column(key, dtype, header["hidden_sizes"][key]) for key in keys] + [
        Column(name, torch.int64, None) for name in ROW_FIELDS
    ]


@dataclass(frozen=True)
class Progress:
    """How far a recording got: rows written, examples consumed, and the hash of the data so far."""

    rows: int = 0
    examples: int = 0
    data_hash: str = EMPTY_HASH


class Chunk:
    """``rows`` preallocated rows of every column, in memory or in files under ``folder``.

    On disk, writes go through the files (``pwrite``), not through a memory map, so recording keeps
    no written page in the process's resident memory; reads map the files lazily with tensordict's
    ``MemoryMappedTensor``.
    """

    def __init__(self, columns: Sequence[Column], rows: int, folder: Path | None, create: bool) -> None:
        self.rows = rows
        self.folder = folder
        self.columns = {c.name: c for c in columns}
        self._data: dict[str, Tensor] | None = None
        self._dirty: set[str] = set()
        if folder is None:
            self._data = {c.name: torch.zeros(c.shape(rows), dtype=c.dtype) for c in columns}
            return
        for column in columns:
            filename = folder / column.file_name
            expected = column.nbytes(rows)
            if create:
                folder.mkdir(parents=True, exist_ok=True)
                with open(filename, "wb") as handle:
                    handle.truncate(expected)  # sparse until written
                continue
            size = filename.stat().st_size if filename.is_file() else -1
            if size != expected:
                raise ActivationCacheError(
                    f"Cache file {str(filename)!r} has {size} bytes, expected {expected}: the cache is truncated "
                    "or corrupted; delete the folder and record again"
                )

    @property
    def data(self) -> dict[str, Tensor]:
        """Every column of this chunk (memory-mapped on first use for a cache on disk)."""
        if self._data is None:
            assert self.folder is not None
            self._data = {
                name: MemoryMappedTensor.from_filename(
                    str(self.folder / column.file_name), dtype=column.dtype, shape=column.shape(self.rows)
                )
                for name, column in self.columns.items()
            }
        return self._data

    def write(self, name: str, row: int, values: Tensor) -> None:
        """Store ``values`` at rows ``row:row + len(values)`` of column ``name``."""
        if self.folder is None:
            assert self._data is not None
            self._data[name][row : row + len(values)] = values
            return
        column = self.columns[name]
        raw = values.to(column.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        fd = os.open(self.folder / column.file_name, os.O_WRONLY)
        try:
            with disk_full_is_clear(self.folder):
                os.pwrite(fd, raw.tobytes(), row * column.nbytes(1))
        finally:
            os.close(fd)
        self._dirty.add(name)
        self._data = None  # a map made before this write may not show it

    def sync(self) -> None:
        """Flush written columns to disk (before progress claims them)."""
        if self.folder is None:
            return
        for name in sorted(self._dirty):
            fd = os.open(self.folder / self.columns[name].file_name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._dirty.clear()

    def trim(self, rows: int) -> None:
        """Keep only the first ``rows`` rows (the unfilled tail of a grown chunk)."""
        if rows >= self.rows:
            return
        if self.folder is None:
            assert self._data is not None
            self._data = {name: t[:rows].clone() for name, t in self._data.items()}
        else:
            self._data = None
            for column in self.columns.values():
                os.truncate(self.folder / column.file_name, column.nbytes(rows))
        self.rows = rows


class CacheStore:
    """The header, chunks and progress of one cache, in memory (``path=None``) or in a folder.

    Package-internal: :class:`~tdsteer.cache.ActivationCache` reads through it and the recording
    writes through it. Open one with :meth:`open` or :meth:`create`.
    """

    def __init__(self, header: dict[str, Any], path: Path | None, progress: Progress, chunk_rows: Sequence[int]):
        self.header = header
        self.path = path
        self.progress = progress
        self.columns = {c.name: c for c in columns_of(header)}
        self.chunks = [
            Chunk(list(self.columns.values()), rows, self._chunk_folder(i), False) for i, rows in enumerate(chunk_rows)
        ]

    @classmethod
    def open(cls, path: Path, header: dict[str, Any] | None = None) -> CacheStore:
        """The cache recorded at ``path`` (its header read again unless given)."""
        header = header or read_header(path)
        saved = read_json(path / "progress.json", "cache progress")
        progress = Progress(saved["rows"], saved["examples"], saved["hash"])
        return cls(header, path, progress, saved["chunks"])

    @classmethod
    def create(cls, header: dict[str, Any], path: Path | None) -> CacheStore:
        """A new, empty cache; on disk, ``progress.json`` then ``cache.json`` are written at once."""
        store = cls(header, path, Progress(), [])
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            store.checkpoint()
            write_json(path / "cache.json", header)
        return store

    @property
    def rows(self) -> int:
        """Rows written so far."""
        return self.progress.rows

    def spans(self) -> Iterator[tuple[int, Chunk]]:
        """Every chunk with the index of its first row."""
        start = 0
        for chunk in self.chunks:
            yield start, chunk
            start += chunk.rows

    def append(
        self, values: Mapping[str, Tensor], *, examples: int, data_hash: str, planned_rows: int | None, chunk_rows: int
    ) -> None:
        """Write the rows ``values`` (every column, same length) after the last row, growing as needed.

        ``examples`` and ``data_hash`` become the progress saved at the next :meth:`checkpoint`; new
        chunks hold ``planned_rows`` rows in all when the total is known, else ``chunk_rows`` each.
        """
        start = self.progress.rows
        new_rows = len(next(iter(values.values())))
        self._reserve(start + new_rows, planned_rows, chunk_rows)
        offset = 0
        for chunk_start, chunk in self.spans():
            lo, hi = max(start, chunk_start), min(start + new_rows, chunk_start + chunk.rows)
            if lo >= hi:
                continue
            for name, column in values.items():
                chunk.write(name, lo - chunk_start, column[offset : offset + hi - lo])
            offset += hi - lo
        self.progress = Progress(start + new_rows, examples, data_hash)

    def checkpoint(self) -> None:
        """Flush written rows, then replace ``progress.json`` to claim them (nothing in memory)."""
        if self.path is None:
            return
        for chunk in self.chunks:
            chunk.sync()
        progress = self.progress
        chunk_rows = [c.rows for c in self.chunks]
        saved = {"rows": progress.rows, "examples": progress.examples, "hash": progress.data_hash, "chunks": chunk_rows}
        write_json(self.path / "progress.json", saved)

    def finish(self) -> None:
        """Trim the unfilled tail of the last chunk and save progress."""
        capacity = sum(c.rows for c in self.chunks)
        if capacity > self.rows:
            last = self.chunks[-1]
            last.trim(last.rows - (capacity - self.rows))
        self.checkpoint()

    def _chunk_folder(self, index: int) -> Path | None:
        return None if self.path is None else self.path / f"chunk-{index:05d}"

    def _reserve(self, needed: int, planned_rows: int | None, chunk_rows: int) -> None:
        capacity = sum(c.rows for c in self.chunks)
        while capacity < needed:
            rows = (
                max(planned_rows - capacity, needed - capacity) if planned_rows else max(chunk_rows, needed - capacity)
            )
            if self.path is not None:
                check_space(self.path, sum(c.nbytes(rows) for c in self.columns.values()))
            with disk_full_is_clear(self.path):
                self.chunks.append(Chunk(list(self.columns.values()), rows, self._chunk_folder(len(self.chunks)), True))
            capacity += rows


def read_header(path: Path) -> dict[str, Any]:
    """``cache.json`` of the cache at ``path``, checked to be a cache this tdsteer can read."""
    header = read_json(path / "cache.json", "cache header")
    if header.get("format") != FORMAT:
        raise ActivationCacheError(f"{str(path)!r} is not a tdsteer activation cache")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise ActivationCacheError(f"{str(path)!r} was written by a newer tdsteer (format {header['format_version']})")
    return header


@contextmanager
def disk_full_is_clear(path: Path | None) -> Iterator[None]:
    """Turn a full disk into an error that names the cache and says what to do."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ActivationCacheError(
                f"Disk full while writing the cache at {str(path)!r}: free space or record elsewhere; "
                "the recording resumes from the last saved checkpoint"
            ) from None
        raise


def check_space(path: Path, needed: int) -> None:
    """Refuse to allocate ``needed`` bytes under ``path`` when the disk has less free."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ActivationCacheError(
            f"Not enough disk space for the cache at {str(path)!r}: {needed / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free; free space or record elsewhere"
        )


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, flushed to disk first."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object at ``path``, or an :class:`ActivationCacheError` naming ``what`` is wrong."""
    if not path.is_file():
        raise ActivationCacheError(f"No {what} at {str(path)!r}: not an activation cache (or an unfinished one)")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ActivationCacheError(f"The {what} at {str(path)!r} is unreadable: {error}") from None
    if not isinstance(data, dict):
        raise ActivationCacheError(f"The {what} at {str(path)!r} is not a JSON object")
    return data
