"""Damaged, hostile or non-finite vector files, and writes that fail halfway.

Issue 12: a flipped bit in a vector file loaded silently; ``to_lm_eval`` and ``to_gguf`` wrote in
place and ``save`` through ``<dest>.tmp`` (overwriting an unrelated file, left behind on failure);
a vector with NaN saved and then could not be loaded, lm-eval and GGUF imports accepted NaN
directions; malformed headers raised ``RecursionError``, ``OverflowError`` and the like.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import resource
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tdsteer import Site, SteeringVector, SteeringVectorFileError, formats
from tdsteer.safe_io import crc32_of


def vector() -> SteeringVector:
    torch.manual_seed(0)
    return SteeringVector(
        {"model.layers.1": torch.randn(8), Site("model.layers.3", slot=0).key: torch.randn(8)},
        metadata={"model_type": "llama", "method": "mean_diff", "note": "ünïcode"},
    )


def assert_same(a: SteeringVector, b: SteeringVector) -> None:
    assert a.keys() == b.keys() and a.sites == b.sites and a.metadata == b.metadata
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_flipped_bit_of_a_vector_file_is_refused(tmp_path):
    original = vector()
    data = original.save(tmp_path / "v.safetensors").read_bytes()
    loaded_anyway = []
    for byte in range(len(data)):
        damaged = bytearray(data)
        damaged[byte] ^= 1 << (byte % 8)
        path = tmp_path / "damaged.safetensors"
        path.write_bytes(bytes(damaged))
        try:
            assert_same(SteeringVector.load(path), original)  # only a change that changes nothing may load
            loaded_anyway.append(byte)
        except SteeringVectorFileError:
            pass
    assert len(loaded_anyway) < 8, loaded_anyway  # at most padding spaces of the safetensors header


def test_a_format_1_file_without_checksums_still_loads(tmp_path):
    header = {
        "format": "tdsteer.steering_vector",
        "format_version": 1,
        "sites": {"h.0": Site("h.0").to_dict()},
        "metadata": {"method": "mean_diff"},
    }
    save_file({"h.0": torch.ones(4)}, str(tmp_path / "old.safetensors"), metadata={"tdsteer": json.dumps(header)})
    loaded = SteeringVector.load(tmp_path / "old.safetensors")
    assert loaded.metadata["method"] == "mean_diff" and loaded["h.0"].tolist() == [1.0] * 4


def write_header(path: Path, text: str, checksum: str | None = "auto") -> Path:
    metadata = {"tdsteer": text}
    if checksum == "auto":
        metadata["tdsteer.crc32"] = f"{crc32_of(text.encode()):08x}"
    elif checksum is not None:
        metadata["tdsteer.crc32"] = checksum
    save_file({"h.0": torch.ones(4)}, str(path), metadata=metadata)
    return path


def nested(depth: int) -> list:
    return [] if depth == 0 else [nested(depth - 1)]


def valid_header(**changes) -> dict:
    header = {
        "format": "tdsteer.steering_vector",
        "format_version": 2,
        "sites": {"h.0": Site("h.0").to_dict()},
        "metadata": {},
        "crc32": {"h.0": crc32_of(torch.ones(4))},
    }
    return {**header, **changes}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ('{"format": "tdsteer.steering_vector", "format_version": 1e400}', "not an integer"),
        ('{"format": "tdsteer.steering_vector", "format_version": ' + "9" * 5000 + "}", "not valid JSON"),
        ("null", "not an object"),
        ("not json", "not valid JSON"),
        (json.dumps(valid_header(format_version=7)), "newer tdsteer"),
        (json.dumps(valid_header(sites=["h.0"])), "must be objects"),
        (json.dumps(valid_header(metadata=[1])), "must be objects"),
        (json.dumps(valid_header(sites={"h.0": {"path": 0}})), "'path' must be a str"),
        (json.dumps(valid_header(sites={"h.0": {"path": "h.0", "layout": [1]}})), "layout"),
        (json.dumps(valid_header(sites={"h.1": {"path": "h.1"}})), "header names sites"),
        (json.dumps(valid_header(crc32={"h.0": "x"})), "'crc32' must map"),
        (json.dumps(valid_header(crc32={"h.0": 12345})), "fails its checksum"),
        (json.dumps(valid_header(metadata={"deep": nested(70)})), "nested"),
        (json.dumps(valid_header(metadata={"model_hidden_size": 1e400})), "'model_hidden_size' is inf, not a count"),
        (json.dumps(valid_header(metadata={"model_hidden_size": [768]})), "not a count"),
        (json.dumps(valid_header(metadata={"num_examples": -1})), "not a count"),
        (json.dumps(valid_header(metadata={"model_type": {"a": 1}})), "'model_type' .* not text"),
        (json.dumps(valid_header(metadata={"hidden_sizes": {"h.0": "8"}})), "hidden_sizes"),
        (json.dumps(valid_header(metadata={"read": [1]})), "read position"),
    ],
)
def test_malformed_headers_are_clear_errors(tmp_path, text, message):
    with pytest.raises(SteeringVectorFileError, match=message):
        SteeringVector.load(write_header(tmp_path / "v.safetensors", text))


def test_raw_safetensors_damage_is_refused_without_allocating(tmp_path):
    data = vector().save(tmp_path / "v.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length]
    not_utf8 = data[:8] + header.replace(b"mean_diff", b"mean\xffdiff") + data[8 + length :]
    huge_header = (2**60).to_bytes(8, "little") + data[8:]
    huge_tensor = data[:8] + header.replace(b'"shape":[8]', b'"shape":[9]', 1) + data[8 + length :]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert not_utf8 != data and huge_tensor != data
    for name, content in [("utf8", not_utf8), ("header", huge_header), ("tensor", huge_tensor)]:
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(SteeringVectorFileError, match="not a readable safetensors file"):
            SteeringVector.load(tmp_path / f"{name}.safetensors")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB


def test_a_header_without_its_checksum_or_with_another_is_refused(tmp_path):
    text = json.dumps(valid_header())
    assert SteeringVector.load(write_header(tmp_path / "ok.safetensors", text)).keys() == ["h.0"]
    with pytest.raises(SteeringVectorFileError, match="lost its checksum"):
        SteeringVector.load(write_header(tmp_path / "none.safetensors", text, checksum=None))
    with pytest.raises(SteeringVectorFileError, match="fails its checksum"):
        SteeringVector.load(write_header(tmp_path / "other.safetensors", text, checksum="zz"))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
FIELDS = ["format", "format_version", "sites", "metadata", "crc32"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON, whole=JSON, mode=st.sampled_from(["field", "whole", "site"]))
def test_fuzzed_headers_load_or_are_refused_clearly(tmp_path, field, value, whole, mode):
    if mode == "whole":
        header = whole
    elif mode == "site":
        header = valid_header(sites={"h.0": value if isinstance(value, dict) else {"path": "h.0", "slot": value}})
    else:
        header = valid_header(**{field: value})
    try:
        loaded = SteeringVector.load(write_header(tmp_path / "fuzz.safetensors", json.dumps(header)))
    except SteeringVectorFileError:
        return
    repr(loaded)  # what loads is usable: printed, checked against a model, saved again
    try:
        loaded.validate(MODEL, check="ignore")
    except ValueError as error:
        assert "hidden size" in str(error) or "does not resolve" in str(error)
    loaded.save(tmp_path / "again.safetensors")


class _H(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = torch.nn.ModuleList([torch.nn.Linear(4, 4)])


MODEL = _H()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_vector_is_never_written(tmp_path, bad):
    good = vector()
    directions = dict(good.directions)
    directions["model.layers.1"] = directions["model.layers.1"].clone()
    directions["model.layers.1"][3] = bad
    broken = SteeringVector(directions, good.sites, good.metadata)
    existing = good.save(tmp_path / "v.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"Cannot save .*site 'model.layers.1' has 1 NaN or infinite value\(s\) of 8"):
        broken.save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="site 'model.layers.1' has 1 NaN"):
        broken.to_lm_eval(tmp_path / "v.pt", prefix="")
    with pytest.raises(ValueError, match="scale is"):
        good.to_lm_eval(tmp_path / "v.pt", scale=bad, prefix="")
    assert (tmp_path / "v.safetensors").read_bytes() == existing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="site 'model.layers.1' has 1 NaN"):
        broken.to_gguf(tmp_path / "v.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def lm_eval_file(path: Path, **entry) -> Path:
    base = {"steering_vector": torch.ones(4), "steering_coefficient": 1.0, "action": "add", "bias": None}
    torch.save({"layers.0": {**base, **entry}}, path)
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"steering_vector": torch.tensor([1.0, float("nan")])}, "NaN or infinite"),
        ({"steering_coefficient": float("inf")}, "NaN or infinite"),
        ({"steering_coefficient": 1e308, "steering_vector": torch.full((4,), 1e10)}, "NaN or infinite"),
        ({"steering_coefficient": "2.0"}, "is not a number"),
        ({"steering_coefficient": [1.0]}, "is not a number"),
        ({"action": ["add"]}, "unknown action"),
        ({"action": "scale"}, "unknown action"),
        ({"steering_vector": torch.zeros(0)}, "empty"),
        ({"steering_vector": torch.ones(4, dtype=torch.complex64)}, "complex64"),
        ({"steering_vector": [1.0, 2.0]}, "no steering_vector tensor"),
        ({"bias": torch.ones(4)}, "bias or head_index"),
    ],
)
def test_lm_eval_imports_refuse_what_is_not_a_finite_direction(tmp_path, entry, message):
    with pytest.raises(SteeringVectorFileError, match=message):
        SteeringVector.from_lm_eval(lm_eval_file(tmp_path / "v.pt", **entry))


class _Storage:
    """Pickled as a reference to storage record ``0``, claiming ``2**29`` floats (2 GiB)."""


class _HugeTensor:
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_Storage(), 0, (2**29,), (1,), False, collections.OrderedDict()))


class _ClaimingPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 2**29) if isinstance(obj, _Storage) else None


def test_lm_eval_imports_refuse_odd_hookpoints_and_huge_storage_claims(tmp_path):
    torch.save({3: {"steering_vector": torch.ones(4)}}, tmp_path / "int.pt")
    with pytest.raises(SteeringVectorFileError, match="not a module path"):
        SteeringVector.from_lm_eval(tmp_path / "int.pt")
    assert SteeringVector.from_lm_eval(lm_eval_file(tmp_path / "ok.pt", steering_coefficient=2))["layers.0"][0] == 2
    buffer = io.BytesIO()
    _ClaimingPickler(buffer, protocol=2).dump({"layers.0": {"steering_vector": _HugeTensor()}})
    with zipfile.ZipFile(tmp_path / "claim.pt", "w") as archive:  # a 2 GiB tensor claimed, 16 bytes stored
        for name, data in [("data.pkl", buffer.getvalue()), ("byteorder", b"little"), ("data/0", bytes(16))]:
            archive.writestr(f"archive/{name}", data)
        archive.writestr("archive/version", "3\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SteeringVectorFileError, match="could not be read"):
        SteeringVector.from_lm_eval(tmp_path / "claim.pt")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB


def test_gguf_imports_refuse_non_finite_directions(tmp_path):
    gguf = pytest.importorskip("gguf")

    for name, values in [("nan", [1.0, float("nan")]), ("f16", [1.0, 2.0])]:
        writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "controlvector")
        writer.add_tensor("direction.1", np.array(values, dtype=np.float16 if name == "f16" else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(SteeringVectorFileError, match="direction.1 is empty or holds NaN"):
        SteeringVector.from_gguf(tmp_path / "nan.gguf", path_template="h.{i}")
    assert SteeringVector.from_gguf(tmp_path / "f16.gguf", path_template="h.{i}")["h.1"].tolist() == [1.0, 2.0]


class Killed(Exception):
    pass


def half_written(real):
    """A writer that writes half a file at the temporary path, then fails."""

    def write(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half a file")
        raise Killed

    return write


@pytest.mark.parametrize("kind", ["save", "to_lm_eval", "to_gguf"])
def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, kind):
    if kind == "to_gguf":
        gguf = pytest.importorskip("gguf")

        def failing(self, *args, **kwargs):
            raise Killed

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", failing)
    elif kind == "save":
        monkeypatch.setattr(formats, "save_file", half_written(formats.save_file))
    else:
        monkeypatch.setattr(torch, "save", half_written(torch.save))
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"the previous file")
    unrelated = tmp_path / "out.bin.tmp"
    unrelated.write_bytes(b"a user's own file")
    with pytest.raises(Killed):
        getattr(vector().select("model.layers.1"), kind)(dest)
    assert dest.read_bytes() == b"the previous file"
    assert unrelated.read_bytes() == b"a user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.bin.tmp"]


def test_atomic_writes_keep_the_mode_of_the_file_and_follow_symlinks(tmp_path):
    target = tmp_path / "real.safetensors"
    vector().save(target)
    os.chmod(target, 0o600)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    vector().select("model.layers.1").save(link)
    assert link.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert SteeringVector.load(target).keys() == ["model.layers.1"]
    new = vector().save(tmp_path / "new" / "v.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
