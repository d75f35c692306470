"""Damaged cache files: a flipped bit or a malformed header or progress file is an ActivationCacheError.

Issue 12: a flipped bit in a cache data file loaded silently, and malformed progress files raised
``KeyError``, ``RecursionError``, ``OverflowError`` or ``UnicodeDecodeError``, or allocated a
gigabyte before failing.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdsteer import ActivationCache, ActivationCacheError
from tdsteer.safe_io import seal_json

COLUMNS = ["0", "label", "pair", "index", "length"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A small finished cache in two chunks, recorded once for the module."""
    path = tmp_path_factory.mktemp("cache") / "c"
    model = torch.nn.Sequential(torch.nn.Linear(3, 3)).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"positive": torch.randn(3, 3, generator=generator), "negative": torch.randn(3, 3, generator=generator)}]
    ActivationCache.record(model, batches * 3, ["0"], path=path, progress=False, chunk_rows=12)
    return path


@pytest.fixture
def cache(recorded, tmp_path) -> Path:
    shutil.copytree(recorded, tmp_path / "c")
    return tmp_path / "c"


def read_everything(path: Path, verify: str = "on_load") -> dict[str, torch.Tensor]:
    cache = ActivationCache.load(path, verify=verify)  # type: ignore[arg-type]
    return {name: cache[name].clone() for name in COLUMNS} | {"metadata": cache.metadata}  # type: ignore[dict-item]


def flip(path: Path, byte: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["chunk-00000/0.bin", "chunk-00001/0.bin", "chunk-00000/label.bin"])
def test_a_flipped_bit_in_the_data_is_found_on_load_or_on_first_read(cache, file):
    expected = read_everything(cache)
    flip(cache / file, 13, 5)
    with pytest.raises(ActivationCacheError, match=r"fails its checksum.*corrupted.*verify='off'"):
        ActivationCache.load(cache, verify="on_load")
    lazy = ActivationCache.load(cache)  # opening is instant; the first read of the chunk checks it
    with pytest.raises(ActivationCacheError, match="fails its checksum"):
        lazy.to_vector("mean_diff")
    unchecked = ActivationCache.load(cache, verify="off")
    name = file.split("/")[1].removesuffix(".bin")
    assert not torch.equal(unchecked[name], expected[name])


def test_a_loaded_cache_never_writes_to_its_files(cache):
    loaded = ActivationCache.load(cache)
    loaded["0"].mul_(0)  # an in-place change stays in memory (copy-on-write maps)
    assert read_everything(cache)["0"].abs().sum() > 0


@pytest.mark.parametrize("name", ["cache.json", "progress.json"])
def test_every_flipped_bit_in_the_header_or_progress_is_refused(recorded, tmp_path, name):
    expected = read_everything(recorded)
    size = (recorded / name).stat().st_size
    for byte in range(size):
        path = tmp_path / f"c{byte}"
        shutil.copytree(recorded, path)
        flip(path / name, byte, byte % 8)
        try:
            found = read_everything(path)
        except ActivationCacheError:
            shutil.rmtree(path)
            continue
        for key, value in expected.items():  # a flip that changes nothing that matters (never seen)
            assert torch.equal(found[key], value) if key != "metadata" else found[key] == value, (byte, key)
        shutil.rmtree(path)


def nested(depth: int) -> Any:
    return [] if depth == 0 else [nested(depth - 1)]


def rewrite(path: Path, name: str, change: Any, seal: bool = True) -> None:
    record = json.loads((path / name).read_text())
    record.pop("crc32")
    change(record)
    (path / name).write_text(json.dumps(seal_json(record) if seal else record))


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("progress.json", lambda r: r.update(rows=1e400), "rows inf"),
        ("progress.json", lambda r: r.update(rows=2**61), "claims"),
        ("progress.json", lambda r: r.pop("rows"), "rows None"),
        ("progress.json", lambda r: r.update(chunks=[{"rows": 2**40, "crc32": r["chunks"][0]["crc32"]}]), "bytes"),
        ("progress.json", lambda r: r["chunks"][0].update(crc32={"0": 1}), "checksums for"),
        ("progress.json", lambda r: r["chunks"][0]["crc32"].update({"0": -1}), "bad checksum"),
        ("progress.json", lambda r: r.update(chunks="many"), "no list of chunks"),
        ("progress.json", lambda r: r.update(data_order=["x"]), "data hash"),
        ("cache.json", lambda r: r.update(dtype="float8"), "dtype 'float8'"),
        ("cache.json", lambda r: r.update(dtype=["float32"]), "dtype"),
        ("cache.json", lambda r: r["hidden_sizes"].update({"0": 2**30}), r"has \d+ bytes, expected \d+"),
        ("cache.json", lambda r: r["hidden_sizes"].update({"0": 2**40}), "hidden size"),
        ("cache.json", lambda r: r["hidden_sizes"].update({"0": "3"}), "hidden size '3'"),
        ("cache.json", lambda r: r.pop("hidden_sizes"), "hidden sizes None"),
        ("cache.json", lambda r: r["sites"][0].update(layout="XYZ"), "layout"),
        ("cache.json", lambda r: r["sites"][0].update(prefix_tokens="2"), "prefix_tokens"),
        ("cache.json", lambda r: r["sites"][0].update(evil=1), "unknown fields"),
        ("cache.json", lambda r: r.update(sites={"0": {}}), "no list of sites"),
        ("cache.json", lambda r: r.update(format_version=1e400), "format_version"),
        ("cache.json", lambda r: r.update(format_version=3), "newer tdsteer"),
        ("cache.json", lambda r: r.update(format="something else"), "not a tdsteer activation cache"),
        ("cache.json", lambda r: r.update(model_type=["a"]), "model_type"),
    ],
)
def test_malformed_fields_are_clear_errors(cache, name, change, message):
    rewrite(cache, name, change)
    start = time.perf_counter()
    with pytest.raises(ActivationCacheError, match=message):
        read_everything(cache)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"rows": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"rows": ' + b"9" * 5000 + b"}",
        b"\xff\xfe{}",
        b"",
        b"null",
        b'{"rows": 1, "rows": NaN}',
        json.dumps(seal_json({"a": nested(70)})).encode(),
    ],
    ids=["deep", "deep-inside", "huge-int", "not-utf8", "empty", "null", "nan", "nested-70"],
)
@pytest.mark.parametrize("name", ["cache.json", "progress.json"])
def test_unparseable_files_are_clear_errors(cache, name, content):
    (cache / name).write_bytes(content)
    with pytest.raises(ActivationCacheError, match="cache header|cache progress|not a tdsteer|checksum"):
        read_everything(cache)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
HEADER_PATHS = [
    ("sites",),
    ("sites", 0),
    ("sites", 0, "path"),
    ("sites", 0, "slot"),
    ("hidden_sizes",),
    ("hidden_sizes", "0"),
    ("dtype",),
    ("read",),
    ("format_version",),
    ("weights_fingerprint",),
]
PROGRESS_PATHS = [
    ("rows",),
    ("examples",),
    ("data_order",),
    ("chunks",),
    ("chunks", 0),
    ("chunks", 0, "rows"),
    ("chunks", 1, "crc32"),
    ("chunks", 1, "crc32", "pair"),
]


def mutate(record: Any, where: tuple, value: Any, delete: bool) -> None:
    for step in where[:-1]:
        record = record[step]
    if delete and isinstance(record, dict):
        record.pop(where[-1], None)
    else:
        record[where[-1]] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["cache.json", "progress.json"]),
    index=st.integers(0, 9),
    value=JSON,
    delete=st.booleans(),
    seal=st.booleans(),
)
def test_fuzzed_header_and_progress_fields_load_or_are_refused_clearly(
    recorded, tmp_path, name, index, value, delete, seal
):
    paths = HEADER_PATHS if name == "cache.json" else PROGRESS_PATHS
    path = tmp_path / "fuzz"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(recorded, path)
    rewrite(path, name, lambda record: mutate(record, paths[index % len(paths)], value, delete), seal=seal)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_everything(path)
    except ActivationCacheError:
        pass
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB: no big allocation


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["cache.json", "progress.json"]),
    content=st.binary(max_size=64) | JSON.map(json.dumps).map(str.encode),
)
def test_fuzzed_file_contents_are_refused_clearly(recorded, tmp_path, name, content):
    path = tmp_path / "fuzz"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(recorded, path)
    (path / name).write_bytes(content)
    with pytest.raises(ActivationCacheError):
        read_everything(path)
