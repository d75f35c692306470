"""Recording one cache with several ``torch.distributed`` ranks, and reading their caches as one.

Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``, once a process group is initialised) each rank records the batches it is given,
its share of the data (:func:`tdsteer.distributed.shard`), into its own one-process cache
``DIR/rank-RRRRR-of-NNNNN`` (see :mod:`~tdsteer.cache.manifest`): with its own lock, progress and
checksums, so each rank records and resumes independently and a killed rank resumes where it
stopped. The ranks agree at three points, so that a failure on one fails all of them with the same
message instead of leaving the others waiting: after checking the folder and taking their locks
(and that they record the same model with the same settings), after recording, and after rank 0
wrote ``manifest.json``. :class:`RankedStore` reads the ranks' caches as one: the rows of rank 0,
then those of rank 1 and on, with examples numbered in that order (rank order, not the order of the
data before it was split: the cache cannot tell how it was split; :func:`unshard` maps rank order
back to data order when the split was :func:`tdsteer.distributed.shard` of the examples).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tdsteer import distributed as parallel
from tdsteer.cache.files import EMPTY_HASH, HEADER, PROGRESS, Progress, recording_lock
from tdsteer.cache.manifest import (
    MANIFEST,
    SHARED_FIELDS,
    Manifest,
    RankPart,
    holds_only_rank_files,
    rank_folder,
    read_manifest,
    recorded_world_sizes,
    write_manifest,
)
from tdsteer.cache.recording import Plan, record_cache, record_locked
from tdsteer.cache.storage import CHUNK_PREFIX, CacheStore, Chunk, ChunkedRows, Verify, check_verify, columns_of
from tdsteer.errors import ActivationCacheError
from tdsteer.safe_io import remove_stale_temps, short_repr


class CacheRankError(parallel.RankError, ActivationCacheError):
    """One rank's recording was refused (an :class:`~tdsteer.cache.ActivationCacheError` there): every
    rank raises this, a :class:`~tdsteer.distributed.RankError` and an ``ActivationCacheError``."""


KEEP: dict[type[BaseException], type[parallel.RankError]] = {ActivationCacheError: CacheRankError}


def record_store(plan: Plan, path: Path | None, *, distributed: bool | None, group: Any) -> CacheStore | RankedStore:
    """Record ``plan`` in this process alone, or as one rank of a recording by several (``distributed``;
    ``None``: when a process group of several processes is initialised)."""
    if distributed is None:
        distributed = parallel.active(group)
    return record_ranks(plan, path, group) if distributed else record_cache(plan, path)


def record_ranks(plan: Plan, path: Path | None, group: Any) -> RankedStore:
    """Record ``plan`` (this rank's share of the data) into this rank's cache under ``path``, and the
    manifest once every rank finished; a collective: every rank of ``group`` calls it."""
    rank, world = parallel.rank_and_size(group)
    settings = plan.settings._replace(progress=plan.settings.progress and rank == 0)
    plan = plan._replace(settings=settings)
    failure: BaseException | None = None
    folder = Path(path or ".") / rank_folder(rank, world)
    with ExitStack() as locks:
        try:
            if path is None:
                raise ActivationCacheError(
                    f"Recording a cache across {world} processes needs a path, a folder that every rank reaches "
                    "(on several machines, a shared filesystem); pass path=..., or distributed=False to keep one "
                    "in-memory cache per rank"
                )
            check_folder(path, plan.header, world)
            locks.enter_context(recording_lock(folder))
            if rank == 0:  # rank 0's lock also guards the manifest
                remove_stale_temps(path, (MANIFEST,))
        except Exception as error:  # noqa: BLE001 - shared with every rank, then raised on all of them
            failure = error
        parallel.agree(failure, group, keep=KEEP)
        assert path is not None
        check_same_model(parallel.gather({name: plan.header[name] for name in SHARED_FIELDS}, group), path)
        store: CacheStore | None = None
        try:
            store = record_locked(plan, folder, allow_empty=True)
        except Exception as error:  # noqa: BLE001 - as above
            failure = error
        parallel.agree(failure, group, keep=KEEP)
        mine = RankPart(0, 0, EMPTY_HASH)
        if store is not None:
            mine = part_of(store)
        manifest = manifest_of(parallel.gather((mine, None if store is None else store.header), group), path)
        if rank == 0:
            try:
                RankedStore(manifest, path, verify="off")  # rank 0 sees every rank's cache as claimed
                write_manifest(path, manifest)
            except Exception as error:  # noqa: BLE001 - as above
                failure = error
        parallel.agree(failure, group, keep=KEEP)
    result: RankedStore | None = None
    try:
        result = RankedStore.open(path)
    except Exception as error:  # noqa: BLE001 - as above
        failure = error
    parallel.agree(failure, group, keep=KEEP)
    assert result is not None
    return result


def check_folder(path: Path, header: dict[str, Any], world: int) -> None:
    """Refuse to record with ``world`` ranks into ``path`` unless it is empty or a recording by as many
    ranks with the same model and settings."""
    if path.exists() and not path.is_dir():
        raise ActivationCacheError(f"{str(path)!r} is a file, not a folder; choose a folder for the cache")
    if (path / HEADER).is_file():
        raise ActivationCacheError(
            f"{str(path)!r} holds a cache recorded by one process; resume it in one process (without torchrun), "
            "or record to another path"
        )
    if not holds_only_rank_files(path):
        raise ActivationCacheError(f"{str(path)!r} exists and is not an activation cache; choose an empty folder")
    others = [size for size in recorded_world_sizes(path) if size != world]
    if others:
        raise ActivationCacheError(
            f"{str(path)!r} holds a cache recorded by {others[0]} ranks, and this recording has {world}: the "
            f"ranks' shares of the data would differ; resume it with {others[0]} processes, or record to another path"
        )
    if (path / MANIFEST).is_file():
        recorded = read_manifest(path).header
        for name in SHARED_FIELDS:
            if recorded.get(name) != header.get(name):
                raise ActivationCacheError(
                    f"The cache at {str(path)!r} was recorded with {name}={short_repr(recorded.get(name))}, not "
                    f"{short_repr(header.get(name))}: appending would mix two models' or settings' activations; "
                    "record to another path"
                )


def check_same_model(facts: list[dict[str, Any]], path: Path) -> None:
    """Refuse (on every rank alike) ranks that record another model or with other settings than rank 0."""
    for rank, mine in enumerate(facts):
        for name in SHARED_FIELDS:
            if mine[name] == facts[0][name]:
                continue
            what = "a model with other weights" if name == "weights_fingerprint" else f"{name}={short_repr(mine[name])}"
            raise ActivationCacheError(
                f"Rank {rank} of {len(facts)} records {what} into {str(path)!r}, rank 0 "
                f"{short_repr(facts[0][name])}: every rank must record the same model with the same settings "
                "into one cache"
            )


def manifest_of(parts: list[tuple[RankPart, dict[str, Any] | None]], path: Path) -> Manifest:
    """The manifest of what every rank recorded (the same on every rank); refuses an empty recording,
    ranks that read other hidden sizes, and ranks that recorded the same examples."""
    recorded = [(rank, part, header) for rank, (part, header) in enumerate(parts) if part.examples and header]
    if not recorded:
        raise ValueError("No batches to record: every rank's shard of the data is empty")
    first_rank, _, first = recorded[0]
    seen: dict[str, int] = {}
    for rank, part, header in recorded:
        if header["hidden_sizes"] != first["hidden_sizes"]:
            raise ActivationCacheError(
                f"Rank {rank} read hidden sizes {header['hidden_sizes']} into {str(path)!r}, rank {first_rank} "
                f"{first['hidden_sizes']}: every rank must record the same model"
            )
        if part.data_order in seen:
            raise ActivationCacheError(
                f"Ranks {seen[part.data_order]} and {rank} recorded the same examples into {str(path)!r}: give "
                "each rank its share of the data, tdsteer.distributed.shard(examples); delete the folder and "
                "record again"
            )
        seen[part.data_order] = rank
    fingerprints = [header.get("data_fingerprint") for _, _, header in recorded]
    data_fingerprint = None
    if any(f is not None for f in fingerprints):
        data_fingerprint = hashlib.sha256(";".join(map(str, fingerprints)).encode()).hexdigest()
    shared = {**first, "data_fingerprint": data_fingerprint}
    return Manifest(len(parts), shared, tuple(part for part, _ in parts))


def part_of(store: CacheStore) -> RankPart:
    """What one rank's cache holds, as the manifest records it."""
    return RankPart(store.rows, store.progress.examples, store.progress.data_order)


class RankedStore(ChunkedRows):
    """The caches of every rank of a recording, read as one cache (read-only).

    Rows are those of rank 0, then of rank 1 and on; ``index`` and ``pair`` number the examples in
    that order (rank ``r``'s example ``i`` is example ``i`` plus the examples of the ranks before),
    not in the order of the data before it was split (see :func:`unshard`).
    Opening checks that every rank's cache holds what the manifest claims, so a recording that is
    still running, was killed, or was appended to since is refused rather than read half-way.

    Args:
        manifest: The checked manifest.
        path: The cache folder.
        verify: When to check each rank's chunks, as for :meth:`~tdsteer.cache.ActivationCache.load`.
    """

    def __init__(self, manifest: Manifest, path: Path, verify: Verify = "on_read") -> None:
        self.manifest = manifest
        self.path: Path | None = path
        self.header = {**manifest.header, "world_size": manifest.world_size}
        self.columns = {c.name: c for c in columns_of(manifest.header)}
        self.parts: list[CacheStore] = []
        offset = 0
        for rank, claimed in enumerate(manifest.parts):
            folder = manifest.folder(path, rank)
            if not (folder / HEADER).is_file():
                if claimed == RankPart(0, 0, EMPTY_HASH):  # a rank whose share was empty
                    continue
                raise ActivationCacheError(
                    f"Rank {rank}'s cache of {str(path)!r} is not at {str(folder)!r}: every rank must record into "
                    "the same folder (on several machines, on a filesystem that all of them reach)"
                )
            store = CacheStore.open(folder, verify=verify)
            self._check(rank, store, claimed)
            for chunk in store.chunks:
                chunk.offset = offset
            offset += claimed.examples
            self.parts.append(store)
        self.chunks: list[Chunk] = [chunk for store in self.parts for chunk in store.chunks]
        orders = hashlib.sha256(f"{manifest.world_size} ranks;".encode())
        for part in manifest.parts:
            orders.update(f"{part.examples}:{part.data_order};".encode())
        self.progress = Progress(sum(store.rows for store in self.parts), offset, orders.hexdigest())

    @property
    def rank_examples(self) -> tuple[int, ...]:
        """Examples recorded by each rank, in rank order (``0`` for a rank whose share was empty)."""
        return tuple(part.examples for part in self.manifest.parts)

    @classmethod
    def open(cls, path: Path, verify: Verify = "on_read") -> RankedStore:
        """The cache recorded by several ranks at ``path``."""
        return cls(read_manifest(path), path, verify)

    def _check(self, rank: int, store: CacheStore, claimed: RankPart) -> None:
        folder, header = store.path, self.manifest.header
        for name in (*SHARED_FIELDS, "hidden_sizes"):
            if store.header.get(name) != header.get(name):
                raise ActivationCacheError(
                    f"Rank {rank}'s cache at {str(folder)!r} was recorded with {name}="
                    f"{short_repr(store.header.get(name))}, the manifest of {str(self.path)!r} says "
                    f"{short_repr(header.get(name))}: the folder mixes two recordings; record it again"
                )
        held = part_of(store)
        if held != claimed:
            world = self.manifest.world_size
            raise ActivationCacheError(
                f"The cache at {str(self.path)!r} is being recorded, or its last recording was not finished: rank "
                f"{rank}'s cache at {str(folder)!r} holds {held.examples} examples ({held.rows} rows), the manifest "
                f"{claimed.examples} ({claimed.rows} rows){' of other data' if held.rows == claimed.rows else ''}; "
                f"rerun the recording with {world} processes (torchrun) to finish it, or load one rank's cache alone"
            )


def unshard(index: Tensor, rank_examples: Sequence[int]) -> Tensor:
    """Where examples numbered in rank order were in the data that :func:`tdsteer.distributed.shard`
    split over the ranks (rank ``r`` got every ``world``-th example from ``r`` on).

    Args:
        index: Example numbers in rank order (the cache's ``index`` column): the examples of rank 0,
            then those of rank 1 and on.
        rank_examples: How many examples each rank recorded.

    Returns:
        The position of each example in the data before it was split (``int64``, the shape of ``index``).

    Raises:
        ActivationCacheError: The ranks' counts are not the shares ``shard`` gives: the data was split
            another way, and its order cannot be rebuilt.

    Examples:
        >>> unshard(torch.arange(5), [3, 2])  # shard(range(5)) over 2 ranks: [0, 2, 4] and [1, 3]
        tensor([0, 2, 4, 1, 3])
    """
    world, total = len(rank_examples), sum(rank_examples)
    shares = [len(range(rank, total, world)) for rank in range(world)]
    if list(rank_examples) != shares:
        raise ActivationCacheError(
            f"The {world} ranks of this cache recorded {list(rank_examples)} examples, not the shares "
            f"tdsteer.distributed.shard gives {total} examples over {world} ranks ({shares}): the data was split "
            "another way and its order cannot be rebuilt; number the examples in rank order (the 'index' column)"
        )
    firsts = torch.tensor([0, *itertools.accumulate(rank_examples)][:-1], dtype=torch.int64)
    rank = torch.searchsorted(firsts, index.to(torch.int64), right=True) - 1
    return rank + world * (index - firsts[rank])


def open_store(path: Path, verify: Verify) -> CacheStore | RankedStore:
    """The cache at ``path``: recorded by one process, or by several ranks (with a manifest).

    Refuses a missing folder, and a one-process cache whose chunk folders lack the ``progress.json``
    that claims their rows (it would load with no rows).
    """
    check_verify(verify)
    if not path.exists():
        raise ActivationCacheError(f"The folder {str(path)!r} does not exist: there is no activation cache there")
    if not path.is_dir():
        raise ActivationCacheError(f"{str(path)!r} is a file, not an activation cache (a cache is a folder)")
    if (path / MANIFEST).is_file():
        return RankedStore.open(path, verify)
    if not (path / HEADER).is_file():
        sizes = recorded_world_sizes(path)
        if sizes:
            raise ActivationCacheError(
                f"{str(path)!r} holds a recording by {sizes[-1]} ranks that has not finished (no {MANIFEST} yet): "
                f"rerun it with {sizes[-1]} processes (torchrun) to finish it; each rank's cache loads alone, "
                f"e.g. {str(path / rank_folder(0, sizes[-1]))!r}"
            )
    if (path / HEADER).is_file() and not (path / PROGRESS).exists() and any(path.glob(f"{CHUNK_PREFIX}*")):
        raise ActivationCacheError(
            f"The cache at {str(path)!r} holds no checkpointed rows: its {PROGRESS}, the record of which rows the "
            "chunk files hold, is missing, so none of them can be trusted; record it again, or resume it with "
            "ActivationCache.record(model, batches, sites, path=...) on the same data (it records every example anew)"
        )
    return CacheStore.open(path, verify=verify)
