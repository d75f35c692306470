"""Two processes recording into one cache folder: one records, the other is refused, no row is lost.

Issue 12: with no lock, the second process crashed on the progress file, and chunk files opened
with truncation let two writers wipe each other's rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tdsteer import ActivationCache, ActivationCacheError

WRITER = textwrap.dedent(
    """
    import sys, time, pathlib, torch
    from tdsteer import ActivationCache, ActivationCacheError

    path, marker, go = map(pathlib.Path, sys.argv[1:4])
    pause = float(sys.argv[4])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()

    def batches():
        generator = torch.Generator().manual_seed(0)
        for i in range(6):
            yield {"positive": torch.randn(2, 4, generator=generator), "negative": torch.randn(2, 4, generator=generator)}
            time.sleep(pause)
            if i == 1:  # two batches recorded and claimed: say so, then wait to be let go
                marker.write_text("started")
                deadline = time.monotonic() + 60
                while not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)

    try:
        ActivationCache.record(model, batches(), ["0"], path=path, progress=False, checkpoint_every=0, chunk_rows=4)
    except ActivationCacheError as error:
        print(error)
        sys.exit(3)
    """
)


def reference(tmp_path: Path) -> ActivationCache:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"positive": torch.randn(2, 4, generator=generator), "negative": torch.randn(2, 4, generator=generator)}
        for _ in range(6)
    ]
    return ActivationCache.record(model, batches, ["0"], progress=False)


def writer(path: Path, marker: Path, go: Path, pause: float = 0.0) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", WRITER, str(path), str(marker), str(go), str(pause)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_equal_caches(cache: ActivationCache, expected: ActivationCache) -> None:
    assert len(cache) == len(expected) == 24
    for key in ["0", "label", "pair", "index", "length"]:
        assert torch.equal(cache[key], expected[key]), key


def test_a_second_process_is_refused_while_the_first_records(tmp_path):
    path, marker, go = tmp_path / "c", tmp_path / "started", tmp_path / "go"
    first = writer(path, marker, go)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first writer never started"
            time.sleep(0.02)
        progress = (path / "progress.json").read_bytes()
        chunks = {p: p.read_bytes() for p in path.rglob("*.bin")}
        model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
        batches = [{"positive": torch.randn(2, 4), "negative": torch.randn(2, 4)}]
        with pytest.raises(ActivationCacheError, match=rf"being recorded by another process \(pid {first.pid}\)"):
            ActivationCache.record(model, batches, ["0"], path=path, progress=False)
        assert (path / "progress.json").read_bytes() == progress  # the refused writer touched nothing
        assert all(p.read_bytes() == data for p, data in chunks.items())
        assert ActivationCache.load(path).examples == 4  # reading while another process records is fine
    finally:
        go.write_text("go")
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert_equal_caches(ActivationCache.load(path, verify="on_load"), reference(tmp_path))


@pytest.mark.slow
def test_two_processes_started_together_leave_one_complete_cache(tmp_path):
    """Whichever order they take the lock in, the rows of neither are lost or wiped."""
    path, go = tmp_path / "c", tmp_path / "go"
    go.write_text("go")  # nobody waits; each batch takes 0.2 s, so the two often overlap
    processes = [writer(path, tmp_path / f"started-{i}", go, pause=0.2) for i in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    for code, out, err in results:
        assert code == 0 or (code == 3 and "being recorded by another process" in out), (code, out, err)
    assert any(code == 0 for code, _, _ in results)
    assert_equal_caches(ActivationCache.load(path, verify="on_load"), reference(tmp_path))


def test_a_nested_recording_into_the_same_folder_is_refused_and_the_lock_is_released(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    path = tmp_path / "c"
    batch = {"positive": torch.randn(2, 4), "negative": torch.randn(2, 4)}

    def batches():
        yield batch
        ActivationCache.record(model, [batch], ["0"], path=path, progress=False)

    with pytest.raises(ActivationCacheError, match=rf"another process \(pid {os.getpid()}\)"):
        ActivationCache.record(model, batches(), ["0"], path=path, progress=False, checkpoint_every=0)
    assert ActivationCache.record(model, [batch, batch], ["0"], path=path, progress=False).examples == 4
    assert (path / "record.lock").read_text() == ""  # released: no owner left behind
