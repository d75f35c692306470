"""An activation cache recorded by two torch.distributed processes (gloo, CPU) opens as one cache.

Two spawns of two processes: the first kills rank 1 in the middle of a recording; the second records
(odd counts, fewer examples than ranks), resumes the killed recording, fails one rank and resumes,
and tries the recordings that must be refused. The test process then loads every cache without a
process group and compares it with one-process recordings.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tdsteer
from tdsteer import ActivationCache, ActivationCacheError
from tdsteer.cache.manifest import write_manifest
from tdsteer.cache.ranks import manifest_of, part_of, unshard
from tdsteer.cache.storage import CacheStore

SITES = ["0", "2"]
METHODS = ("mean_diff", "pca_diff", "probe")
COUNTS = (9, 1)  # odd, and fewer examples than ranks
KILLED_AFTER = 1  # batches rank 1 records before it is killed
Batch = dict[str, torch.Tensor]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))


def _examples(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(count + 100 * seed)
    return [(torch.randn(6, generator=generator) + 1, torch.randn(6, generator=generator)) for _ in range(count)]


def _batches(examples: list[tuple[torch.Tensor, torch.Tensor]], size: int = 2) -> list[Batch]:
    return [
        {"positive": torch.stack([p for p, _ in part]), "negative": torch.stack([n for _, n in part])}
        for part in (examples[i : i + size] for i in range(0, len(examples), size))
    ]


def _dying(batches: list[Batch], after: int) -> Iterator[Batch]:
    """The batches, until this process is killed (no clean-up, no exception) before batch ``after``."""
    for i, batch in enumerate(batches):
        if i == after:
            os._exit(3)
        yield batch


def _failing(batches: list[Batch], after: int) -> Iterator[Batch]:
    for i, batch in enumerate(batches):
        if i == after:
            raise RuntimeError("injected failure")
        yield batch


def _record(path: Path, examples: Any, *, model: torch.nn.Module | None = None, wrap: Any = None) -> ActivationCache:
    """This rank's share of ``examples``, recorded into ``path`` (a process group is active: no flag)."""
    batches = _batches(tdsteer.distributed.shard(examples))
    return ActivationCache.record(
        model or _model(),
        wrap(batches) if wrap else batches,
        SITES,
        path=path,
        progress=False,
        checkpoint_every=0,
        chunk_rows=3,
    )


def _refused(name: str, root: Path, rank: int, call: Any) -> None:
    """Run ``call``, which must fail; write the exception's kinds and message for the test process."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - what every rank raised is compared by the test
        kinds = [
            cls.__name__ for cls in (ActivationCacheError, tdsteer.distributed.RankError) if isinstance(error, cls)
        ]
        (root / f"{name}-{rank}.txt").write_text(f"{','.join(kinds)}|{error}")
    else:
        (root / f"{name}-{rank}.txt").write_text("|not refused")


def _worker(rank: int, world: int, port: int, root_name: str, scenario: str) -> None:
    root = Path(root_name)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    with tdsteer.distributed.process_group(timeout_s=60):
        if scenario == "kill":
            _record(root / "killed", _examples(9), wrap=(lambda b: _dying(b, KILLED_AFTER)) if rank == 1 else None)
            return
        for count in COUNTS:
            cache = _record(root / f"full-{count}", _examples(count))
            (root / f"full-{count}-{rank}.txt").write_text(f"{len(cache)} {cache.metadata['world_size']}")
        _record(root / "killed", _examples(9))  # resumes each rank's cache
        failing = (lambda b: _failing(b, 1)) if rank == 1 else None
        _refused("failed", root, rank, lambda: _record(root / "failed", _examples(9), wrap=failing))
        _record(root / "failed", _examples(9))
        # refused: rank 1 with other data than its cache holds; a cache by 3 ranks; a one-process
        # cache; rank 1 with another model
        _refused("other-data", root, rank, lambda: _record(root / "full-9", _examples(9, seed=rank)))
        _refused("three", root, rank, lambda: _record(root / "three", _examples(9)))
        _refused("single", root, rank, lambda: _record(root / "single", _examples(9)))
        _refused("models", root, rank, lambda: _record(root / "models", _examples(9), model=_model(seed=rank)))


def _spawn(root: Path, scenario: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_worker, args=(2, port, str(root), scenario), nprocs=2, join=True)


def _one_process(count: int) -> ActivationCache:
    return ActivationCache.record(_model(), _batches(_examples(count)), SITES, progress=False)


def _assert_same_cache(found: ActivationCache, expected: ActivationCache, count: int, world: int = 2) -> None:
    """``found`` (rank 0's rows, then rank 1's...) holds the rows of ``expected`` (one process), and fits the
    same vectors."""
    assert len(found) == len(expected) == 2 * count and found.examples == count
    example = found["index"]
    original = torch.cat([torch.arange(rank, count, world) for rank in range(world)])[example]  # shard's order
    rows = original * 2 + (1 - found.labels)  # a pair's positive, then its negative
    for name in [*SITES, "label"]:
        torch.testing.assert_close(found[name], expected[name][rows], atol=1e-6, rtol=1e-6)
    assert found["pair"].tolist() == example.tolist()
    # rank order is not data order; data_index puts the rows back in the one-process order
    order = torch.argsort(found.data_index(), stable=True)
    assert found.data_index()[order].tolist() == expected["index"].tolist()
    for name in [*SITES, "label"]:
        torch.testing.assert_close(found.take(name, order), expected[name], atol=1e-6, rtol=1e-6)
    for method in METHODS if count > 1 else ("mean_diff", "probe"):
        for site in SITES:
            torch.testing.assert_close(
                found.to_vector(method)[site], expected.to_vector(method)[site], atol=1e-6, rtol=1e-6, msg=method
            )


def _messages(root: Path, name: str) -> set[str]:
    return {(root / f"{name}-{rank}.txt").read_text() for rank in range(2)}


@pytest.mark.slow
def test_a_two_rank_recording_opens_as_one_cache_and_resumes_per_rank(tmp_path: Path) -> None:
    (tmp_path / "three" / "rank-00000-of-00003").mkdir(parents=True)
    ActivationCache.record(_model(), _batches(_examples(2)), SITES, path=tmp_path / "single", progress=False)

    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _spawn(tmp_path, "kill")
    with pytest.raises(ActivationCacheError, match="has not finished"):
        ActivationCache.load(tmp_path / "killed")
    assert ActivationCache.load(tmp_path / "killed" / "rank-00001-of-00002").examples == 2 * KILLED_AFTER

    _spawn(tmp_path, "record")
    assert not dist.is_initialized()  # loading needs no process group
    for count in COUNTS:
        assert _messages(tmp_path, f"full-{count}") == {f"{2 * count} 2"}  # every rank got the whole cache
        cache = ActivationCache.load(tmp_path / f"full-{count}", verify="on_load")
        assert cache.metadata["world_size"] == 2 and len(cache.chunks) == (5 if count == 9 else 1)
        _assert_same_cache(cache, _one_process(count), count)
    cache = ActivationCache.load(tmp_path / "full-9")
    assert torch.equal(torch.cat([b["2"] for b in cache.iter_batches(batch_size=5)]), cache["2"])
    picked = torch.tensor([17, 0, 9, 10, 3])  # across chunks and ranks
    assert torch.equal(cache.take("0", picked), cache["0"][picked])
    assert torch.equal(cache.column("index", 8, 12), cache["index"][8:12])
    assert 0.5 <= cache.probe_auroc("2", test_fraction=0.4) <= 1.0

    # a killed rank, and a rank that failed, resume to the uninterrupted cache, rank by rank
    for name in ("killed", "failed"):
        _assert_same_cache(ActivationCache.load(tmp_path / name), _one_process(9), 9)
        for rank in range(2):
            part = f"rank-{rank:05d}-of-00002"
            found, expected = (ActivationCache.load(tmp_path / folder / part) for folder in (name, "full-9"))
            for column in [*SITES, "label", "pair", "index", "length"]:
                assert torch.equal(found[column], expected[column]), (name, rank, column)
    assert _messages(tmp_path, "failed") == {"RankError|rank 1 of 2 failed: injected failure"}

    # refused on every rank alike, naming why
    [other_data] = _messages(tmp_path, "other-data")
    assert other_data.startswith("ActivationCacheError,RankError|rank 1 of 2 failed: The data differs")
    assert _messages(tmp_path, "three") == {
        f"ActivationCacheError,RankError|rank 0 of 2 failed: {str(tmp_path / 'three')!r} holds a cache recorded by "
        "3 ranks, and this recording has 2: the ranks' shares of the data would differ; resume it with 3 processes, "
        "or record to another path"
    }
    [single] = _messages(tmp_path, "single")
    assert (
        single.startswith("ActivationCacheError,RankError|rank 0 of 2 failed") and "recorded by one process" in single
    )
    [models] = _messages(tmp_path, "models")
    assert models.startswith("ActivationCacheError|Rank 1 of 2 records a model with other weights")
    _assert_same_cache(ActivationCache.load(tmp_path / "full-9"), _one_process(9), 9)  # still as it was

    # in one process: a recording by 2 ranks is not resumed, and one rank's cache appended to since
    # the manifest is an unfinished recording
    with pytest.raises(ActivationCacheError, match="recorded by 2 ranks"):
        ActivationCache.record(_model(), _batches(_examples(9)), SITES, path=tmp_path / "full-9", progress=False)
    shutil.copytree(tmp_path / "full-9", tmp_path / "appended")
    rank_1 = _examples(9)[1::2] + _examples(1, seed=5)  # rank 1's share and one more example
    part = tmp_path / "appended" / "rank-00001-of-00002"
    assert ActivationCache.record(_model(), _batches(rank_1), SITES, path=part, progress=False).examples == 5
    with pytest.raises(ActivationCacheError, match="not finished: rank 1's cache .* holds 5 examples"):
        ActivationCache.load(tmp_path / "appended")


def test_a_damaged_or_incomplete_manifest_is_refused(tmp_path: Path) -> None:
    """A recording by ranks made in this process (``distributed=True`` without a group: one rank)."""
    path = tmp_path / "c"
    batches = _batches(_examples(3))
    recorded = ActivationCache.record(_model(), batches, SITES, path=path, progress=False, distributed=True)
    assert recorded.metadata["world_size"] == 1 and len(recorded) == 6
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank-00000-of-00001"]
    _assert_same_cache(ActivationCache.load(path), _one_process(3), 3, world=1)
    manifest = (path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="verify must be one of"):
        ActivationCache.load(path, verify="never")  # type: ignore[arg-type]
    for damaged in (manifest.replace(b'"world_size": 1', b'"world_size": 2'), manifest[:-9], b"[]"):
        (path / "manifest.json").write_bytes(damaged)
        with pytest.raises(ActivationCacheError, match="manifest"):
            ActivationCache.load(path)
    (path / "manifest.json").write_bytes(manifest)
    shutil.rmtree(path / "rank-00000-of-00001")
    with pytest.raises(ActivationCacheError, match="every rank must record into the same folder"):
        ActivationCache.load(path)
    # without a manifest, rank folders are an unfinished recording; a second recording into a rank's
    # folder is refused by that rank's lock
    ActivationCache.record(_model(), batches, SITES, path=path, progress=False, distributed=True)
    (path / "manifest.json").unlink()
    with pytest.raises(ActivationCacheError, match="has not finished"):
        ActivationCache.load(path)
    from tdsteer.cache.files import recording_lock  # the lock a running rank holds

    with recording_lock(path / "rank-00000-of-00001"), pytest.raises(ActivationCacheError, match="another process"):
        ActivationCache.record(_model(), batches, SITES, path=path, progress=False, distributed=True)


@pytest.mark.parametrize(("count", "world"), [(9, 2), (10, 3), (2, 4), (0, 2), (7, 1)])
def test_unshard_inverts_shard(count: int, world: int) -> None:
    """Example numbers in rank order (each rank's ``shard`` of the data, rank after rank) map back to
    the data's order."""
    shares = [list(range(count))[rank::world] for rank in range(world)]  # what shard gives each rank
    in_rank_order = [example for share in shares for example in share]
    found = unshard(torch.arange(count), [len(share) for share in shares])
    assert found.tolist() == in_rank_order and found.dtype == torch.int64


def _ranks_by_hand(path: Path, shares: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> ActivationCache:
    """A recording by ``len(shares)`` ranks made in this process: each rank's cache recorded alone, then
    the manifest rank 0 writes."""
    world, stores = len(shares), []
    for rank, share in enumerate(shares):
        folder = path / f"rank-{rank:05d}-of-{world:05d}"
        ActivationCache.record(_model(), _batches(share), SITES, path=folder, progress=False, chunk_rows=3)
        stores.append(CacheStore.open(folder))
    write_manifest(path, manifest_of([(part_of(store), store.header) for store in stores], path))
    return ActivationCache.load(path)


def test_rows_come_in_rank_order_and_data_index_gives_the_data_order(tmp_path: Path) -> None:
    examples = _examples(7)
    cache = _ranks_by_hand(tmp_path / "c", [examples[rank::3] for rank in range(3)])
    expected = _one_process(7)
    assert cache["index"].tolist() == expected["index"].tolist()  # numbered 0..6 in rank order...
    with pytest.raises(AssertionError):  # ...so the rows are not those of the one-process recording
        torch.testing.assert_close(cache["0"], expected["0"])
    _assert_same_cache(cache, expected, 7, world=3)
    # split another way (the first 5 examples, then 2): shard's shares would be 4 and 3
    split = _ranks_by_hand(tmp_path / "blocks", [examples[:5], examples[5:]])
    assert len(split) == 14 and split.metadata["world_size"] == 2  # reads fine, in rank order
    with pytest.raises(ActivationCacheError, match=r"recorded \[5, 2\] examples, not the shares .* \(\[4, 3\]\)"):
        split.data_index()
