"""ActivationCache: record, reopen without the model, fit, resume after a kill, refuse mismatches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from toy_models import ToyLM

import tdsteer
from tdsteer import ActivationCache, ActivationCacheError, Site

SITES = ["blocks.0", "blocks.2"]
HERE = Path(__file__).parent


def make_batches(n: int = 6, batch: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + i % 3
        ids = torch.randint(1, 32, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, : i % 2 + 1] = 0  # left padding
        negative = torch.randint(1, 32, (batch, length + 1), generator=generator)
        out.append(
            {
                "positive": {"input_ids": ids, "attention_mask": mask},
                "negative": {"input_ids": negative, "attention_mask": torch.ones_like(negative)},
            }
        )
    return out


@pytest.fixture
def model() -> ToyLM:
    torch.manual_seed(0)
    return ToyLM().eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_labels_and_reopen(model, tmp_path, dtype):
    batches = make_batches()
    cache = ActivationCache.record(model, batches, SITES, path=tmp_path / "c", dtype=dtype, progress=False)
    assert len(cache) == 2 * 24
    assert cache.labels.tolist()[:4] == [1, 0, 1, 0]
    reopened = ActivationCache.load(tmp_path / "c")
    assert reopened.metadata["model_type"] == "ToyLM" and reopened.metadata["read"] == "last"
    assert reopened.metadata["tdsteer_version"] == tdsteer.__version__
    for key in [*SITES, "label", "pair", "index", "length"]:
        assert torch.equal(reopened[key], cache[key]), key
    assert reopened["blocks.0"].dtype == dtype
    assert reopened["length"][:2].tolist() == [4 - 1, 5]  # real tokens of the first positive and negative
    in_memory = ActivationCache.record(model, batches, SITES, dtype=dtype, progress=False)
    assert torch.equal(in_memory["blocks.2"], reopened["blocks.2"])
    batches_seen = list(reopened.iter_batches(batch_size=10))
    assert [len(b) for b in batches_seen] == [10, 10, 10, 10, 8]
    assert torch.equal(torch.cat([b["blocks.0"] for b in batches_seen]), reopened["blocks.0"])


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "probe"])
def test_vectors_from_cache_equal_direct_extraction(model, tmp_path, method):
    batches = make_batches()
    ActivationCache.record(model, batches, SITES, path=tmp_path / "c", progress=False, chunk_rows=20)
    cache = ActivationCache.load(tmp_path / "c")
    assert len(cache.chunks) > 1  # grown in chunks, rows straddle chunk boundaries
    from_cache = cache.to_vector(method)
    direct = tdsteer.extract(model, batches, SITES, method=method, progress=False)
    for key in SITES:
        torch.testing.assert_close(from_cache[key], direct[key], atol=1e-6, rtol=1e-6)
    only = cache.to_vector(method, sites=["blocks.2"])
    assert only.keys() == ["blocks.2"]


def test_probe_auroc_separates_a_planted_direction(tmp_path):
    model = torch.nn.Sequential(torch.nn.Identity())
    generator = torch.Generator().manual_seed(0)
    direction = torch.zeros(6)
    direction[2] = 1
    batches = [
        {
            "positive": torch.randn(8, 6, generator=generator) + 1.5 * direction,
            "negative": torch.randn(8, 6, generator=generator) - 1.5 * direction,
        }
        for _ in range(8)
    ]
    cache = ActivationCache.record(model, batches, ["0"], path=tmp_path / "c", progress=False)
    assert cache.probe_auroc("0") > 0.95
    shuffled = [{"positive": b["negative"], "negative": b["negative"].flip(0)} for b in batches]
    noise = ActivationCache.record(model, shuffled, ["0"], progress=False)
    assert 0.2 < noise.probe_auroc("0") < 0.8


def test_class_labelled_batches(tmp_path):
    model = torch.nn.Sequential(torch.nn.Identity())
    x = torch.randn(10, 3)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0, 2, 1])
    cache = ActivationCache.record(model, [{"inputs": x, "labels": labels}], ["0"], progress=False)
    assert cache.labels.tolist() == labels.tolist()
    vector = cache.to_vector("mean_diff", positive_label=2, negative_label=0)
    torch.testing.assert_close(vector["0"], x[labels == 2].mean(0) - x[labels == 0].mean(0))


def test_mismatched_settings_are_refused(model, tmp_path):
    path = tmp_path / "c"
    batches = make_batches()
    ActivationCache.record(model, batches, SITES, path=path, progress=False)
    with pytest.raises(ActivationCacheError, match="sites"):
        ActivationCache.record(model, batches, ["blocks.1"], path=path, progress=False)
    with pytest.raises(ActivationCacheError, match="read"):
        ActivationCache.record(model, batches, SITES, path=path, read="mean", progress=False)
    other = torch.nn.Sequential(torch.nn.Identity())
    with pytest.raises(ActivationCacheError, match="model_type"):
        ActivationCache.record(other, batches, SITES, path=path, progress=False)
    with pytest.raises(ActivationCacheError, match="data differs"):
        ActivationCache.record(model, make_batches(seed=1), SITES, path=path, progress=False)
    wide = ToyLM(hidden=12).eval()  # other shapes: other weights, before the hidden sizes are even read
    with pytest.raises(ActivationCacheError, match="other weights"):
        ActivationCache.record(wide, make_batches(n=8), SITES, path=path, progress=False)


def test_truncated_or_foreign_folders_are_clear_errors(model, tmp_path):
    path = tmp_path / "c"
    ActivationCache.record(model, make_batches(), SITES, path=path, progress=False)
    data = path / "chunk-00000" / "blocks.0.bin"
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(ActivationCacheError, match="truncated"):
        ActivationCache.load(path)
    with pytest.raises(ActivationCacheError, match="not an activation cache"):
        ActivationCache.load(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ActivationCacheError, match="choose an empty folder"):
        ActivationCache.record(model, make_batches(), SITES, path=tmp_path / "busy", progress=False)
    with pytest.raises(ValueError, match="one row per example"):
        ActivationCache.record(model, make_batches(), SITES, read="all", progress=False)


def test_resumes_after_a_kill_bit_identical(model, tmp_path):
    full = ActivationCache.record(model, make_batches(), SITES, path=tmp_path / "full", progress=False, chunk_rows=20)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from toy_models import ToyLM
        from test_cache import make_batches, SITES
        from tdsteer import ActivationCache

        model = ToyLM().eval()
        model.load_state_dict(torch.load({str(tmp_path / "model.pt")!r}))

        def batches():
            for i, batch in enumerate(make_batches()):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch

        ActivationCache.record(model, batches(), SITES, path={str(tmp_path / "killed")!r}, progress=False, chunk_rows=20, checkpoint_every=0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    partial = ActivationCache.load(tmp_path / "killed")
    assert partial.examples == 12 and len(partial) == 24
    resumed = ActivationCache.record(
        model, make_batches(), SITES, path=tmp_path / "killed", progress=False, chunk_rows=20
    )
    assert resumed.examples == full.examples == 24
    for key in [*SITES, "label", "pair", "index", "length"]:
        assert torch.equal(resumed[key], full[key]), key
    names = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("*.bin"))
    assert names == sorted(p.relative_to(tmp_path / "killed") for p in (tmp_path / "killed").rglob("*.bin"))
    for name in names:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    assert os.path.getsize(tmp_path / "full" / "progress.json") > 0


def test_columns_are_named_by_a_site_or_its_key(tmp_path):
    model = torch.nn.Sequential(torch.nn.Identity())
    site = Site("0")
    cache = ActivationCache.record(model, [{"inputs": torch.ones(3, 2), "labels": [0, 1, 0]}], [site], progress=False)
    rows = torch.tensor([2, 0])
    assert torch.equal(cache.take(site, rows), cache.take("0", rows))
    assert torch.equal(cache.column(site), cache.column("0"))
    with pytest.raises(KeyError, match=r"No column '9'; the cache has sites \['0'\]"):
        cache.take(Site("9"), rows)
