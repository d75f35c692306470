"""Recording: run a model over a dataset once and append what its sites read to a cache.

A contrastive batch of ``B`` pairs adds ``2B`` rows, the positive then the negative of each pair
(labels 1 and 0, the same ``pair`` id); a labelled batch (``{"inputs": ..., "labels": [B]}``) adds
``B`` rows with class labels.

A recording to a folder takes the folder's lock first, so two processes never write into one
cache. A folder that already holds a cache is resumed by example count: the examples it holds are
hashed in order (whatever the batch size, see :class:`~tdsteer.cache.fingerprint.DataOrder`) and
skipped, the batch the cache stopped in is cut at that example, and the rest is appended. It is
refused when the data differs in any recorded example or comes in another order, when the model's
weights differ (:func:`~tdsteer.cache.fingerprint.weights_fingerprint`), or when the sites, read
position or dtype differ; a cache written by format 1 (no fingerprints) is never resumed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn
from tqdm.auto import tqdm

from tdsteer._version import __version__
from tdsteer.batches import batch_size, to_device
from tdsteer.cache.files import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    HEADER,
    holds_only_cache_files,
    read_header,
    recording_lock,
)
from tdsteer.cache.fingerprint import DataOrder, slice_examples, weights_fingerprint
from tdsteer.cache.manifest import holds_only_rank_files, recorded_world_sizes
from tdsteer.cache.storage import CacheStore
from tdsteer.errors import ActivationCacheError
from tdsteer.extraction import SiteRecorder, model_device
from tdsteer.keys import BatchKeys
from tdsteer.model_facts import model_hidden_size, model_name_of, model_type_of
from tdsteer.reading import Reader, ReadLike, TokenReading, describe_read
from tdsteer.sites import Site, SiteLike, as_sites
from tdsteer.vector import base_model_prefix

RESUME_FIELDS = ("model_type", "model_name", "weights_fingerprint", "sites", "read", "dtype", "data_fingerprint")


class ForwardCall(NamedTuple):
    """One forward pass of a cache batch: its positives, its negatives, or its labelled inputs."""

    inputs: Any
    read_index: Tensor | None  # read position per example (the batch's ``keys.*_index`` entry), if any
    labels: Tensor  # int64 [B]: 1 positive, 0 negative, or class ids


class CacheBatch(NamedTuple):
    """The forward calls of one batch (two for a contrastive batch, one for a labelled one) and its size."""

    calls: list[ForwardCall]
    size: int

    @property
    def contrastive(self) -> bool:
        return len(self.calls) == 2


class CallReading(NamedTuple):
    """What one forward call read: a ``[B, hidden]`` tensor per site key, and real tokens per example."""

    sites: dict[str, Tensor]
    lengths: Tensor | None  # None: the inputs had no attention mask


class Settings(NamedTuple):
    """What a recording runs: the model, its data and how batches are read."""

    model: nn.Module
    batches: Iterable[Mapping[str, Any]]
    sites: list[Site]
    read: ReadLike | Reader
    keys: BatchKeys
    label_key: str
    inputs_key: str
    progress: bool
    device: torch.device | str | None


class Plan(NamedTuple):
    """A checked recording request: the header to write (hidden sizes still unknown) and where rows go."""

    header: dict[str, Any]
    num_examples: int | None
    chunk_rows: int
    checkpoint_every: float
    settings: Settings


def plan_recording(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: SiteLike | Sequence[SiteLike],
    *,
    read: ReadLike | Reader,
    dtype: torch.dtype | str,
    num_examples: int | None,
    chunk_rows: int,
    checkpoint_every: float,
    keys: BatchKeys,
    label_key: str,
    inputs_key: str,
    model_name: str | None,
    progress: bool,
    device: torch.device | str | None,
) -> Plan:
    """Check the arguments of :meth:`tdsteer.cache.ActivationCache.record` (whose docstring gives them)
    and build the header of the cache, the model's weights fingerprint included."""
    site_list = as_sites(sites)
    if isinstance(read, str) and read == "all":
        raise ValueError("An activation cache keeps one row per example: use a read such as 'last' or 'mean'")
    if num_examples is None:
        count = getattr(batches, "count", None)
        num_examples = count if isinstance(count, int) else None
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name or model_name_of(model),
        "model_type": model_type_of(model),
        "weights_fingerprint": weights_fingerprint(model),
        "sites": [s.to_dict() for s in site_list],
        "hidden_sizes": None,
        "model_hidden_size": model_hidden_size(model),  # what a vector fitted from the cache records
        "base_model_path": base_model_prefix(model),
        "read": describe_read(read),
        "dtype": dtype_name(dtype),
        "data_fingerprint": getattr(batches, "fingerprint", None),
        "tdsteer_version": __version__,
    }
    settings = Settings(model, batches, site_list, read, keys, label_key, inputs_key, progress, device)
    return Plan(header, num_examples, chunk_rows, checkpoint_every, settings)


def record_cache(plan: Plan, path: Path | None) -> CacheStore:
    """The work of :meth:`tdsteer.cache.ActivationCache.record` in one process: in memory, or into
    ``path`` under its lock (resuming the cache there)."""
    if path is None:
        return _recorded(record_locked(plan, None))
    if path.exists() and not path.is_dir():
        raise ActivationCacheError(f"{str(path)!r} is a file, not a folder; choose a folder for the cache")
    if not (path / HEADER).is_file() and not holds_only_cache_files(path):
        sizes = recorded_world_sizes(path) if holds_only_rank_files(path) else []
        if sizes:
            raise ActivationCacheError(
                f"{str(path)!r} holds a cache recorded by {sizes[-1]} ranks under torch.distributed; resume it with "
                f"{sizes[-1]} processes (torchrun), load it with ActivationCache.load, or record to another path"
            )
        raise ActivationCacheError(f"{str(path)!r} exists and is not an activation cache; choose an empty folder")
    with recording_lock(path):
        return _recorded(record_locked(plan, path))


def _recorded(store: CacheStore | None) -> CacheStore:
    assert store is not None  # without allow_empty, an empty recording raised
    return store


def record_locked(plan: Plan, path: Path | None, *, allow_empty: bool = False) -> CacheStore | None:
    """Record ``plan`` into ``path`` (whose lock the caller holds), resuming the cache there.

    Returns:
        The finished store; ``None`` when ``allow_empty`` and there was nothing to record (no batch,
        no cache before).
    """
    store = existing_cache(plan.header, path) if path is not None else None
    recording = Recording(store, plan.header, path, plan.num_examples, plan.chunk_rows, plan.checkpoint_every)
    return recording.run(*plan.settings, allow_empty=allow_empty)


class Recording:
    """One run of a recording: skips what a resumed cache holds, creates the cache at the first batch
    (when the hidden sizes are known), appends, and saves progress every ``checkpoint_every`` seconds."""

    def __init__(
        self,
        store: CacheStore | None,
        header: dict[str, Any],
        path: Path | None,
        num_examples: int | None,
        chunk_rows: int,
        checkpoint_every: float,
    ) -> None:
        self.store = store
        self.header = header
        self.path = path
        self.num_examples = num_examples
        self.chunk_rows = chunk_rows
        self.checkpoint_every = checkpoint_every

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
        *,
        allow_empty: bool = False,
    ) -> CacheStore | None:
        """Record ``batches`` and return the finished store (``None``: nothing, and ``allow_empty``)."""
        target = torch.device(device) if device is not None else model_device(model)
        recorder = SiteRecorder(sites, read, stop_early=True)
        order = DataOrder()
        resumed = self.store.progress.examples if self.store is not None else 0
        bar = tqdm(total=self.num_examples, initial=resumed, desc="record", unit="example", disable=not progress)
        last_checkpoint = time.monotonic()
        with torch.no_grad(), recorder.prepare(model), bar:
            for batch in batches:
                split = split_batch(batch, keys, label_key, inputs_key)
                size, first = split.size, order.examples
                if first + size <= resumed:  # recorded already: only hashed
                    order.update(batch, size)
                    if order.examples == resumed:
                        self._check_order(order.hexdigest(), resumed)
                    continue
                if first < resumed:  # the cache stopped inside this batch: record from its next example on
                    self._check_order(order.hexdigest_at(batch, size, resumed - first), resumed)
                    split = split_batch(slice_examples(batch, resumed - first, size), keys, label_key, inputs_key)
                    first = resumed
                order.update(batch, size)
                self._append(recorder, model, split, sites, first, order, target)
                if time.monotonic() - last_checkpoint >= self.checkpoint_every:
                    assert self.store is not None
                    self.store.checkpoint()
                    last_checkpoint = time.monotonic()
                bar.update(split.size)
        if order.examples < resumed:
            raise ActivationCacheError(
                f"The cache at {str(self.path)!r} already holds {resumed} examples but the data has only "
                f"{order.examples}; resume with the same data, or record to another path"
            )
        if self.store is None or self.store.rows == 0:
            if allow_empty:  # a rank whose shard is empty
                return None
            raise ValueError("No batches to record: the data is empty")
        self.store.finish()
        return self.store

    def _append(
        self,
        recorder: SiteRecorder,
        model: nn.Module,
        split: CacheBatch,
        sites: list[Site],
        first: int,
        order: DataOrder,
        target: torch.device | None,
    ) -> None:
        """Run the forward calls of one batch and append its rows. A method, so that the readings and
        rows of a batch are freed before the next batch runs (a loop variable would keep them alive)."""
        readings = [read_call(recorder, model, call, target) for call in split.calls]
        store = self._store_for(readings[0], sites)
        values = row_values(split, readings, sites, first, DTYPES[store.header["dtype"]])
        del readings  # only the rows are needed now
        store.append(
            values,
            examples=order.examples,
            data_order=order.hexdigest(),
            planned_rows=self.num_examples * len(split.calls) if self.num_examples else None,
            chunk_rows=self.chunk_rows,
        )

    def _check_order(self, digest: str, resumed: int) -> None:
        assert self.store is not None
        if digest != self.store.progress.data_order:
            raise ActivationCacheError(
                f"The data differs from what the cache at {str(self.path)!r} recorded in its first {resumed} "
                "examples (other examples, or another order); resume with the same data in the same order (any "
                "batch size), or record to another path"
            )

    def _store_for(self, reading: CallReading, sites: list[Site]) -> CacheStore:
        widths = {s.key: int(reading.sites[s.key].shape[-1]) for s in sites}
        if self.store is None:
            self.header["hidden_sizes"] = widths
            self.store = CacheStore.create(self.header, self.path)
        elif self.store.header["hidden_sizes"] != widths:
            raise ActivationCacheError(
                f"The cache at {str(self.path)!r} holds hidden sizes {self.store.header['hidden_sizes']}, "
                f"but the model now reads {widths}: another model; record to another path"
            )
        return self.store


def existing_cache(header: dict[str, Any], path: Path) -> CacheStore | None:
    """The cache already at ``path``, checked to be recorded with ``header``'s settings, or ``None``."""
    if not (path / HEADER).is_file():
        return None
    existing = read_header(path)
    if existing["format_version"] < FORMAT_VERSION:
        raise ActivationCacheError(
            f"The cache at {str(path)!r} was written by an older tdsteer (cache format {existing['format_version']}), "
            "which kept no fingerprint of the model weights or of the data order, so a resume cannot be checked; "
            "load it with ActivationCache.load, or record to another path"
        )
    for field in RESUME_FIELDS:
        if existing.get(field) == header.get(field):
            continue
        if field == "weights_fingerprint":
            raise ActivationCacheError(
                f"The cache at {str(path)!r} was recorded from a {existing.get('model_type')} model with other "
                f"weights (weights fingerprint {str(existing.get(field))[:12]}, this model's {str(header[field])[:12]}): "
                "appending would mix two models' activations; record to another path, or use the checkpoint (and "
                "dtype) it was recorded with"
            )
        if field == "data_fingerprint":
            raise ActivationCacheError(
                f"The cache at {str(path)!r} was recorded from other data (data fingerprint "
                f"{str(existing.get(field))[:12]}, this data's {str(header.get(field))[:12]}); resume it with the same "
                "data, or use another path, or delete it to record anew"
            )
        raise ActivationCacheError(
            f"A cache at {str(path)!r} was recorded with {field}={existing.get(field)!r}, not "
            f"{header.get(field)!r}; use another path, or delete it to record anew"
        )
    store = CacheStore.open(path, existing)
    store.recover()
    return store


def split_batch(batch: Mapping[str, Any], keys: BatchKeys, label_key: str, inputs_key: str) -> CacheBatch:
    """The forward calls of one contrastive or labelled batch."""
    if keys.positive in batch and keys.negative in batch:
        pos, neg = batch[keys.positive], batch[keys.negative]
        size = batch_size(pos)
        if batch_size(neg) != size:
            raise ValueError("A contrastive batch needs as many negatives as positives to keep pairs in a cache")
        pos_index = batch.get(keys.positive_index) if hasattr(batch, "get") else None
        neg_index = batch.get(keys.negative_index) if hasattr(batch, "get") else None
        ones = torch.ones(size, dtype=torch.int64)
        return CacheBatch([ForwardCall(pos, pos_index, ones), ForwardCall(neg, neg_index, ones * 0)], size)
    if inputs_key in batch and label_key in batch:
        labels = torch.as_tensor(batch[label_key]).to(torch.int64).cpu()
        return CacheBatch([ForwardCall(batch[inputs_key], None, labels)], int(labels.shape[0]))
    raise KeyError(
        f"A cache batch needs {keys.positive!r} and {keys.negative!r} entries, or {inputs_key!r} and "
        f"{label_key!r}; got {sorted(map(str, batch.keys()))}"
    )


def read_call(recorder: SiteRecorder, model: nn.Module, call: ForwardCall, target: torch.device | None) -> CallReading:
    """Run one forward call and check that every site read one finite row per example."""
    inputs = call.inputs
    mask = inputs.get("attention_mask") if isinstance(inputs, (Mapping, TensorDictBase)) else None
    if mask is not None and bool((mask.sum(-1) == 0).any()):
        raise ValueError("A batch has rows that are all padding: every example needs a real token")
    readings = recorder.run(model, to_device(inputs, target), mask, call.read_index)
    rows: dict[str, Tensor] = {}
    for key, reading in readings.items():
        if isinstance(reading, TokenReading):
            raise ValueError(f"Site {key!r}: a cache keeps one row per example; use read='last' or 'mean'")
        if not bool(torch.isfinite(reading).all()):
            raise ValueError(f"Site {key!r}: the activations contain NaN or infinite values")
        rows[key] = reading
    return CallReading(rows, mask.sum(-1) if mask is not None else None)


def row_values(
    batch: CacheBatch, readings: list[CallReading], sites: list[Site], first_example: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The cache rows of one batch, column by column: positives and negatives interleaved by pair."""
    size, calls = batch.size, len(batch.calls)

    def interleave(parts: list[Tensor]) -> Tensor:
        if len(parts) == 1:  # a labelled batch: rows already in order, no copy
            return parts[0]
        return torch.stack(parts, 1).reshape(size * calls, *parts[0].shape[1:])

    values: dict[str, Tensor] = {}
    for site in sites:
        values[site.key] = interleave([r.sites[site.key].detach().to("cpu", dtype) for r in readings])
    example = torch.arange(first_example, first_example + size)
    no_lengths = torch.zeros(size, dtype=torch.int64)
    values["label"] = interleave([call.labels for call in batch.calls])
    values["pair"] = example.repeat_interleave(2) if batch.contrastive else torch.full((size,), -1)
    values["index"] = example.repeat_interleave(calls)
    lengths = [r.lengths.cpu().to(torch.int64) if r.lengths is not None else no_lengths for r in readings]
    values["length"] = interleave(lengths)
    return values


def dtype_name(dtype: torch.dtype | str) -> str:
    """The name under which ``dtype`` is stored (``"float32"``, ``"bfloat16"`` or ``"float16"``)."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"Cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
