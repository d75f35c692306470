"""Fixes from an audit of the activation cache: AUROC by ranks, vectors that keep the model's facts,
a cache without progress.json refused, and clearer messages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from toy_models import ToyLM

import tdsteer
from tdsteer import ActivationCache, ActivationCacheError
from tdsteer.cache import auroc
from tdsteer.cache.files import read_header, write_header
from tdsteer.cache.manifest import rank_folder, write_manifest
from tdsteer.cache.ranks import manifest_of, part_of
from tdsteer.cache.storage import CacheStore


def pairwise_auroc(positive: list[float], negative: list[float]) -> Fraction:
    """The definition: the share of (positive, negative) pairs the positive wins, ties counting half."""
    wins = sum(Fraction(1) if p > n else Fraction(1, 2) if p == n else Fraction(0) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def make_batches(n: int = 6, batch: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        positive = torch.randint(1, 32, (batch, 5), generator=generator)
        negative = torch.randint(1, 32, (batch, 5), generator=generator)
        out.append({"positive": {"input_ids": positive}, "negative": {"input_ids": negative}})
    return out


class Fingerprinted(list):
    """Batches that carry a data fingerprint, as tdsteer_hf's ContrastiveBatches do."""

    def __init__(self, batches: list[dict], fingerprint: str) -> None:
        super().__init__(batches)
        self.fingerprint = fingerprint


class HubLike(torch.nn.Module):
    """A model shaped like a Hugging Face one: a config with a hidden size, and ``base_model`` inside it."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.transformer = ToyLM(hidden=hidden)
        self.config = SimpleNamespace(model_type="toy_hub", hidden_size=hidden, name_or_path="toy/hub")

    @property
    def base_model(self) -> torch.nn.Module:
        return self.transformer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids)


@pytest.fixture
def model() -> ToyLM:
    torch.manual_seed(0)
    return ToyLM().eval()


# -- 1. AUROC from ranks ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_auroc_is_exactly_the_pairwise_definition_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    n_pos, n_neg = torch.randint(1, 30, (2,), generator=generator).tolist()
    levels = int(torch.randint(1, 6, (1,), generator=generator))  # few distinct scores: many ties
    positive = torch.randint(0, levels, (n_pos,), generator=generator).double() + 0.5
    negative = torch.randint(0, levels, (n_neg,), generator=generator).double()
    negative[: n_neg // 2] += 0.5  # ties across the classes too
    expected = pairwise_auroc(positive.tolist(), negative.tolist())
    assert auroc(positive, negative) == float(expected)
    assert auroc(positive.float(), negative.float()) == float(expected)


def test_auroc_edge_cases():
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([2, 2, 3]), torch.tensor([1, 2])) == float(pairwise_auroc([2, 2, 3], [1, 2]))
    assert auroc(torch.tensor([float("inf"), 0.0]), torch.tensor([float("inf"), -1.0])) == 0.625
    assert auroc(torch.tensor([-0.0]), torch.tensor([0.0])) == 0.5
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="at least one positive"):
        auroc(torch.tensor([]), torch.tensor([0.0]))


def test_auroc_of_a_million_scores_needs_no_pairwise_matrix():
    """A million scores per class: the pairwise matrix would need terabytes; the address space allowed
    here is 1.5 GiB above what the process maps after importing torch (an allocation failure, never
    the machine's memory, stops the old code)."""
    script = textwrap.dedent(
        """
        import resource, torch
        from tdsteer.cache import auroc
        torch.set_num_threads(1)
        torch.manual_seed(0)
        positive, negative = torch.randn(1_000_000) + 0.5, torch.randn(1_000_000)
        mapped = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 3 * 2**29, resource.RLIM_INFINITY))
        print(auroc(positive, negative))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert abs(float(done.stdout) - 0.6382) < 0.003  # P(N(0.5, 1) > N(0, 1)) = Phi(0.5 / sqrt(2))


def test_probe_auroc_streams_the_held_out_rows(model, tmp_path, monkeypatch):
    batches = make_batches(n=40, batch=64)
    cache = ActivationCache.record(model, batches, ["blocks.1"], path=tmp_path / "c", progress=False)
    assert len(cache) > 4096
    # the reference: every row projected at once, scored by the pairwise definition
    score = cache.probe_auroc("blocks.1", seed=3)
    examples = cache["index"]
    unique = torch.unique(examples)
    order = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(3))]
    test = torch.isin(examples, order[: int(round(0.25 * len(unique)))])
    direction = cache.to_vector(rows=(~test).nonzero().flatten())["blocks.1"].double()
    projected = cache["blocks.1"].double() @ direction
    labels = cache.labels
    expected = pairwise_auroc(projected[test & (labels == 1)].tolist(), projected[test & (labels == 0)].tolist())
    assert score == pytest.approx(float(expected), abs=1e-12)

    largest = [0]
    for name in ("take", "column"):
        original = getattr(ActivationCache, name)

        def spy(self, key, *args, _original=original, **kwargs):
            out = _original(self, key, *args, **kwargs)
            if key == "blocks.1":
                largest[0] = max(largest[0], len(out))
            return out

        monkeypatch.setattr(ActivationCache, name, spy)
    assert cache.probe_auroc("blocks.1", seed=3) == score
    assert 0 < largest[0] <= 4096  # no copy of the whole site column


# -- 2. vectors fitted from a cache keep the model's hidden size and base-model path --------------


def test_cache_vectors_carry_the_hidden_size_and_base_model_path(tmp_path):
    torch.manual_seed(0)
    hub = HubLike().eval()
    batches = make_batches()
    site = "transformer.blocks.1"
    extracted = tdsteer.extract(hub, batches, [site], progress=False)
    ActivationCache.record(hub, batches, [site], path=tmp_path / "c", progress=False)
    cache = ActivationCache.load(tmp_path / "c")
    assert cache.metadata["model_hidden_size"] == 8 and cache.metadata["base_model_path"] == "transformer"
    vector = cache.to_vector("mean_diff")
    for field in ("model_hidden_size", "base_model_path", "model_type", "model_name"):
        assert vector.metadata[field] == extracted.metadata[field], field
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about a missing base-model path
        written = vector.to_lm_eval(tmp_path / "v.pt")
    assert list(torch.load(written)) == ["blocks.1"]
    torch.manual_seed(0)
    wider = HubLike(hidden=16).eval()
    with pytest.raises(ValueError, match="hidden size 8"):
        vector.validate(wider)
    saved = tmp_path / "v.safetensors"
    vector.save(saved)
    assert tdsteer.SteeringVector.load(saved).metadata["base_model_path"] == "transformer"


def test_a_cache_recorded_by_ranks_carries_them_too(tmp_path):
    """Two ranks' caches recorded by hand (as torchrun would) under one manifest."""
    torch.manual_seed(0)
    hub, batches, path = HubLike().eval(), make_batches(), tmp_path / "c"
    stores = []
    for rank in range(2):
        folder = path / rank_folder(rank, 2)
        ActivationCache.record(hub, batches[rank::2], ["transformer.blocks.1"], path=folder, progress=False)
        stores.append(CacheStore.open(folder))
    write_manifest(path, manifest_of([(part_of(store), store.header) for store in stores], path))
    vector = ActivationCache.load(path).to_vector()
    assert vector.metadata["model_hidden_size"] == 8 and vector.metadata["base_model_path"] == "transformer"


def test_a_cache_recorded_before_the_fields_loads_as_before(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "c"
    ActivationCache.record(HubLike().eval(), make_batches(), ["transformer.blocks.1"], path=path, progress=False)
    header = read_header(path)
    del header["model_hidden_size"], header["base_model_path"]
    write_header(path, header)
    vector = ActivationCache.load(path, verify="on_load").to_vector()
    assert vector.metadata["model_hidden_size"] is None and vector.metadata["base_model_path"] is None


@pytest.mark.parametrize(
    ("field", "value"), [("model_hidden_size", "8"), ("model_hidden_size", 0), ("base_model_path", 3)]
)
def test_a_bad_recorded_model_fact_is_refused(tmp_path, model, field, value):
    path = tmp_path / "c"
    ActivationCache.record(model, make_batches(), ["blocks.1"], path=path, progress=False)
    header = read_header(path)
    header[field] = value
    write_header(path, header)
    with pytest.raises(ActivationCacheError, match=field):
        ActivationCache.load(path)


# -- 3. a cache without progress.json ------------------------------------------------------------


def test_a_cache_without_progress_is_refused_and_resumes(tmp_path, model):
    batches = make_batches()
    path = tmp_path / "c"
    reference = ActivationCache.record(model, batches, ["blocks.1"], path=path, progress=False)
    reference_rows = reference["blocks.1"].clone()
    del reference
    (path / "progress.json").unlink()
    with pytest.raises(ActivationCacheError, match=r"no checkpointed rows.*progress\.json.*missing.*record"):
        ActivationCache.load(path)
    resumed = ActivationCache.record(model, batches, ["blocks.1"], path=path, progress=False)
    assert torch.equal(resumed["blocks.1"], reference_rows)
    assert torch.equal(ActivationCache.load(path, verify="on_load")["blocks.1"], reference_rows)


def test_a_cache_killed_before_its_first_rows_says_so_when_fitted(tmp_path, model):
    path = tmp_path / "c"
    ActivationCache.record(model, make_batches(), ["blocks.1"], path=path, progress=False)
    (path / "progress.json").unlink()  # as if killed between writing the header and the progress
    shutil.rmtree(path / "chunk-00000")
    cache = ActivationCache.load(path)
    assert len(cache) == 0
    with pytest.raises(ActivationCacheError, match="holds no rows.*resume"):
        cache.to_vector()


# -- 4. messages -----------------------------------------------------------------------------------


def test_loading_a_missing_folder_or_a_file_says_so(tmp_path):
    with pytest.raises(ActivationCacheError, match="does not exist") as error:
        ActivationCache.load(tmp_path / "nowhere")
    assert "cache.json" not in str(error.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ActivationCacheError, match="is a file"):
        ActivationCache.load(tmp_path / "file")


def test_actadd_from_a_cache_points_to_extract(model):
    cache = ActivationCache.record(model, make_batches(), ["blocks.1"], progress=False)
    with pytest.raises(ValueError, match=r"does not keep.*tdsteer\.extract\(\.\.\., method='actadd', read='all'\)"):
        cache.to_vector("actadd")


def test_a_resume_with_other_data_shows_short_fingerprints(tmp_path, model):
    path = tmp_path / "c"
    ActivationCache.record(model, Fingerprinted(make_batches(), "a" * 64), ["blocks.1"], path=path, progress=False)
    with pytest.raises(ActivationCacheError, match="other data") as error:
        ActivationCache.record(model, Fingerprinted(make_batches(), "b" * 64), ["blocks.1"], path=path, progress=False)
    message = str(error.value)
    assert "a" * 12 in message and "b" * 12 in message
    assert "a" * 13 not in message and "b" * 13 not in message
