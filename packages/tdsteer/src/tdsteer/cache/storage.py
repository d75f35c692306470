"""Where a cache's rows live: typed columns split into chunks, in memory or in files on disk.

A cache folder holds ``cache.json`` (the header), ``progress.json`` (what the chunks hold, with
checksums; see :mod:`tdsteer.cache.files`) and one folder per chunk, ``chunk-00000`` and on, with
one raw file per column. Rows are appended in order: writes go through the files (``pwrite``) and
feed a running CRC-32 of each column; reads map the files lazily and read-only.

Every write is ordered so that a crash at any point leaves a cache that loads and resumes:
``progress.json`` only ever claims rows that are flushed to disk; a chunk file may hold more bytes
than claimed (rows written after the last checkpoint, or a tail not yet cut), never fewer; a new
chunk's files are created without truncating anything claimed; finishing claims the trimmed size
first and cuts the files after.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tensordict import MemoryMappedTensor
from torch import Tensor

from tdsteer.cache.files import (
    DTYPES,
    ROW_FIELDS,
    ChunkState,
    Progress,
    read_header,
    read_progress,
    write_header,
    write_progress,
)
from tdsteer.errors import ActivationCacheError
from tdsteer.safe_io import crc32_of, file_crc32, fsync_folder, tensor_bytes
from tdsteer.sites import Site

CHUNK_PREFIX = "chunk-"  # chunk folders: chunk-00000 and on
Verify = Literal["on_read", "on_load", "off"]
VERIFY_MODES = ("on_read", "on_load", "off")


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


class Chunk:
    """``rows`` preallocated rows of every column, in memory or in files under ``folder``.

    On disk, rows are written in order through the files (``pwrite``), not through a memory map,
    so recording keeps no written page in the process's resident memory; each column keeps the
    CRC-32 of its ``filled`` rows. Reads map the files lazily and read-only (tensordict's
    ``MemoryMappedTensor``, copy-on-write: an in-place change to a read tensor never reaches the
    file), after checking the checksums when the chunk was opened from disk with ``verify="on_read"``.
    """

    def __init__(
        self,
        columns: Sequence[Column],
        rows: int,
        folder: Path | None,
        *,
        create: bool,
        filled: int = 0,
        crc32: Mapping[str, int] | None = None,
        verify: Verify = "on_read",
    ) -> None:
        self.rows = rows
        self.folder = folder
        self.columns = {c.name: c for c in columns}
        self.filled = filled
        self.crc32: dict[str, int] | None = dict(crc32) if crc32 is not None else None
        if create:
            self.crc32 = {c.name: 0 for c in columns}
        self._data: dict[str, Tensor] | None = None
        self._dirty: set[str] = set()
        self._new = create
        self.offset = 0  # examples before this chunk's cache, in a cache recorded by several ranks
        self._unverified = folder is not None and not create and self.crc32 is not None and verify != "off"
        if folder is None:
            self._data = {c.name: torch.zeros(c.shape(rows), dtype=c.dtype) for c in columns}
            return
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        for column in columns:
            filename = folder / column.file_name
            expected = column.nbytes(rows)
            if create:  # never O_TRUNC: resize in place (no claimed row lives in a chunk being created)
                fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    os.ftruncate(fd, expected)  # sparse until written
                finally:
                    os.close(fd)
                continue
            if not filename.is_file():
                raise ActivationCacheError(
                    f"Cache file {str(filename)!r} is missing: the cache is incomplete; delete the folder and "
                    "record again"
                )
            size = filename.stat().st_size
            if size < expected:
                raise ActivationCacheError(
                    f"Cache file {str(filename)!r} has {size} bytes, expected {expected}: the cache is "
                    "truncated or corrupted; delete the folder and record again"
                )
        if verify == "on_load":
            self.verify()

    @property
    def data(self) -> dict[str, Tensor]:
        """Every column of this chunk (memory-mapped read-only on first use for a cache on disk), its
        ``index`` and ``pair`` shifted by ``offset``."""
        if self._data is None:
            assert self.folder is not None
            self.verify()
            self._data = {
                name: MemoryMappedTensor.from_filename(
                    str(self.folder / column.file_name), dtype=column.dtype, shape=column.shape(self.rows), mode="r"
                )
                for name, column in self.columns.items()
            }
            if self.offset:  # number the examples after those of the ranks before
                self._data["index"] = self._data["index"] + self.offset
                pair = self._data["pair"]
                self._data["pair"] = torch.where(pair >= 0, pair + self.offset, pair)
        return self._data

    def verify(self) -> None:
        """Check the filled rows of every column against their CRC-32 (once; a no-op without checksums).

        Raises:
            ActivationCacheError: A file's data does not match its checksum.
        """
        if not self._unverified:
            return
        assert self.folder is not None and self.crc32 is not None
        for name, column in self.columns.items():
            filename = self.folder / column.file_name
            try:
                actual = file_crc32(filename, column.nbytes(self.filled))
            except (OSError, ValueError) as error:
                raise ActivationCacheError(
                    f"Cache file {str(filename)!r} cannot be read to check it: {error}"
                ) from None
            if actual != self.crc32[name]:
                raise ActivationCacheError(
                    f"Cache file {str(filename)!r} fails its checksum (CRC-32 {actual:08x}, recorded "
                    f"{self.crc32[name]:08x}): its data is corrupted; delete the folder and record again, or load "
                    "with verify='off' to read it anyway"
                )
        self._unverified = False

    def write(self, name: str, row: int, values: Tensor) -> None:
        """Store ``values`` at rows ``row:row + len(values)`` of column ``name`` (rows come in order)."""
        if self.folder is None:
            assert self._data is not None
            self._data[name][row : row + len(values)] = values
            self.filled = max(self.filled, row + len(values))
            return
        column = self.columns[name]
        assert self.crc32 is not None, "a chunk of a format-1 cache is read-only"
        raw = tensor_bytes(values.to(column.dtype))
        fd = os.open(self.folder / column.file_name, os.O_WRONLY)
        try:
            with disk_full_is_clear(self.folder):
                offset, done = row * column.nbytes(1), 0
                while done < len(raw):  # pwrite may write less than asked
                    done += os.pwrite(fd, raw[done:], offset + done)
        finally:
            os.close(fd)
        self.crc32[name] = crc32_of(raw, self.crc32[name])
        self.filled = row + len(values)
        self._dirty.add(name)
        self._data = None  # a map made before this write may not show it

    def sync(self) -> None:
        """Flush written columns (and, for a new chunk, its folder entries) to disk."""
        if self.folder is None:
            return
        for name in sorted(self._dirty):
            fd = os.open(self.folder / self.columns[name].file_name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._dirty.clear()
        if self._new:
            fsync_folder(self.folder)
            fsync_folder(self.folder.parent)
            self._new = False

    def state(self) -> ChunkState:
        """What ``progress.json`` claims for this chunk."""
        return ChunkState(self.rows, dict(self.crc32) if self.crc32 is not None else None)

    def cut_files(self) -> None:
        """Cut the files to the claimed ``rows`` (after ``progress.json`` claims them; a no-op in memory)."""
        if self.folder is None:
            assert self._data is not None
            self._data = {name: t[: self.rows].clone() for name, t in self._data.items()}
            return
        self._data = None
        for column in self.columns.values():
            filename = self.folder / column.file_name
            if filename.stat().st_size > column.nbytes(self.rows):
                os.truncate(filename, column.nbytes(self.rows))


def check_verify(verify: str) -> None:
    """Raise ``ValueError`` unless ``verify`` is one of :data:`VERIFY_MODES`."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(map(repr, VERIFY_MODES))}, got {verify!r}")


class ChunkedRows:
    """Rows held in a list of chunks and numbered across them: what every store shares.

    The rows of chunk ``k`` follow those of the chunks before it; the store's ``progress`` says how
    many rows are written (the last chunk may hold room for more). Subclasses set ``header``,
    ``path``, ``progress``, ``columns`` and ``chunks``.
    """

    header: dict[str, Any]
    path: Path | None
    progress: Progress
    columns: dict[str, Column]
    chunks: list[Chunk]

    @property
    def rows(self) -> int:
        """Rows written so far."""
        return self.progress.rows

    @property
    def rank_examples(self) -> tuple[int, ...]:
        """Examples recorded by each rank, in rank order (one process: one rank)."""
        return (self.progress.examples,)

    @property
    def capacity(self) -> int:
        """Rows the chunks have room for, written or not."""
        return sum(chunk.rows for chunk in self.chunks)

    def spans(self) -> Iterator[tuple[int, Chunk]]:
        """Every chunk, in order, with the index of its first row."""
        start = 0
        for chunk in self.chunks:
            yield start, chunk
            start += chunk.rows

    def pieces(self, start: int, stop: int) -> Iterator[tuple[Chunk, int, int]]:
        """Where rows ``start:stop`` lie: each chunk holding some of them, with the first and the
        after-last of those rows counted inside the chunk, in row order."""
        for chunk_start, chunk in self.spans():
            lo, hi = max(start, chunk_start), min(stop, chunk_start + chunk.rows)
            if lo < hi:
                yield chunk, lo - chunk_start, hi - chunk_start


class CacheStore(ChunkedRows):
    """The header, chunks and progress of one cache, in memory (``path=None``) or in a folder.

    Package-internal: :class:`~tdsteer.cache.ActivationCache` reads through it and the recording
    writes through it. Open one with :meth:`open` or :meth:`create`.
    """

    def __init__(self, header: dict[str, Any], path: Path | None, progress: Progress, verify: Verify = "on_read"):
        self.header = header
        self.path = path
        self.progress = progress
        self.columns = {c.name: c for c in columns_of(header)}
        self.chunks: list[Chunk] = []
        start = 0
        for i, state in enumerate(progress.chunks):
            filled = min(max(progress.rows - start, 0), state.rows)
            columns = list(self.columns.values())
            folder = self._chunk_folder(i)
            self.chunks.append(
                Chunk(columns, state.rows, folder, create=False, filled=filled, crc32=state.crc32, verify=verify)
            )
            start += state.rows

    @classmethod
    def open(cls, path: Path, header: dict[str, Any] | None = None, verify: Verify = "on_read") -> CacheStore:
        """The cache recorded at ``path`` (its header read again unless given)."""
        check_verify(verify)
        header = header or read_header(path)
        columns = [c.name for c in columns_of(header)]
        return cls(header, path, read_progress(path, columns, header["format_version"]), verify)

    @classmethod
    def create(cls, header: dict[str, Any], path: Path | None) -> CacheStore:
        """A new, empty cache; on disk, ``cache.json`` then an empty ``progress.json`` are written at once."""
        store = cls(header, path, Progress())
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            write_header(path, header)
            store.checkpoint()
        return store

    def append(
        self, values: Mapping[str, Tensor], *, examples: int, data_order: str, planned_rows: int | None, chunk_rows: int
    ) -> None:
        """Write the rows ``values`` (every column, same length) after the last row, growing as needed.

        ``examples`` and ``data_order`` become the progress saved at the next :meth:`checkpoint`; new
        chunks hold ``planned_rows`` rows in all when the total is known, else ``chunk_rows`` each.
        A failed append leaves this store unusable (the files are fine: nothing more is claimed).
        """
        start = self.progress.rows
        new_rows = len(next(iter(values.values())))
        self._reserve(start + new_rows, planned_rows, chunk_rows)
        offset = 0
        for chunk, lo, hi in self.pieces(start, start + new_rows):
            for name, column in values.items():
                chunk.write(name, lo, column[offset : offset + hi - lo])
            offset += hi - lo
        self.progress = Progress(start + new_rows, examples, data_order)

    def checkpoint(self) -> None:
        """Flush written rows, then replace ``progress.json`` to claim them (nothing in memory)."""
        if self.path is None:
            return
        for chunk in self.chunks:
            chunk.sync()
        progress = self.progress
        write_progress(
            self.path,
            Progress(progress.rows, progress.examples, progress.data_order, tuple(c.state() for c in self.chunks)),
        )

    def finish(self) -> None:
        """Claim only the filled rows of the last chunk, then cut its files to them.

        In that order: a crash in between leaves files longer than claimed, which load and resume.
        """
        capacity = self.capacity
        if capacity > self.rows:
            last = self.chunks[-1]
            last.rows -= capacity - self.rows
            if last.rows == 0:
                self.chunks.pop()
        self.checkpoint()
        if self.chunks:
            self.chunks[-1].cut_files()

    def recover(self) -> None:
        """Before appending to a cache from disk: cut the last chunk's files to what ``progress.json``
        claims (more is left by a crash between claiming a trimmed chunk and cutting it)."""
        if self.chunks:
            self.chunks[-1].cut_files()

    def _chunk_folder(self, index: int) -> Path | None:
        return None if self.path is None else self.path / f"{CHUNK_PREFIX}{index:05d}"

    def _reserve(self, needed: int, planned_rows: int | None, chunk_rows: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            rows = (
                max(planned_rows - capacity, needed - capacity) if planned_rows else max(chunk_rows, needed - capacity)
            )
            if self.path is not None:
                check_space(self.path, sum(c.nbytes(rows) for c in self.columns.values()))
            columns = list(self.columns.values())
            with disk_full_is_clear(self.path):
                self.chunks.append(Chunk(columns, rows, self._chunk_folder(len(self.chunks)), create=True))
            capacity += rows


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
