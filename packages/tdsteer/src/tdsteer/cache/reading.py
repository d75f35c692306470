"""``ActivationCache``: the read API of a recorded cache, and fitting vectors from it without the model.

Rows are gathered chunk by chunk from the store (memory-mapped files for a cache on disk), so no
whole column is copied to pick a few rows. Fitting (``to_vector``) streams over the rows with the
same aggregators as extraction, accumulating in float64.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from tdsteer.aggregators import ActAdd, Aggregator, make_aggregator
from tdsteer.cache.files import ROW_FIELDS
from tdsteer.cache.ranks import RankedStore, open_store, record_store, unshard
from tdsteer.cache.recording import plan_recording
from tdsteer.cache.storage import CacheStore, Chunk, Verify
from tdsteer.errors import ActivationCacheError
from tdsteer.keys import BatchKeys
from tdsteer.reading import Reader, ReadLike
from tdsteer.sites import Site, SiteLike, as_sites
from tdsteer.vector import SteeringVector, make_metadata


class ActivationCache:
    """Readings of chosen sites over a dataset, with labels and per-example metadata.

    Build one with :meth:`record`, reopen one (without the model) with :meth:`load`. Each row is one
    example at one read position; besides a column per site key there are the row fields ``label``,
    ``pair`` (pair id, ``-1`` for labelled batches), ``index`` (example number) and ``length`` (real
    tokens, ``0`` without an attention mask).

    A cache recorded by several ``torch.distributed`` ranks (:meth:`record`) reads as one: every read
    spans the rows of rank 0, then rank 1 and on, ``index`` and ``pair`` numbering the examples in
    that order; ``metadata["world_size"]`` gives the number of ranks. Rows come in *rank order*, not
    in the order of the data before it was split over the ranks (the cache cannot tell how it was
    split): fitted vectors do not depend on the order, and :meth:`data_index` gives each row's place
    in the data when the split was :func:`tdsteer.distributed.shard` of the examples.

    Args:
        store: The recorded rows (package-internal; use :meth:`record` or :meth:`load`).

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

    def __init__(self, store: CacheStore | RankedStore) -> None:
        self.store = store
        self.header = store.header
        self.path = store.path
        self.sites: list[Site] = [Site.from_dict(s) for s in store.header["sites"]]
        self.rows = store.rows  # the store is finished: rows, examples and chunks no longer change
        self.examples = store.progress.examples
        self.chunks: list[Chunk] = store.chunks

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: Verify = "on_read") -> ActivationCache:
        """Reopen a cache recorded to ``path``; no model needed.

        Each chunk column carries a CRC-32 of its data. With ``verify="on_read"`` (the default) a
        chunk is checked the first time any of its rows is read, so opening is instant and a cache
        that is only partly read is only partly checked (reading the data once more costs about as
        much as reading it); ``"on_load"`` checks every chunk now; ``"off"`` never checks. Caches
        written before checksums (format 1) load without checks. A folder recorded by several
        ranks opens as one cache once its recording finished (every rank's cache holds what its
        ``manifest.json`` claims); no process group is needed.

        Args:
            path: The folder given to :meth:`record`.
            verify: When to check the checksums: ``"on_read"``, ``"on_load"`` or ``"off"``.

        Returns:
            The cache, its files mapped lazily and read-only.

        Raises:
            ActivationCacheError: No folder at ``path``, not a tdsteer cache, damaged header, progress or
                manifest files, chunk files without the ``progress.json`` that claims their rows,
                truncated files, (now or on first read) data that fails its checksum, or a recording by
                several ranks that has not finished.

        Examples:
            >>> import tempfile, torch
            >>> model = torch.nn.Sequential(torch.nn.Identity())
            >>> path = tempfile.mkdtemp() + "/cache"
            >>> _ = ActivationCache.record(model, [{"inputs": torch.ones(2, 3), "labels": [0, 1]}], ["0"], path=path, progress=False)
            >>> ActivationCache.load(path, verify="on_load").labels.tolist()
            [0, 1]
        """
        return cls(open_store(Path(path), verify))

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
        distributed: bool | None = None,
        group: Any = None,
    ) -> ActivationCache:
        """Run ``model`` over ``batches`` once and keep what ``sites`` read.

        Args:
            model: The model; site paths are relative to it.
            batches: Contrastive batches (as for :func:`tdsteer.extract`), or labelled batches
                ``{inputs_key: inputs, label_key: LongTensor[B]}``. Iteration must be repeatable
                for a recording to resume.
            sites: Sites to record.
            path: Folder for a memory-mapped cache; ``None`` keeps it in memory. An existing cache
                there is resumed from the example it stopped at, with any batch size: the same
                model weights, sites, read position and dtype, and the same examples in the same
                order, or an error. While recording, the folder is locked against other processes.
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
            distributed: Record as one rank of several: every rank of ``group`` calls ``record``
                with its share of the data (e.g. batches of :func:`tdsteer.distributed.shard` of the
                examples; a share may be empty) and the same ``path``, and records into its own
                cache ``path/rank-RRRRR-of-NNNNN``, resumed on its own; rank 0 then writes
                ``path/manifest.json``. ``None`` (default): when a process group of several
                processes is initialised (``torchrun``). Only rank 0 shows a progress bar; a failure
                on any rank fails every rank with the same :class:`tdsteer.distributed.RankError`.
            group: ``torch.distributed`` group of the ranks (default: the whole world).

        Returns:
            The cache (reopen it later with :meth:`load`); under ``distributed``, every rank's rows.

        Raises:
            ActivationCacheError: ``path`` holds a cache with other settings, other data or
                another model's weights, or one written by format 1; another process is recording
                into ``path``; or there is not enough disk space. Under ``distributed``, on every
                rank, also: no ``path``, ``path`` recorded by another number of ranks or by one
                process, a rank with another model than rank 0, two ranks with the same examples.
        """
        plan = plan_recording(
            model,
            batches,
            sites,
            read=read,
            dtype=dtype,
            num_examples=num_examples,
            chunk_rows=chunk_rows,
            checkpoint_every=checkpoint_every,
            keys=keys or BatchKeys(),
            label_key=label_key,
            inputs_key=inputs_key,
            model_name=model_name,
            progress=progress,
            device=device,
        )
        store = record_store(plan, None if path is None else Path(path), distributed=distributed, group=group)
        return cls(store)

    def __len__(self) -> int:
        return self.rows

    @property
    def metadata(self) -> dict[str, Any]:
        """The recording's model, weights fingerprint, sites, read position, dtype, data fingerprint,
        tdsteer version, and ``data_order`` (the hash of the recorded examples in order); the model's
        ``model_hidden_size`` and ``base_model_path`` too, in caches recorded since they are kept."""
        metadata = {k: v for k, v in self.header.items() if k not in ("format", "format_version")}
        return {**metadata, "data_order": self.store.progress.data_order}

    def _column_name(self, name: str | Site) -> str:
        """A column's name (a :class:`~tdsteer.Site` names its key); an unknown one is a clear ``KeyError``."""
        key = name.key if isinstance(name, Site) else name
        if key not in self.store.columns:
            raise KeyError(f"No column {key!r}; the cache has sites {[s.key for s in self.sites]} and {ROW_FIELDS}")
        return key

    def column(self, name: str | Site, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of one column.

        Args:
            name: A site (or its key), or ``label``, ``pair``, ``index``, ``length``.
            start: First row.
            stop: Row after the last (default: the end).

        Returns:
            The rows (memory-mapped when they lie in one chunk of a cache on disk).

        Examples:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Identity())
            >>> cache = ActivationCache.record(model, [{"inputs": torch.ones(3, 2), "labels": [0, 1, 2]}], ["0"], progress=False)
            >>> cache.column("label", 1).tolist()
            [1, 2]
        """
        name = self._column_name(name)
        stop = self.rows if stop is None else min(stop, self.rows)
        parts = []
        for chunk, lo, hi in self.store.pieces(start, stop):
            parts.append(chunk.data[name][lo:hi])
        if not parts:
            column = self.store.columns[name]
            return torch.empty(column.shape(0), dtype=column.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def take(self, name: str | Site, rows: Tensor) -> Tensor:
        """Rows ``rows`` (indices) of a column, gathered chunk by chunk without copying whole columns.

        Args:
            name: A site (or its key) or a row field.
            rows: Row indices, in any order.

        Returns:
            A new tensor with one entry (or row of a site) per index.
        """
        name = self._column_name(name)
        column = self.store.columns[name]
        out = torch.empty(column.shape(len(rows)), dtype=column.dtype)
        for chunk_start, chunk in self.store.spans():
            inside = (rows >= chunk_start) & (rows < chunk_start + chunk.rows)
            if bool(inside.any()):
                out[inside] = chunk.data[name][rows[inside] - chunk_start]
        return out

    def data_index(self) -> Tensor:
        """Each row's example number in the data before :func:`tdsteer.distributed.shard` split it over
        the ranks that recorded the cache; the ``index`` column itself for a one-process cache.

        Rows are read back rank by rank (``index`` numbers the examples in that order); sorting by
        this index (stable, so each pair keeps its positive before its negative) gives the rows of a
        one-process recording of the same data, in its order. It assumes each rank recorded its
        ``shard`` of the examples (not of the batches): the cache holds no record of the split, and
        checks only that each rank holds as many examples as ``shard`` gives it.

        Returns:
            ``int64`` ``[rows]``.

        Raises:
            ActivationCacheError: The ranks hold other counts of examples than ``shard`` gives them.

        Examples:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Identity())
            >>> cache = ActivationCache.record(model, [{"inputs": torch.ones(3, 2), "labels": [0, 1, 2]}], ["0"], progress=False)
            >>> order = torch.argsort(cache.data_index(), stable=True)  # rows in data order
            >>> cache.take("label", order).tolist()
            [0, 1, 2]
        """
        return unshard(self.column("index"), self.store.rank_examples)

    def __getitem__(self, name: str) -> Tensor:
        return self.column(name)

    @property
    def labels(self) -> Tensor:
        """Label of every row (1 positive, 0 negative, or class ids)."""
        return self.column("label")

    def iter_batches(self, batch_size: int = 4096, sites: Sequence[SiteLike] | None = None) -> Iterator[TensorDict]:
        """Rows in order, ``batch_size`` at a time.

        Args:
            batch_size: Rows per batch (the last may have fewer).
            sites: Sites to include (default: all); the row fields always are.

        Returns:
            An iterator of TensorDicts of the sites and row fields.
        """
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
            A :class:`~tdsteer.SteeringVector` whose metadata records the cache's model and data (the
            model's hidden size and base-model path too, as :func:`tdsteer.extract` does, when the
            cache recorded them).

        Raises:
            ValueError: ``"actadd"``, which needs every token (the cache keeps one row per example), or no
                rows with the labels; an :class:`ActivationCacheError` when the cache holds no rows.
        """
        chosen = self.sites if sites is None else as_sites(sites)
        known = {s.key for s in self.sites}
        unknown = [s.key for s in chosen if s.key not in known]
        if unknown:
            raise KeyError(f"Sites {unknown} are not in the cache; it has {sorted(known)}")
        aggregators = {s.key: make_aggregator(method, **method_kwargs) for s in chosen}
        if any(isinstance(agg, ActAdd) for agg in aggregators.values()):
            raise ValueError(
                "method='actadd' needs every token, which an activation cache does not keep (one row per example); "
                "extract it from the model: tdsteer.extract(..., method='actadd', read='all')"
            )
        if self.rows == 0:
            raise ActivationCacheError(
                f"The cache at {str(self.path)!r} holds no rows: its recording stopped before its first checkpoint; "
                "resume it with ActivationCache.record(model, batches, sites, path=...) on the same data"
            )
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
            extra={
                "model_type": self.header.get("model_type"),
                # recorded since these fields were added to the header; None for older caches
                "model_hidden_size": self.header.get("model_hidden_size"),
                "base_model_path": self.header.get("base_model_path"),
                "source": "activation_cache",
            },
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
        training rows, projects the held-out rows on the direction, and scores the projections
        against the labels.

        Args:
            site: A cached site.
            method: Fitting method, as for :meth:`to_vector`.
            test_fraction: Share of the examples held out.
            seed: Seed of the split.
            positive_label: Label of the positive rows.
            negative_label: Label of the negative rows.

        Returns:
            The AUROC of the held-out projections (0.5: chance, 1.0: perfect separation).
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
        wanted = test & ((label == positive_label) | (label == negative_label))
        scores = []
        for start in range(0, self.rows, 4096):  # only the held-out rows, a block at a time
            stop = min(start + 4096, self.rows)
            keep = wanted[start:stop]
            if bool(keep.any()):
                scores.append(self.column(key, start, stop)[keep].double() @ direction)
        held_out = torch.cat(scores) if scores else torch.empty(0, dtype=torch.float64)
        held_label = label[wanted]
        return auroc(held_out[held_label == positive_label], held_out[held_label == negative_label])


def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of scores: probability a positive outscores a negative (ties count half).

    Computed from ranks (the Mann-Whitney U statistic, tied scores given their average rank): one
    sort, ``O(n log n)`` time and ``O(n)`` memory, exactly the share of (positive, negative) pairs
    where the positive scores higher, plus half the share of tied pairs.

    Args:
        positive: Scores of the positive examples.
        negative: Scores of the negative examples.

    Returns:
        The AUROC, from 0 to 1.

    Raises:
        ValueError: No positive or no negative score, or a NaN score (it ranks against nothing).

    Examples:
        >>> import torch
        >>> auroc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0]))
        0.875
    """
    positive, negative = positive.detach().flatten().cpu(), negative.detach().flatten().cpu()
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    scores = torch.cat([positive, negative])
    if scores.is_floating_point() and bool(scores.isnan().any()):
        raise ValueError("AUROC of NaN scores: a NaN ranks neither above nor below any score")
    ordered, order = torch.sort(scores, stable=True)
    _, counts = torch.unique_consecutive(ordered, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    doubled_rank = torch.repeat_interleave(2 * starts + counts + 1, counts)  # twice the average 1-based rank
    rank_sum = int(doubled_rank[order < n_pos].sum())  # twice the rank sum of the positives: exact in int64
    return (rank_sum - n_pos * (n_pos + 1)) / (2 * n_pos * n_neg)


def _row_mask(rows: Tensor, total: int) -> Tensor:
    mask = torch.zeros(total, dtype=torch.bool)
    mask[rows.to(torch.int64)] = True
    return mask
