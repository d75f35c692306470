"""Resuming and appending to an activation cache: equal to an uninterrupted recording, or refused.

Issue 12, "data silently lost or mixed": a resume with another batch size skipped whole batches,
a resume with other data and another batch size was accepted, and a model with the same type and
name but other weights could append to a cache.
"""

from __future__ import annotations

import json

import pytest
import torch
from toy_models import ToyLM

from tdsteer import ActivationCache, ActivationCacheError
from tdsteer.safe_io import seal_json

SITES = ["blocks.0", "blocks.2"]
FIELDS = ["label", "pair", "index", "length"]


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C between two batches."""


def examples(n: int = 13, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (positive, negative) token sequences of ragged lengths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (n, 2), generator=generator).tolist()
    return [
        (torch.randint(1, 32, (a,), generator=generator), torch.randint(1, 32, (b,), generator=generator))
        for a, b in lengths
    ]


def pad(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right padding: with ToyLM's causal mixing, each example's real tokens read alike in any batch."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(data: list, size: int, stop_after: int | None = None):
    for i, start in enumerate(range(0, len(data), size)):
        if stop_after is not None and i == stop_after:
            raise Interrupted
        chunk = data[start : start + size]
        yield {"positive": pad([p for p, _ in chunk]), "negative": pad([n for _, n in chunk])}


@pytest.fixture
def model() -> ToyLM:
    torch.manual_seed(0)
    return ToyLM().eval()


def interrupted_recording(model, path, data, size, stop_after, **kwargs) -> ActivationCache:
    with pytest.raises(Interrupted):
        ActivationCache.record(
            model, batches(data, size, stop_after), SITES, path=path, progress=False, checkpoint_every=0, **kwargs
        )
    return ActivationCache.load(path)


def assert_same_rows(cache: ActivationCache, reference: ActivationCache, exact: bool = False) -> None:
    assert len(cache) == len(reference) and cache.examples == reference.examples
    for key in FIELDS:
        assert torch.equal(cache[key], reference[key]), key
    for key in SITES:
        if exact:
            assert torch.equal(cache[key], reference[key]), key
        else:
            torch.testing.assert_close(cache[key], reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("before", "after", "chunk_rows"), [(4, 3, 20), (3, 5, 7), (4, 1, 16384), (2, 13, 5)])
def test_a_resume_with_another_batch_size_equals_an_uninterrupted_recording(model, tmp_path, before, after, chunk_rows):
    data = examples()
    reference = ActivationCache.record(model, batches(data, after), SITES, progress=False)
    partial = interrupted_recording(model, tmp_path / "c", data, before, stop_after=2, chunk_rows=chunk_rows)
    assert partial.examples == 2 * before and len(partial) == 4 * before
    resumed = ActivationCache.record(
        model, batches(data, after), SITES, path=tmp_path / "c", progress=False, chunk_rows=chunk_rows
    )
    assert_same_rows(resumed, reference)
    assert_same_rows(ActivationCache.load(tmp_path / "c", verify="on_load"), reference)
    assert resumed.metadata["data_order"] == reference.metadata["data_order"]


@pytest.mark.parametrize("after", [1, 2, 5, 7])
def test_a_resume_cut_inside_a_batch_is_bit_identical_for_a_batch_independent_model(tmp_path, after):
    model = torch.nn.Sequential(torch.nn.Tanh())
    x = torch.randn(17, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(17) % 3

    def labelled(size, stop_after=None):
        for i, start in enumerate(range(0, 17, size)):
            if i == stop_after:
                raise Interrupted
            yield {"inputs": x[start : start + size], "labels": labels[start : start + size].tolist()}

    reference = ActivationCache.record(model, labelled(17), ["0"], progress=False)
    with pytest.raises(Interrupted):
        ActivationCache.record(model, labelled(3, 2), ["0"], path=tmp_path / "c", progress=False, checkpoint_every=0)
    resumed = ActivationCache.record(model, labelled(after), ["0"], path=tmp_path / "c", progress=False)
    assert torch.equal(resumed["0"], reference["0"]) and torch.equal(resumed.labels, reference.labels)
    assert resumed["index"].tolist() == list(range(17))


@pytest.mark.parametrize("after", [1, 3, 4, 6])
@pytest.mark.parametrize("change", ["one example", "order", "one padding-free token"])
def test_a_resume_with_other_data_is_refused_at_any_batch_size(model, tmp_path, after, change):
    data = examples()
    interrupted_recording(model, tmp_path / "c", data, 4, stop_after=2)
    other = list(data)
    if change == "one example":
        other[5] = examples(1, seed=7)[0]
    elif change == "order":
        other[1], other[2] = other[2], other[1]
    else:
        positive, negative = other[7]
        other[7] = (positive.clone().index_fill_(0, torch.tensor([0]), 31 - int(positive[0])), negative)
    with pytest.raises(ActivationCacheError, match="data differs.*first 8 examples"):
        ActivationCache.record(model, batches(other, after), SITES, path=tmp_path / "c", progress=False)
    assert ActivationCache.load(tmp_path / "c").examples == 8  # nothing was added


def test_data_padded_otherwise_is_the_same_data(model, tmp_path):
    """Left padding instead of right: the same examples (the read sees the same real tokens)."""
    data = examples()
    interrupted_recording(model, tmp_path / "c", data, 4, stop_after=1)

    def left_padded(size):
        for batch in batches(data, size):
            for half in batch.values():
                half["input_ids"] = torch.stack([r.roll(int((r == 0).sum())) for r in half["input_ids"]])
                half["attention_mask"] = torch.stack([m.flip(0) for m in half["attention_mask"]])
            yield batch

    resumed = ActivationCache.record(model, left_padded(3), SITES, path=tmp_path / "c", progress=False)
    assert resumed.examples == 13


def test_shorter_data_than_the_cache_holds_is_refused(model, tmp_path):
    data = examples()
    ActivationCache.record(model, batches(data, 4), SITES, path=tmp_path / "c", progress=False)
    with pytest.raises(ActivationCacheError, match="already holds 13 examples but the data has only 8"):
        ActivationCache.record(model, batches(data[:8], 3), SITES, path=tmp_path / "c", progress=False)


def test_appending_more_data_of_the_same_order_extends_the_cache(model, tmp_path):
    data = examples(20)
    ActivationCache.record(model, batches(data[:9], 4), SITES, path=tmp_path / "c", progress=False)
    extended = ActivationCache.record(model, batches(data, 6), SITES, path=tmp_path / "c", progress=False)
    assert_same_rows(extended, ActivationCache.record(model, batches(data, 6), SITES, progress=False))


@pytest.mark.parametrize("other", ["other weights", "bfloat16", "one changed weight of a sampled tensor"])
def test_appending_with_a_model_of_other_weights_is_refused(model, tmp_path, other):
    data = examples()
    ActivationCache.record(model, batches(data[:8], 4), SITES, path=tmp_path / "c", progress=False)
    torch.manual_seed(1)
    if other == "other weights":
        second = ToyLM().eval()
    elif other == "bfloat16":
        second = ToyLM().eval()
        second.load_state_dict(model.state_dict())
        second = second.to(torch.bfloat16)
    else:
        second = ToyLM().eval()
        second.load_state_dict(model.state_dict())
        with torch.no_grad():
            second.head.bias[0] += 1.0
    assert type(second) is type(model)
    with pytest.raises(ActivationCacheError, match="other weights.*mix two models"):
        ActivationCache.record(second, batches(data, 4), SITES, path=tmp_path / "c", progress=False)
    same = ToyLM().eval()
    same.load_state_dict(model.state_dict())
    assert ActivationCache.record(same, batches(data, 4), SITES, path=tmp_path / "c", progress=False).examples == 13


def test_a_format_1_cache_loads_but_is_never_resumed(model, tmp_path):
    path = tmp_path / "c"
    data = examples()
    recorded = ActivationCache.record(model, batches(data[:8], 4), SITES, path=path, progress=False)
    header = json.loads((path / "cache.json").read_text())
    progress = json.loads((path / "progress.json").read_text())
    for record in (header, progress):
        del record["crc32"]
    header["format_version"] = 1
    del header["weights_fingerprint"]
    old_progress = {
        "rows": progress["rows"],
        "examples": progress["examples"],
        "hash": progress["data_order"],
        "chunks": [c["rows"] for c in progress["chunks"]],
    }
    (path / "cache.json").write_text(json.dumps(header))
    (path / "progress.json").write_text(json.dumps(old_progress))
    old = ActivationCache.load(path, verify="on_load")
    assert_same_rows(old, recorded, exact=True)
    with pytest.raises(ActivationCacheError, match="older tdsteer.*cannot be checked"):
        ActivationCache.record(model, batches(data, 4), SITES, path=path, progress=False)


def test_a_header_without_its_checksum_in_format_2_is_refused(model, tmp_path):
    path = tmp_path / "c"
    ActivationCache.record(model, batches(examples(), 4), SITES, path=path, progress=False)
    header = json.loads((path / "cache.json").read_text())
    del header["crc32"]
    (path / "cache.json").write_text(json.dumps(header))
    with pytest.raises(ActivationCacheError, match="checksum"):
        ActivationCache.load(path)
    (path / "cache.json").write_text(json.dumps(seal_json(header)))
    assert len(ActivationCache.load(path)) == 26
