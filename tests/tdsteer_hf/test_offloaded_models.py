"""Models whose weights accelerate offloads to disk (their parameters on ``meta``): extraction and
recording run where the model runs, and the weights fingerprint reads the offloaded weights, so the
same checkpoint gets the same fingerprint in memory and offloaded, and another checkpoint that differs
only in an offloaded layer gets another (a cache resume with it is refused)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tdsteer
import tdsteer_hf
from tdsteer.cache.fingerprint import weights_fingerprint
from tdsteer.errors import ActivationCacheError
from tdsteer.extraction import model_device
from tdsteer_hf.tiny import save_tiny_gpt2

accelerate = pytest.importorskip("accelerate")

TEXTS = ["I love this movie", "I hate this movie", "the food was great", "the food was awful"]
PAIRS = [("I love this movie", "I hate this movie"), ("the food was great", "the food was awful")] * 4
# The embedding (tied to the head) and the last two blocks on disk, the rest in memory: the first
# parameter of the model is on meta.
DEVICE_MAP = {"transformer.wte": "disk", "transformer.wpe": "cpu", "transformer.ln_f": "cpu", "lm_head": "disk"}
DEVICE_MAP |= {f"transformer.h.{i}": ("cpu" if i < 2 else "disk") for i in range(4)}
BLOCKS_ON_DISK = {name: "cpu" for name in DEVICE_MAP} | {"transformer.h.2": "disk", "transformer.h.3": "disk"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("model"), TEXTS, n_layer=4, n_positions=32)


@pytest.fixture(scope="module")
def changed_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another checkpoint: the same model, one offloaded block fine-tuned."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.transformer.h[3].mlp.c_fc.weight.mul_(1.5)
    folder = tmp_path_factory.mktemp("changed")
    model.save_pretrained(folder)
    return folder


def _in_memory(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _offloaded(directory: Path, folder: Path, device_map: dict[str, str] = DEVICE_MAP) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(directory, device_map=device_map, offload_folder=str(folder)).eval()
    assert model.transformer.h[3].mlp.c_fc.weight.is_meta
    return model


def _batches(model_dir: Path) -> list[dict[str, object]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return list(tdsteer_hf.contrastive_batches(tokenizer, PAIRS, batch_size=2))


def test_extract_and_record_run_an_offloaded_model_where_it_runs(model_dir: Path, tmp_path: Path) -> None:
    reference, placed = _in_memory(model_dir), _offloaded(model_dir, tmp_path / "offload")
    assert next(placed.parameters()).is_meta  # the embedding is on disk
    assert model_device(placed) == torch.device("cpu")  # accelerate's execution device, not meta
    sites, batches = tdsteer_hf.sites(reference, [1, 3]), _batches(model_dir)
    for method in ("mean_diff", "probe"):
        expected = tdsteer.extract(reference, batches, sites, method=method, progress=False)
        got = tdsteer.extract(placed, batches, sites, method=method, progress=False)
        for site in sites:
            torch.testing.assert_close(got[site.key], expected[site.key], atol=1e-5, rtol=1e-5)
    cache = tdsteer.ActivationCache.record(placed, batches, sites, progress=False)
    expected_cache = tdsteer.ActivationCache.record(reference, batches, sites, progress=False)
    assert len(cache) == len(expected_cache) == 2 * len(PAIRS)  # a positive and a negative row per pair
    for site in sites:
        torch.testing.assert_close(cache[site.key], expected_cache[site.key], atol=1e-5, rtol=1e-5)


def test_a_model_on_meta_runs_where_its_device_map_says_or_asks_for_a_device() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="device="):
        model_device(model)
    model.hf_device_map = {"a": "disk", "b": "cuda:1", "c": "cpu"}  # hooks gone: the map says where it runs
    assert model_device(model) == torch.device("cuda", 1)
    model.hf_device_map = {"a": "disk", "b": "cpu"}
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) is None
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


@pytest.mark.parametrize("how", ["device_map", "dispatch_model", "cpu_offload"])
def test_the_same_checkpoint_offloaded_has_the_fingerprint_it_has_in_memory(
    model_dir: Path, changed_dir: Path, tmp_path: Path, how: str
) -> None:
    """From the checkpoint's safetensors file (device_map), from ``.dat`` files of the offload folder
    (dispatch_model), from a state dict in memory (cpu_offload, which unties the embedding and the head)."""
    for directory in (model_dir, changed_dir):
        reference = _in_memory(directory)
        if how == "device_map":
            placed = _offloaded(directory, tmp_path / directory.name)
        elif how == "dispatch_model":
            placed = accelerate.dispatch_model(
                copy.deepcopy(reference),
                device_map=BLOCKS_ON_DISK,
                main_device="cpu",
                offload_dir=str(tmp_path / directory.name),
            )
            assert any(path.suffix == ".dat" for path in (tmp_path / directory.name).iterdir())
        else:
            placed = accelerate.cpu_offload(copy.deepcopy(reference), execution_device="cpu")
        assert placed.transformer.h[3].mlp.c_fc.weight.is_meta
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every offloaded value found: no warning
            assert weights_fingerprint(placed) == weights_fingerprint(reference)


@pytest.mark.parametrize("device_map", [DEVICE_MAP, BLOCKS_ON_DISK], ids=["embedding-too", "blocks"])
def test_checkpoints_differing_only_in_an_offloaded_layer_have_other_fingerprints(
    model_dir: Path, changed_dir: Path, tmp_path: Path, device_map: dict[str, str]
) -> None:
    original = _offloaded(model_dir, tmp_path / "original", device_map)
    changed = _offloaded(changed_dir, tmp_path / "changed", device_map)
    assert weights_fingerprint(original) != weights_fingerprint(changed)


def test_a_cache_resume_refuses_another_offloaded_checkpoint(
    model_dir: Path, changed_dir: Path, tmp_path: Path
) -> None:
    sites, batches = tdsteer_hf.sites(_in_memory(model_dir), [3]), _batches(model_dir)
    path = tmp_path / "cache"
    original = _offloaded(model_dir, tmp_path / "original")
    tdsteer.ActivationCache.record(original, batches[:2], sites, path=path, model_name="tiny", progress=False)
    changed = _offloaded(changed_dir, tmp_path / "changed")
    with pytest.raises(ActivationCacheError, match="other weights"):
        tdsteer.ActivationCache.record(changed, batches, sites, path=path, model_name="tiny", progress=False)
    # The same checkpoint, now in memory: the resume goes on, and the rows are those of one model.
    reference = _in_memory(model_dir)
    resumed = tdsteer.ActivationCache.record(reference, batches, sites, path=path, model_name="tiny", progress=False)
    whole = tdsteer.ActivationCache.record(reference, batches, sites, progress=False)
    assert len(resumed) == len(whole) == 2 * len(PAIRS)  # a positive and a negative row per pair
    torch.testing.assert_close(resumed[sites[0].key], whole[sites[0].key], atol=1e-5, rtol=1e-5)


def test_meta_tensors_without_values_are_marked_and_warned_about() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    empty = copy.deepcopy(model).to("meta")
    with pytest.warns(UserWarning, match="meta device and no accelerate weights map holds their values"):
        unknown = weights_fingerprint(empty)
    assert unknown != weights_fingerprint(model)
