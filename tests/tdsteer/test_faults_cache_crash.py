"""A recording that crashes at any write leaves a cache that loads and resumes to the same rows.

Issue 12: a crash between trimming the last chunk and saving the progress file left a cache that
neither loaded nor resumed. Here every write a recording makes (``pwrite``, ``ftruncate``,
``truncate``, ``fsync``, ``replace``, ``mkdir``) fails in turn, and after each failure the folder must
load (or be a recording that has not claimed any row yet) and resume to the uninterrupted result.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from tdsteer import ActivationCache
from tdsteer.cache import storage

WRITES = ("pwrite", "ftruncate", "truncate", "fsync", "replace", "mkdir")


class Crash(BaseException):
    """A crash at a write: a BaseException, so that nothing in the library can swallow it."""


class WriteCounter:
    """Counts the writes of ``os`` (every call of a name in ``WRITES``) and fails the ``fail_at``-th one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at
        for name in WRITES:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, original):
        def write(*args, **kwargs):
            self.calls.append(name)
            if self.fail_at is not None and len(self.calls) == self.fail_at:
                raise Crash(f"crash at write {self.fail_at} ({name})")
            if name == "fsync":  # counted, not done: these tests crash the process, not the machine
                return None
            return original(*args, **kwargs)

        return write


def make_data(n: int = 10) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"positive": torch.randn(3, 5, generator=generator) + 1, "negative": torch.randn(3, 5, generator=generator)}
        for _ in range(n // 3)
    ] + [
        {"positive": torch.randn(n % 3, 5, generator=generator), "negative": torch.randn(n % 3, 5, generator=generator)}
    ]
    return model, batches


def record(model, batches, path: Path, **kwargs) -> ActivationCache:
    return ActivationCache.record(model, batches, ["0", "2"], path=path, progress=False, checkpoint_every=0, **kwargs)


def assert_prefix_of(cache: ActivationCache, reference: ActivationCache) -> None:
    for key in ["0", "2", "label", "pair", "index", "length"]:
        assert torch.equal(cache[key], reference[key][: len(cache)]), key


@pytest.mark.parametrize("layout", [{"chunk_rows": 4}, {"num_examples": 10}])
def test_a_crash_at_every_write_leaves_a_cache_that_loads_and_resumes(tmp_path, monkeypatch, layout):
    model, batches = make_data()
    reference = record(model, batches, tmp_path / "reference", **layout)
    with monkeypatch.context() as patch:
        counter = WriteCounter(patch)
        record(model, batches, tmp_path / "counted", **layout)
    assert {"pwrite", "ftruncate", "fsync", "replace", "mkdir"} <= set(counter.calls)
    assert ("truncate" in counter.calls) == ("chunk_rows" in layout)  # a grown cache cuts its last chunk
    print(f"{len(counter.calls)} writes: {' '.join(counter.calls)}")
    for fail_at in range(1, len(counter.calls) + 1):
        path = tmp_path / f"crash-{fail_at}"
        with monkeypatch.context() as patch:
            WriteCounter(patch, fail_at)
            with pytest.raises(Crash):
                record(model, batches, path, **layout)
        assert not [p for p in path.rglob("*.tmp")], "a failed write left its temporary file"
        if (path / "cache.json").exists():
            partial = ActivationCache.load(path, verify="on_load")
            assert_prefix_of(partial, reference)
        resumed = record(model, batches, path, **layout)
        assert len(resumed) == len(reference), fail_at
        assert_prefix_of(ActivationCache.load(path, verify="on_load"), reference)
        assert all(
            p.stat().st_size == (tmp_path / "reference" / p.relative_to(path)).stat().st_size
            for p in path.rglob("*.bin")
        ), f"files not cut to their rows after a crash at write {fail_at} ({counter.calls[fail_at - 1]})"


def test_a_crash_between_claiming_and_cutting_the_last_chunk(tmp_path, monkeypatch):
    """The case of the issue, named: the files are longer than claimed, and that loads and resumes."""
    model, batches = make_data(13)

    def crash(self):
        raise Crash("killed after progress.json claimed the trimmed rows")

    monkeypatch.setattr(storage.Chunk, "cut_files", crash)
    with pytest.raises(Crash):
        record(model, batches[:3], tmp_path / "c", chunk_rows=32)
    monkeypatch.undo()
    longer = tmp_path / "c" / "chunk-00000" / "0.bin"
    assert longer.stat().st_size == 32 * 5 * 4  # the unfilled tail is still there
    loaded = ActivationCache.load(tmp_path / "c", verify="on_load")
    assert len(loaded) == 18
    resumed = record(model, batches, tmp_path / "c", chunk_rows=32)
    assert len(resumed) == 26 and longer.stat().st_size == 18 * 5 * 4
    assert_prefix_of(resumed, record(model, batches, tmp_path / "reference", chunk_rows=32))


def test_leftovers_of_a_killed_writer_are_cleaned_and_unrelated_files_kept(tmp_path):
    model, batches = make_data()
    path = tmp_path / "c"
    record(model, batches[:2], path)
    stale = path / ".progress.json.0123456789ab.tmp"
    stale.write_text("half a progress file")
    unrelated = path / "progress.json.tmp"  # the name the old code overwrote: not ours
    unrelated.write_text("someone's notes")
    resumed = record(model, batches, path)
    assert len(resumed) == 20 and not stale.exists() and unrelated.read_text() == "someone's notes"


def test_a_full_disk_is_a_clear_error_and_the_recording_resumes(tmp_path, monkeypatch):
    model, batches = make_data()
    original = os.pwrite
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(Exception, match="Disk full while writing the cache"):
        record(model, batches, tmp_path / "c")
    monkeypatch.undo()
    assert len(record(model, batches, tmp_path / "c")) == 20
