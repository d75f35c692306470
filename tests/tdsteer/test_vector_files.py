"""SteeringVector: arithmetic, safetensors files, lm-eval and GGUF interchange, bad files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tdsteer import Site, SteeringVector, SteeringVectorFileError, steer


def _vector() -> SteeringVector:
    torch.manual_seed(0)
    return SteeringVector(
        {"model.layers.1": torch.randn(16), Site("model.layers.3", slot=0).key: torch.randn(16)},
        metadata={"model_type": "llama", "method": "mean_diff", "read": "last", "data_fingerprint": "ab" * 32},
    )


def test_arithmetic_and_select():
    a = _vector()
    b = a * 2
    assert torch.equal((b - a)["model.layers.1"], a["model.layers.1"])
    assert torch.equal((a + a)["model.layers.3"], b["model.layers.3"])
    assert torch.equal((-a)["model.layers.1"], -a["model.layers.1"])
    assert torch.allclose(a.normalize()["model.layers.1"].norm(), torch.tensor(1.0))
    only = a.select(["model.layers.3"])
    assert only.keys() == ["model.layers.3"]
    with pytest.raises(ValueError, match="different sites"):
        a + only
    with pytest.raises(KeyError, match="not in this vector"):
        a.select("model.layers.7")
    other = SteeringVector(
        {"model.layers.1": torch.randn(16), "model.layers.3": torch.randn(16)}, metadata={"model_type": "gpt2"}
    )
    with pytest.raises(ValueError, match="model type"):
        a + other


def test_save_load_round_trip_is_bit_exact(tmp_path):
    vector = _vector()
    vector.directions["model.layers.1"] = vector.directions["model.layers.1"].to(torch.bfloat16)
    path = vector.save(tmp_path / "v.safetensors")
    loaded = SteeringVector.load(path)
    assert loaded.keys() == vector.keys()
    for key in vector:
        assert loaded[key].dtype == vector[key].dtype
        assert torch.equal(loaded[key], vector[key])
    assert loaded.metadata == vector.metadata
    assert loaded.sites == vector.sites


def test_bad_files_are_clear_errors(tmp_path):
    path = _vector().save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 20])
    with pytest.raises(SteeringVectorFileError, match="truncated or corrupted"):
        SteeringVector.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(SteeringVectorFileError):
        SteeringVector.load(garbage)
    with pytest.raises(SteeringVectorFileError, match="No steering-vector file"):
        SteeringVector.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(SteeringVectorFileError, match="without tdsteer metadata"):
        SteeringVector.load(plain)


def test_lm_eval_round_trip_and_format(tmp_path):
    vector = _vector()
    path = vector.to_lm_eval(tmp_path / "steer.pt", scale=2.0, prefix="model")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"layers.1", "layers.3"}
    entry = raw["layers.1"]
    assert entry["action"] == "add" and entry["steering_coefficient"] == 2.0 and entry["bias"] is None
    back = SteeringVector.from_lm_eval(path, prefix="model")
    for key in vector:
        torch.testing.assert_close(back[key], 2.0 * vector[key])
    clamp = SteeringVector.from_lm_eval(
        vector.to_lm_eval(tmp_path / "clamp.pt", scale=3.0, action="clamp", prefix="model"), prefix="model"
    )
    assert clamp.metadata["operator"] == "clamp"
    torch.testing.assert_close(clamp["model.layers.1"].norm(), torch.tensor(3.0))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_lm_eval_import_refuses_code_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"layers.0": {"steering_vector": _Exploit()}}, handle)
    with pytest.raises(SteeringVectorFileError, match="refuses"):
        SteeringVector.from_lm_eval(path)


def test_gguf_round_trip(tmp_path):
    pytest.importorskip("gguf")
    vector = _vector()
    path = vector.to_gguf(tmp_path / "v.gguf")
    back = SteeringVector.from_gguf(path, path_template="model.layers.{i}")
    assert back.keys() == ["model.layers.1", "model.layers.3"]
    assert back.metadata["model_type"] == "llama"
    for key in vector:
        assert torch.equal(back[key], vector[key])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(SteeringVectorFileError):
        SteeringVector.from_gguf(tmp_path / "bad.gguf", path_template="model.layers.{i}")


def test_loaded_vector_steers_like_the_original(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    vector = SteeringVector({"0": torch.randn(4)})
    loaded = SteeringVector.load(vector.save(tmp_path / "v.safetensors"))
    x = torch.randn(3, 4)
    with steer(model, vector, scale=2.0):
        a = model(x)
    with steer(model, loaded, scale=2.0):
        b = model(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, model(x))


def test_validate_refuses_a_vector_from_a_model_of_another_size():
    class Config:
        model_type = "toy"
        hidden_size = 4

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = Config()  # type: ignore[assignment]
    vector = SteeringVector({"0": torch.randn(4)}, metadata={"model_type": "toy", "model_hidden_size": 8})
    with pytest.raises(ValueError, match="hidden size 8.*hidden size 4"):
        vector.validate(model)
    with pytest.raises(ValueError, match="hidden size 8"), steer(model, vector):
        pass
    assert not model[0]._forward_hooks
    SteeringVector({"0": torch.randn(4)}, metadata={"model_type": "toy", "model_hidden_size": 4}).validate(model)


def test_gguf_writes_block_inputs_as_the_previous_block_and_refuses_direction_0(tmp_path):
    """llama.cpp adds direction.i to block i's output and refuses direction.0: the input of block i is
    the output of block i - 1, and a site at block 0's output or input cannot be written."""
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    pre = SteeringVector({Site("model.layers.2", io="input").key: torch.randn(8)})
    back = SteeringVector.from_gguf(pre.to_gguf(tmp_path / "pre.gguf"), path_template="model.layers.{i}")
    assert back.keys() == ["model.layers.1"]  # the same activation as the input of block 2
    assert torch.equal(back["model.layers.1"], pre[pre.keys()[0]])
    for key in ("model.layers.0", Site("model.layers.0", io="input").key):
        with pytest.raises(ValueError, match="llama.cpp"):
            SteeringVector({key: torch.ones(8)}).to_gguf(tmp_path / "zero.gguf")
    assert not (tmp_path / "zero.gguf").exists()


def test_lm_eval_export_takes_the_recorded_base_model_path(tmp_path):
    vector = SteeringVector({"transformer.h.1": torch.ones(4)}, metadata={"base_model_path": "transformer"})
    assert set(torch.load(vector.to_lm_eval(tmp_path / "v.pt"), weights_only=True)) == {"h.1"}
    unrecorded = SteeringVector({"transformer.h.1": torch.ones(4)})
    with pytest.warns(UserWarning, match="pass prefix="):
        unrecorded.to_lm_eval(tmp_path / "w.pt")
    assert set(torch.load(unrecorded.to_lm_eval(tmp_path / "x.pt", prefix="transformer"), weights_only=True)) == {"h.1"}


def test_select_keeps_the_metadata_of_the_kept_sites_only(tmp_path):
    vector = SteeringVector({"a.0": torch.ones(4), "a.1": torch.ones(6)})
    only = vector.select("a.1")
    assert only.metadata["hidden_sizes"] == {"a.1": 6}
    assert SteeringVector.load(only.save(tmp_path / "v.safetensors")).metadata["hidden_sizes"] == {"a.1": 6}


def test_a_vector_of_another_architecture_names_its_model_type():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    vector = SteeringVector({"model.layers.0": torch.ones(4)}, metadata={"model_type": "llama"})
    with pytest.raises(ValueError, match="made for model type 'llama'.*site 'model.layers.0' does not exist"):
        vector.validate(model)
    with pytest.raises(ValueError, match="made for model type 'llama'"), steer(model, vector):
        pass


def test_an_lm_eval_file_is_told_by_its_content(tmp_path):
    """One rule for every loader and command: a file's first bytes, then its name."""
    from tdsteer.vector import as_vector, is_lm_eval_file

    vector = SteeringVector({"transformer.h.1": torch.ones(4)}, metadata={"base_model_path": "transformer"})
    misnamed = tmp_path / "vector.pt"  # a tdsteer safetensors file under lm-eval's suffix
    misnamed.write_bytes(vector.save(tmp_path / "v.safetensors").read_bytes())
    exported = vector.to_lm_eval(tmp_path / "steer.bin", scale=2.0)  # lm-eval's format under another suffix
    as_safetensors = vector.to_lm_eval(tmp_path / "steer.safetensors", scale=2.0)  # even this suffix
    assert not is_lm_eval_file(misnamed) and is_lm_eval_file(exported) and is_lm_eval_file(as_safetensors)
    assert torch.equal(as_vector(as_safetensors)["h.1"], 2 * torch.ones(4))
    assert is_lm_eval_file(tmp_path / "missing.pt") and not is_lm_eval_file(tmp_path / "missing.safetensors")
    assert torch.equal(as_vector(misnamed)["transformer.h.1"], torch.ones(4))
    assert torch.equal(as_vector(exported)["h.1"], 2 * torch.ones(4))


def test_scaled_gives_per_site_strengths():
    vector = _vector()
    scaled = vector.scaled({"model.layers.3": -2.0})
    assert torch.equal(scaled["model.layers.3"], -2.0 * vector["model.layers.3"])
    assert torch.equal(scaled["model.layers.1"], vector["model.layers.1"])
    assert scaled.metadata["model_type"] == "llama"
    with pytest.raises(KeyError, match="not in this vector"):
        vector.scaled({"model.layers.7": 2.0})


def test_a_safetensors_header_length_starting_like_a_pickle_is_still_safetensors(tmp_path):
    """A header of 640 bytes has the length 0x280: its first byte is 0x80, a pickle's first byte."""
    from tdsteer.vector import as_vector, is_lm_eval_file

    for pad in range(400):
        vector = SteeringVector({"transformer.h.0": torch.ones(4)}, metadata={"method": "mean_diff", "note": "x" * pad})
        path = vector.save(tmp_path / "v.safetensors")
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length starting with 0x80 in the range tried")
    assert not is_lm_eval_file(path)
    assert torch.equal(as_vector(path)["transformer.h.0"], torch.ones(4))
