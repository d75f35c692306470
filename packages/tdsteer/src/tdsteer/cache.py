"""``ActivationCache``: what sites read over a whole dataset, recorded once, in memory or on disk.

A cache holds one row per example and site: the reading at the chosen read position (the same
readers as extraction), stored as float32, bfloat16 or float16. A contrastive batch of ``B`` pairs
adds ``2B`` rows, the positive then the negative of each pair (labels 1 and 0, the same ``pair``
id); a labelled batch (``{"inputs": ..., "labels": [B]}``) adds ``B`` rows with class labels.

On disk the rows live in chunk folders of tensordict memory-mapped files, preallocated when the
number of examples is known and grown a chunk at a time when not; ``progress.json`` is replaced
atomically after every batch, so a killed recording resumes where it stopped and a write is never
half-visible. Fitting (``to_vector``) streams over the rows with the same aggregators as
extraction, accumulating in float64.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tensordict import MemoryMappedTensor, TensorDict, TensorDictBase
from torch import Tensor, nn
from tqdm.auto import tqdm

from tdsteer._version import __version__
from tdsteer.aggregators import Aggregator, make_aggregator
from tdsteer.extraction import SiteRecorder, _to_device, model_device
from tdsteer.keys import BatchKeys
from tdsteer.reading import Reader, ReadLike, TokenReading, describe_read
from tdsteer.sites import Site, SiteLike, as_sites
from tdsteer.vector import SteeringVector, make_metadata, model_name_of, model_type_of

FORMAT = "tdsteer.activation_cache"
FORMAT_VERSION = 1
ROW_FIELDS = ("label", "pair", "index", "length")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ActivationCacheError(ValueError):
    """A cache that cannot be opened, resumed or appended to as asked."""


@dataclass(frozen=True)
class _Column:
    name: str
    dtype: torch.dtype
    width: int | None  # None: one value per row

    def shape(self, rows: int) -> torch.Size:
        return torch.Size([rows] if self.width is None else [rows, self.width])

    def nbytes(self, rows: int) -> int:
        return rows * (self.width or 1) * torch.empty((), dtype=self.dtype).element_size()


def _file_name(column: str) -> str:
    return column.replace("/", "_") + ".bin"


class _Chunk:
    """``rows`` preallocated rows of every column, in memory or in files under ``folder``.

    On disk, writes go through the files (``pwrite``), not through a memory map, so recording keeps
    no written page in the process's resident memory; reads map the files lazily with tensordict's
    ``MemoryMappedTensor``.
    """

    def __init__(self, columns: Sequence[_Column], rows: int, folder: Path | None, create: bool) -> None:
        self.rows = rows
        self.folder = folder
        self.columns = {c.name: c for c in columns}
        self._data: dict[str, Tensor] | None = None
        self._dirty: set[str] = set()
        if folder is None:
            self._data = {c.name: torch.zeros(c.shape(rows), dtype=c.dtype) for c in columns}
            return
        for column in columns:
            filename = folder / _file_name(column.name)
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
                    str(self.folder / _file_name(name)), dtype=column.dtype, shape=column.shape(self.rows)
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
        fd = os.open(self.folder / _file_name(name), os.O_WRONLY)
        try:
            with _disk_full_is_clear(self.folder):
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
            fd = os.open(self.folder / _file_name(name), os.O_RDONLY)
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
            for name, column in self.columns.items():
                os.truncate(self.folder / _file_name(name), column.nbytes(rows))
        self.rows = rows


class ActivationCache:
    """Readings of chosen sites over a dataset, with labels and per-example metadata.

    Build one with :meth:`record`, reopen one (without the model) with :meth:`load`.

    Examples:
        >>> import torch, tdsteer
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3))
        >>> batches = [{"positive": torch.randn(4, 3) + 1, "negative": torch.randn(4, 3)}]
        >>> cache = tdsteer.ActivationCache.record(model, batches, ["0"], progress=False)
        >>> len(cache), cache["0"].shape
        (8, torch.Size([8, 3]))
        >>> cache.to_vector("mean_diff")["0"].shape
        torch.Size([3])
    """

    def __init__(self, header: dict[str, Any], path: Path | None, *, create: bool) -> None:
        self.header = header
        self.path = path
        self.sites: list[Site] = [Site.from_dict(s) for s in header["sites"]]
        dtype = DTYPES[header["dtype"]]
        self.columns = [_Column(s.key, dtype, header["hidden_sizes"][s.key]) for s in self.sites] + [
            _Column(name, torch.int64, None) for name in ROW_FIELDS
        ]
        self.chunks: list[_Chunk] = []
        self.rows = 0
        self.examples = 0
        self.prefix_hash = hashlib.sha256().hexdigest()
        if path is not None and not create:
            progress = self._read_progress()
            self.rows, self.examples, self.prefix_hash = progress["rows"], progress["examples"], progress["hash"]
            for i, rows in enumerate(progress["chunks"]):
                self.chunks.append(_Chunk(self.columns, rows, path / f"chunk-{i:05d}", create=False))

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationCache:
        """Reopen a cache recorded to ``path``; no model needed.

        Raises:
            ActivationCacheError: Not a tdsteer cache, or truncated / corrupted files.
        """
        path = Path(path)
        header = _read_json(path / "cache.json", "cache header")
        if header.get("format") != FORMAT:
            raise ActivationCacheError(f"{str(path)!r} is not a tdsteer activation cache")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ActivationCacheError(
                f"{str(path)!r} was written by a newer tdsteer (format {header['format_version']})"
            )
        return cls(header, path, create=False)

    @classmethod
    def record(
        cls,
        model: nn.Module,
        batches: Iterable[Mapping[str, Any]],
        sites: SiteLike | Sequence[SiteLike],
        *,
        path: str | os.PathLike[str] | None = None,
        read: ReadLike | Reader = "last",
        dtype: torch.dtype | str = torch.float32,
        num_examples: int | None = None,
        chunk_rows: int = 16384,
        checkpoint_every: float = 1.0,
        keys: BatchKeys | None = None,
        label_key: str = "labels",
        inputs_key: str = "inputs",
        model_name: str | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ) -> ActivationCache:
        """Run ``model`` over ``batches`` once and keep what ``sites`` read.

        Args:
            model: The model; site paths are relative to it.
            batches: Contrastive batches (as for :func:`tdsteer.extract`), or labelled batches
                ``{inputs_key: inputs, label_key: LongTensor[B]}``. Iteration must be repeatable
                for a recording to resume.
            sites: Sites to record.
            path: Folder for a memory-mapped cache; ``None`` keeps it in memory. An existing cache
                there is resumed (same model, sites, read position, dtype and data, or an error).
            read: Read position; one row per example (``"all"`` is refused).
            dtype: Storage dtype: ``float32``, ``bfloat16`` or ``float16``.
            num_examples: Number of examples, to preallocate; default: the batches' ``count`` when
                they have one, else grown ``chunk_rows`` rows at a time.
            chunk_rows: Rows per chunk when growing.
            checkpoint_every: Seconds between saved checkpoints (data flushed, then ``progress.json``
                replaced); a killed recording resumes from the last one. ``0`` saves after every batch.
            keys: Names of the contrastive batch entries.
            label_key: Entry holding class labels in labelled batches.
            inputs_key: Entry holding the inputs in labelled batches.
            model_name: Recorded name (default: ``config.name_or_path``).
            progress: Show a tqdm bar over examples.
            device: Where batch tensors go (default: the model's device).

        Returns:
            The cache (reopen it later with :meth:`load`).

        Raises:
            ActivationCacheError: ``path`` holds a cache with other settings or other data, or there
                is not enough disk space.
        """
        site_list = as_sites(sites)
        if isinstance(read, str) and read == "all":
            raise ValueError("An activation cache keeps one row per example: use a read such as 'last' or 'mean'")
        dtype_name = _dtype_name(dtype)
        keys = keys or BatchKeys()
        data_fingerprint = getattr(batches, "fingerprint", None)
        if num_examples is None:
            count = getattr(batches, "count", None)
            num_examples = count if isinstance(count, int) else None
        header: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": model_name or model_name_of(model),
            "model_type": model_type_of(model),
            "sites": [s.to_dict() for s in site_list],
            "hidden_sizes": None,
            "read": describe_read(read),
            "dtype": dtype_name,
            "data_fingerprint": data_fingerprint,
            "tdsteer_version": __version__,
        }
        folder = None if path is None else Path(path)
        recording = _Recording(cls._existing(header, folder), header, folder, num_examples, chunk_rows)
        recording.checkpoint_every = checkpoint_every
        recording.run(model, batches, site_list, read, keys, label_key, inputs_key, progress, device)
        assert recording.cache is not None
        return recording.cache

    @classmethod
    def _existing(cls, header: dict[str, Any], path: Path | None) -> ActivationCache | None:
        """The cache already at ``path`` (checked against ``header``), or ``None``."""
        if path is None:
            return None
        if (path / "cache.json").is_file():
            existing = _read_json(path / "cache.json", "cache header")
            for field in ("model_type", "model_name", "sites", "read", "dtype", "data_fingerprint"):
                if existing.get(field) != header.get(field):
                    raise ActivationCacheError(
                        f"A cache at {str(path)!r} was recorded with {field}={existing.get(field)!r}, not "
                        f"{header.get(field)!r}; use another path, or delete it to record anew"
                    )
            return cls(existing, path, create=False)
        if path.exists() and any(path.iterdir()):
            raise ActivationCacheError(f"{str(path)!r} exists and is not an activation cache; choose an empty folder")
        return None

    @classmethod
    def _create(cls, header: dict[str, Any], path: Path | None) -> ActivationCache:
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        cache = cls(header, path, create=True)
        if path is not None:
            cache._save_progress()
            _write_json(path / "cache.json", header)
        return cache

    # -- writing ----------------------------------------------------------------------------------
    @staticmethod
    def _rows_of(
        batch: Mapping[str, Any], keys: BatchKeys, label_key: str, inputs_key: str
    ) -> tuple[list[tuple[Any, Tensor | None, Tensor, Tensor | None]], int]:
        """The forward calls of one batch: (inputs, read index, labels, pair offsets), and its size."""
        from tdsteer.extraction import _batch_size

        if keys.positive in batch and keys.negative in batch:
            pos, neg = batch[keys.positive], batch[keys.negative]
            size = _batch_size(pos)
            if _batch_size(neg) != size:
                raise ValueError("A contrastive batch needs as many negatives as positives to keep pairs in a cache")
            pos_index = batch.get(keys.positive_index) if hasattr(batch, "get") else None
            neg_index = batch.get(keys.negative_index) if hasattr(batch, "get") else None
            ones = torch.ones(size, dtype=torch.int64)
            return [(pos, pos_index, ones, None), (neg, neg_index, ones * 0, None)], size
        if inputs_key in batch and label_key in batch:
            labels = torch.as_tensor(batch[label_key]).to(torch.int64).cpu()
            return [(batch[inputs_key], None, labels, None)], int(labels.shape[0])
        raise KeyError(
            f"A cache batch needs {keys.positive!r} and {keys.negative!r} entries, or {inputs_key!r} and "
            f"{label_key!r}; got {sorted(map(str, batch.keys()))}"
        )

    @staticmethod
    def _read(
        recorder: SiteRecorder, model: nn.Module, rows: list[Any], target: torch.device | None
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for inputs, index, _, _ in rows:
            mask = inputs.get("attention_mask") if isinstance(inputs, (Mapping, TensorDictBase)) else None
            if mask is not None and bool((mask.sum(-1) == 0).any()):
                raise ValueError("A batch has rows that are all padding: every example needs a real token")
            readings = recorder.run(model, _to_device(inputs, target), mask, index)
            for key, reading in readings.items():
                if isinstance(reading, TokenReading):
                    raise ValueError(f"Site {key!r}: a cache keeps one row per example; use read='last' or 'mean'")
                if not bool(torch.isfinite(reading).all()):
                    raise ValueError(f"Site {key!r}: the activations contain NaN or infinite values")
            lengths = mask.sum(-1) if mask is not None else None
            out.append({**readings, "__length__": lengths})
        return out

    def _append(
        self,
        readings: list[dict[str, Any]],
        rows: list[Any],
        first_example: int,
        num_examples: int | None,
        chunk_rows: int,
    ) -> None:
        contrastive = len(rows) == 2
        size = int(rows[0][2].shape[0])
        new_rows = size * len(rows)
        columns: dict[str, Tensor] = {}
        for site in self.sites:
            parts = [r[site.key].detach().to("cpu", self.columns[0].dtype) for r in readings]
            columns[site.key] = torch.stack(parts, 1).reshape(new_rows, -1) if contrastive else parts[0]
        example = torch.arange(first_example, first_example + size)
        labels = torch.stack([r[2] for r in rows], 1).reshape(-1) if contrastive else rows[0][2]
        lengths = [r["__length__"] for r in readings]
        length = (
            torch.stack([ln.cpu() if ln is not None else torch.zeros(size, dtype=torch.int64) for ln in lengths], 1)
            .reshape(-1)
            .to(torch.int64)
        )
        columns["label"] = labels
        columns["pair"] = example.repeat_interleave(2) if contrastive else torch.full((size,), -1)
        columns["index"] = example.repeat_interleave(len(rows))
        columns["length"] = length
        self._ensure_capacity(self.rows + new_rows, num_examples, chunk_rows)
        start = self.rows
        offset = 0
        for chunk_start, chunk in self._chunk_spans():
            lo, hi = max(start, chunk_start), min(start + new_rows, chunk_start + chunk.rows)
            if lo >= hi:
                continue
            for name, values in columns.items():
                chunk.write(name, lo - chunk_start, values[offset : offset + hi - lo])
            offset += hi - lo
        self.rows += new_rows

    def _finish(self) -> None:
        """Trim the unfilled tail of the last chunk and save progress."""
        capacity = sum(c.rows for c in self.chunks)
        if capacity > self.rows:
            last = self.chunks[-1]
            last.trim(last.rows - (capacity - self.rows))
        self._save_progress()

    def _chunk_spans(self) -> Iterator[tuple[int, _Chunk]]:
        start = 0
        for chunk in self.chunks:
            yield start, chunk
            start += chunk.rows

    def _ensure_capacity(self, needed: int, planned_rows: int | None, chunk_rows: int) -> None:
        capacity = sum(c.rows for c in self.chunks)
        while capacity < needed:
            rows = (
                max(planned_rows - capacity, needed - capacity) if planned_rows else max(chunk_rows, needed - capacity)
            )
            folder = None if self.path is None else self.path / f"chunk-{len(self.chunks):05d}"
            if self.path is not None:
                _check_space(self.path, sum(c.nbytes(rows) for c in self.columns))
            with _disk_full_is_clear(self.path):
                self.chunks.append(_Chunk(self.columns, rows, folder, create=True))
            capacity += rows

    def _save_progress(self) -> None:
        if self.path is None:
            return
        for chunk in self.chunks:
            chunk.sync()
        _write_json(
            self.path / "progress.json",
            {
                "rows": self.rows,
                "examples": self.examples,
                "hash": self.prefix_hash,
                "chunks": [c.rows for c in self.chunks],
            },
        )

    def _read_progress(self) -> dict[str, Any]:
        assert self.path is not None
        return _read_json(self.path / "progress.json", "cache progress")

    # -- reading ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.rows

    @property
    def metadata(self) -> dict[str, Any]:
        """The recording's model, sites, read position, dtype, data fingerprint and tdsteer version."""
        return {k: v for k, v in self.header.items() if k not in ("format", "format_version")}

    def column(self, name: str, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of a site key or of ``label``, ``pair``, ``index``, ``length``."""
        if name not in {c.name for c in self.columns}:
            raise KeyError(f"No column {name!r}; the cache has sites {[s.key for s in self.sites]} and {ROW_FIELDS}")
        stop = self.rows if stop is None else min(stop, self.rows)
        parts = []
        for chunk_start, chunk in self._chunk_spans():
            lo, hi = max(start, chunk_start), min(stop, chunk_start + chunk.rows)
            if lo < hi:
                parts.append(chunk.data[name][lo - chunk_start : hi - chunk_start])
        if not parts:
            return torch.empty(0)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def take(self, name: str, rows: Tensor) -> Tensor:
        """Rows ``rows`` (indices) of a column, gathered chunk by chunk without copying whole columns."""
        column = {c.name: c for c in self.columns}[name]
        out = torch.empty(column.shape(len(rows)), dtype=column.dtype)
        for chunk_start, chunk in self._chunk_spans():
            inside = (rows >= chunk_start) & (rows < chunk_start + chunk.rows)
            if bool(inside.any()):
                out[inside] = chunk.data[name][rows[inside] - chunk_start]
        return out

    def __getitem__(self, name: str) -> Tensor:
        return self.column(name)

    @property
    def labels(self) -> Tensor:
        """Label of every row (1 positive, 0 negative, or class ids)."""
        return self.column("label")

    def iter_batches(self, batch_size: int = 4096, sites: Sequence[SiteLike] | None = None) -> Iterator[TensorDict]:
        """Rows in order, ``batch_size`` at a time, as TensorDicts of the sites and row fields."""
        names = [s.key for s in (self.sites if sites is None else as_sites(sites))] + list(ROW_FIELDS)
        for start in range(0, self.rows, batch_size):
            stop = min(start + batch_size, self.rows)
            yield TensorDict({n: self.column(n, start, stop) for n in names}, batch_size=[stop - start])

    def to_vector(
        self,
        method: str | Callable[..., Aggregator] = "mean_diff",
        *,
        sites: Sequence[SiteLike] | None = None,
        positive_label: int = 1,
        negative_label: int = 0,
        rows: Tensor | None = None,
        batch_size: int = 4096,
        **method_kwargs: Any,
    ) -> SteeringVector:
        """Fit a steering vector from the cache: any method, any subset of sites, no model run.

        Args:
            method: ``"mean_diff"``, ``"pca_diff"``, ``"pca_center"``, ``"probe"`` or a registered one.
            sites: Subset of the cached sites (default: all).
            positive_label: Label of the positive rows.
            negative_label: Label of the negative rows.
            rows: Restrict to these row indices (e.g. a training split).
            batch_size: Rows per streamed step.
            method_kwargs: Passed to the aggregator.

        Returns:
            A :class:`~tdsteer.SteeringVector` whose metadata records the cache's model and data.
        """
        chosen = self.sites if sites is None else as_sites(sites)
        known = {s.key for s in self.sites}
        unknown = [s.key for s in chosen if s.key not in known]
        if unknown:
            raise KeyError(f"Sites {unknown} are not in the cache; it has {sorted(known)}")
        aggregators = {s.key: make_aggregator(method, **method_kwargs) for s in chosen}
        label = self.labels
        pair = self.column("pair")
        selected = torch.ones(self.rows, dtype=torch.bool) if rows is None else _row_mask(rows, self.rows)
        pos_rows = ((label == positive_label) & selected).nonzero().flatten()
        neg_rows = ((label == negative_label) & selected).nonzero().flatten()
        paired = bool((pair[pos_rows] >= 0).all()) if len(pos_rows) else False
        if paired:
            # pair i of the cache occupies rows 2i (positive) and 2i + 1 (negative)
            keep = torch.isin(pos_rows + 1, neg_rows)
            pos_rows = pos_rows[keep]
            neg_rows = pos_rows + 1
        if len(pos_rows) == 0 or len(neg_rows) == 0:
            raise ValueError(f"The cache has no rows labelled {positive_label} or none labelled {negative_label}")
        steps = max(len(pos_rows), len(neg_rows))
        for start in range(0, steps, batch_size):
            p_idx, n_idx = pos_rows[start : start + batch_size], neg_rows[start : start + batch_size]
            for site in chosen:
                aggregators[site.key].update(self.take(site.key, p_idx).float(), self.take(site.key, n_idx).float())
        directions = {key: agg.result() for key, agg in aggregators.items()}
        metadata = make_metadata(
            None,
            directions,
            method=method if isinstance(method, str) else getattr(method, "name", repr(method)),
            read=self.header["read"],
            fingerprint=self.header.get("data_fingerprint"),
            num_examples=int(len(pos_rows)),
            model_name=self.header.get("model_name"),
            extra={"model_type": self.header.get("model_type"), "source": "activation_cache"},
        )
        return SteeringVector(directions, {s.key: s for s in chosen}, metadata)

    def probe_auroc(
        self,
        site: SiteLike,
        *,
        method: str = "mean_diff",
        test_fraction: float = 0.25,
        seed: int = 0,
        positive_label: int = 1,
        negative_label: int = 0,
    ) -> float:
        """How well a direction fitted on some examples separates the labels of the others.

        Splits the examples (pairs stay together) into train and test, fits ``method`` on the
        training rows, projects the held-out rows on the direction, and returns the AUROC of the
        projections against the labels (0.5: chance, 1.0: perfect separation).
        """
        key = as_sites(site)[0].key
        examples = self.column("index")
        unique = torch.unique(examples)
        generator = torch.Generator().manual_seed(seed)
        order = unique[torch.randperm(len(unique), generator=generator)]
        n_test = max(1, int(round(test_fraction * len(unique))))
        if n_test >= len(unique):
            raise ValueError("Too few examples to hold some out; record more or lower test_fraction")
        test = torch.isin(examples, order[:n_test])
        train_rows = (~test).nonzero().flatten()
        vector = self.to_vector(
            method, sites=[key], rows=train_rows, positive_label=positive_label, negative_label=negative_label
        )
        direction = vector[key].double()
        label = self.labels
        scores = self.take(key, torch.arange(self.rows)).double() @ direction
        test_pos = scores[test & (label == positive_label)]
        test_neg = scores[test & (label == negative_label)]
        return auroc(test_pos, test_neg)


class _Recording:
    """One run of :meth:`ActivationCache.record`: skips what a resumed cache holds, creates the cache
    at the first batch (when the hidden sizes are known), appends, and saves progress per batch."""

    def __init__(
        self,
        cache: ActivationCache | None,
        header: dict[str, Any],
        path: Path | None,
        num_examples: int | None,
        chunk_rows: int,
    ) -> None:
        self.cache = cache
        self.header = header
        self.path = path
        self.num_examples = num_examples
        self.chunk_rows = chunk_rows
        self.checkpoint_every = 1.0

    def run(
        self,
        model: nn.Module,
        batches: Iterable[Mapping[str, Any]],
        sites: list[Site],
        read: ReadLike | Reader,
        keys: BatchKeys,
        label_key: str,
        inputs_key: str,
        progress: bool,
        device: torch.device | str | None,
    ) -> None:
        target = torch.device(device) if device is not None else model_device(model)
        recorder = SiteRecorder(sites, read, stop_early=True)
        hasher = hashlib.sha256()
        seen = 0
        resumed = self.cache.examples if self.cache is not None else 0
        bar = tqdm(total=self.num_examples, initial=resumed, desc="record", unit="example", disable=not progress)
        last_checkpoint = time.monotonic()
        with torch.no_grad(), recorder.prepare(model), bar:
            for batch in batches:
                rows, size = ActivationCache._rows_of(batch, keys, label_key, inputs_key)
                _digest_batch(hasher, batch)
                if seen < resumed:
                    seen += size
                    if seen == resumed and self.cache is not None and hasher.hexdigest() != self.cache.prefix_hash:
                        raise ActivationCacheError(
                            f"The data differs from what the cache at {str(self.path)!r} recorded so far; "
                            "resume with the same data in the same order, or record to another path"
                        )
                    continue
                readings = ActivationCache._read(recorder, model, rows, target)
                cache = self._cache_for(readings[0], sites)
                planned = self.num_examples * len(rows) if self.num_examples else None
                cache._append(readings, rows, seen, planned, self.chunk_rows)
                seen += size
                cache.examples = seen
                cache.prefix_hash = hasher.hexdigest()
                if time.monotonic() - last_checkpoint >= self.checkpoint_every:
                    cache._save_progress()
                    last_checkpoint = time.monotonic()
                bar.update(size)
        if seen < resumed:
            raise ActivationCacheError(
                f"The cache at {str(self.path)!r} already holds {resumed} examples but the data has only {seen}"
            )
        if self.cache is None or self.cache.rows == 0:
            raise ValueError("No batches to record: the data is empty")
        self.cache._finish()

    def _cache_for(self, readings: Mapping[str, Any], sites: list[Site]) -> ActivationCache:
        widths = {s.key: int(readings[s.key].shape[-1]) for s in sites}
        if self.cache is None:
            self.header["hidden_sizes"] = widths
            self.cache = ActivationCache._create(self.header, self.path)
        elif self.cache.header["hidden_sizes"] != widths:
            raise ActivationCacheError(
                f"The cache at {str(self.path)!r} holds hidden sizes {self.cache.header['hidden_sizes']}, "
                f"but the model now reads {widths}: another model; record to another path"
            )
        return self.cache


def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of scores: probability a positive outscores a negative (ties count half)."""
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    greater = (positive.unsqueeze(1) > negative.unsqueeze(0)).double().mean()
    ties = (positive.unsqueeze(1) == negative.unsqueeze(0)).double().mean()
    return float(greater + 0.5 * ties)


def _row_mask(rows: Tensor, total: int) -> Tensor:
    mask = torch.zeros(total, dtype=torch.bool)
    mask[rows.to(torch.int64)] = True
    return mask


def _dtype_name(dtype: torch.dtype | str) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"Cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _digest_batch(hasher: Any, batch: Mapping[str, Any]) -> None:
    from tdsteer.extraction import _digest

    _digest(hasher, batch)


@contextmanager
def _disk_full_is_clear(path: Path | None) -> Iterator[None]:
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


def _check_space(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ActivationCacheError(
            f"Not enough disk space for the cache at {str(path)!r}: {needed / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free; free space or record elsewhere"
        )


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict[str, Any]:
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
