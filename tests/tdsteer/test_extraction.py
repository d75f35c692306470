"""Extraction: readers, aggregators, padding, streaming, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import TensorDict
from toy_models import ToyLM

import tdsteer
from tdsteer import ActivationAddition, BatchKeys, Extraction, Site, extract
from tdsteer.reading import ReadContext, as_reader


def _pad(rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _states(model: ToyLM, rows: list[list[int]], layer: int) -> list[torch.Tensor]:
    """Block outputs of each example run alone, unpadded: the hand computation's input."""
    out = []
    for row in rows:
        seen: dict[str, torch.Tensor] = {}
        handle = model.blocks[layer].register_forward_hook(lambda m, a, o, _seen=seen: _seen.__setitem__("h", o[0]))
        model(torch.tensor([row]))
        handle.remove()
        out.append(seen["h"][0])
    return out


POS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 2]]
NEG = [[13, 14], [15, 16, 17, 18, 19], [20, 1], [21, 22, 23]]


class PerTokenLM(ToyLM):
    """No mixing between tokens, so padding cannot change a real token's state."""

    def forward(self, input_ids, attention_mask=None, cache=None, history=None):  # type: ignore[override]
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)[0]
        return self.head(x)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("read", ["last", "mean", 0, 1, -1, slice(0, 2)])
def test_mean_diff_equals_hand_computation(side, read):
    torch.manual_seed(0)
    model = PerTokenLM().eval()
    batches = [
        {"positive": _pad(POS[:2], side), "negative": _pad(NEG[:2], side)},
        {"positive": _pad(POS[2:], side), "negative": _pad(NEG[2:], side)},
    ]
    vector = extract(model, batches, ["blocks.1"], read=read, progress=False)

    def pick(h: torch.Tensor) -> torch.Tensor:
        if read == "last":
            return h[-1]
        if read == "mean":
            return h.mean(0)
        if isinstance(read, slice):
            return h[read].mean(0)
        return h[read]

    pos = torch.stack([pick(h) for h in _states(model, POS, 1)]).double()
    neg = torch.stack([pick(h) for h in _states(model, NEG, 1)]).double()
    expected = (pos.mean(0) - neg.mean(0)).float()
    torch.testing.assert_close(vector["blocks.1"], expected, atol=1e-6, rtol=1e-5)


def test_read_all_weights_every_real_token():
    torch.manual_seed(0)
    model = PerTokenLM().eval()
    batch = {"positive": _pad(POS, "left"), "negative": _pad(NEG, "right")}
    vector = extract(model, [batch], ["blocks.0"], read="all", progress=False)
    pos = torch.cat(_states(model, POS, 0)).double().mean(0)
    neg = torch.cat(_states(model, NEG, 0)).double().mean(0)
    torch.testing.assert_close(vector["blocks.0"], (pos - neg).float(), atol=1e-6, rtol=1e-5)


def test_per_example_index_reads_and_range_errors():
    torch.manual_seed(0)
    model = PerTokenLM().eval()
    batch = {
        "positive": _pad(POS[:2], "left"),
        "negative": _pad(NEG[:2], "left"),
        "positive_index": torch.tensor([1, 0]),
        "negative_index": torch.tensor([-1, 2]),
    }
    vector = extract(model, [batch], ["blocks.0"], read="index", progress=False)
    pos_states, neg_states = _states(model, POS[:2], 0), _states(model, NEG[:2], 0)
    pos = torch.stack([pos_states[0][1], pos_states[1][0]]).mean(0)
    neg = torch.stack([neg_states[0][-1], neg_states[1][2]]).mean(0)
    torch.testing.assert_close(vector["blocks.0"], pos - neg, atol=1e-6, rtol=1e-5)
    batch["positive_index"] = torch.tensor([3, 0])  # the first positive has 3 real tokens
    with pytest.raises(IndexError, match="outside the real tokens"):
        extract(model, [batch], ["blocks.0"], read="index", progress=False)


def test_padding_never_leaks_into_reads():
    h = torch.randn(2, 4, 3)
    h_poisoned = h.clone()
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    h_poisoned[mask == 0] = 1e6
    site = tdsteer.Site("x")
    for read in ["last", "first", "mean", 0, -1, slice(0, 2)]:
        reader = as_reader(read)
        a = reader(h, ReadContext(site, attention_mask=mask))
        b = reader(h_poisoned, ReadContext(site, attention_mask=mask))
        assert torch.equal(a, b), read


def _separable_batches(n_batches: int = 4, batch: int = 8, hidden: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    direction = torch.zeros(hidden)
    direction[0] = 1.0
    out = []
    for _ in range(n_batches):
        base = torch.randn(batch, hidden, generator=generator)
        strength = 1 + 2 * torch.rand(batch, 1, generator=generator)  # differences vary along the direction
        noise = 0.1 * torch.randn(batch, hidden, generator=generator)
        out.append({"positive": base + strength * direction + noise, "negative": base - strength * direction})
    return out, direction


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "probe"])
def test_methods_find_the_planted_direction(method):
    model = torch.nn.Sequential(torch.nn.Identity())
    batches, direction = _separable_batches()
    vector = extract(model, batches, ["0"], method=method, read="last", progress=False)
    v = vector["0"]
    cosine = torch.nn.functional.cosine_similarity(v, direction, dim=0)
    # the probe finds a separating direction, close to but not exactly the planted one
    assert cosine > (0.9 if method == "probe" else 0.98), (method, cosine)
    assert v @ direction > 0  # oriented from negative to positive
    assert vector.metadata["method"] == method


def test_pca_center_is_the_uncentred_moment_of_differences():
    model = torch.nn.Sequential(torch.nn.Identity())
    batches, _ = _separable_batches(n_batches=2)
    vector = extract(model, batches, ["0"], method="pca_center", progress=False)
    d = torch.cat([b["positive"] - b["negative"] for b in batches]).double()
    _, _, vh = torch.linalg.svd(d, full_matrices=False)
    top = vh[0] * torch.sign(vh[0] @ d.mean(0))
    expected = top * (d.mean(0) @ top)
    torch.testing.assert_close(vector["0"].double(), expected, atol=1e-5, rtol=1e-4)


def test_actadd_is_the_per_position_difference_of_one_pair():
    torch.manual_seed(0)
    model = PerTokenLM().eval()
    pos, neg = [[3, 4, 5]], [[6, 7, 8]]
    batch = {"positive": _pad(pos, "left"), "negative": _pad(neg, "right")}
    vector = extract(model, [batch], ["blocks.0"], method="actadd", read="all", progress=False)
    expected = _states(model, pos, 0)[0] - _states(model, neg, 0)[0]
    assert vector["blocks.0"].shape == (3, 8)
    torch.testing.assert_close(vector["blocks.0"], expected, atol=1e-6, rtol=1e-5)


def test_merged_shards_equal_one_pass():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6))
    batches, _ = _separable_batches(n_batches=6)
    for method in ("mean_diff", "pca_diff", "probe"):
        whole = Extraction(["0"], method).update(model, batches, progress=False)
        a = Extraction(["0"], method).update(model, batches[:2], progress=False)
        b = Extraction(["0"], method).update(model, batches[2:], progress=False)
        merged = a.merge(b)
        torch.testing.assert_close(merged.to_vector()["0"], whole.to_vector()["0"], atol=1e-6, rtol=1e-5)
        assert merged.num_examples == whole.num_examples == 48


def test_stop_early_reads_the_same_and_skips_later_layers(toy_lm):
    calls = []
    handle = toy_lm.head.register_forward_hook(lambda *a: calls.append(1))
    batch = {"positive": _pad(POS, "left"), "negative": _pad(NEG, "left")}
    fast = extract(toy_lm, [batch], ["blocks.0"], progress=False)
    assert calls == []
    full = extract(toy_lm, [batch], ["blocks.0"], progress=False, stop_early=False)
    assert len(calls) == 2
    handle.remove()
    assert torch.equal(fast["blocks.0"], full["blocks.0"])


def test_metadata_records_model_read_fingerprint(toy_lm):
    batch = {"positive": _pad(POS, "left"), "negative": _pad(NEG, "left")}
    v1 = extract(toy_lm, [batch], ["blocks.0", "blocks.2"], read="mean", progress=False)
    v2 = extract(toy_lm, [batch], ["blocks.0", "blocks.2"], read="mean", progress=False)
    batch["positive"]["input_ids"][0, -1] = 30
    v3 = extract(toy_lm, [batch], ["blocks.0", "blocks.2"], read="mean", progress=False)
    meta = v1.metadata
    assert meta["model_type"] == "ToyLM" and meta["read"] == "mean" and meta["num_examples"] == 4
    assert meta["hidden_sizes"] == {"blocks.0": 8, "blocks.2": 8}
    assert meta["data_fingerprint"] == v2.metadata["data_fingerprint"] != v3.metadata["data_fingerprint"]
    assert meta["tdsteer_version"] == tdsteer.__version__ and meta["created"]


def test_bad_data_gets_clear_errors(toy_lm):
    with pytest.raises(ValueError, match="data is empty"):
        extract(toy_lm, [], ["blocks.0"], progress=False)
    padded = _pad(POS, "left")
    padded["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"positive rows \[1\] of a batch are all padding"):
        extract(toy_lm, [{"positive": padded, "negative": _pad(NEG, "left")}], ["blocks.0"], progress=False)
    with pytest.raises(KeyError, match="missing"):
        extract(toy_lm, [{"chosen": padded}], ["blocks.0"], progress=False)
    with pytest.raises(ValueError, match="Unknown method"):
        extract(toy_lm, [{"positive": padded}], ["blocks.0"], method="magic", progress=False)
    with pytest.raises(ValueError, match="Unknown read position"):
        extract(toy_lm, [{"positive": padded}], ["blocks.0"], read="middle", progress=False)
    nan_model = torch.nn.Sequential(torch.nn.Identity())
    batch = {"positive": torch.full((2, 3), float("nan")), "negative": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="NaN"):
        extract(nan_model, [batch], ["0"], progress=False)
    assert all(not m._forward_hooks for m in nan_model.modules())


def test_renamed_batch_keys(toy_lm):
    keys = BatchKeys().set_keys(positive="chosen", negative="rejected")
    batch = {"chosen": _pad(POS, "left"), "rejected": _pad(NEG, "left")}
    renamed = extract(toy_lm, [batch], ["blocks.0"], keys=keys, progress=False)
    default = extract(
        toy_lm, [{"positive": batch["chosen"], "negative": batch["rejected"]}], ["blocks.0"], progress=False
    )
    assert torch.equal(renamed["blocks.0"], default["blocks.0"])
    with pytest.raises(ValueError, match="Unknown batch keys"):
        BatchKeys().set_keys(postive="x")


def test_activation_addition_tensordict_streams_over_ragged_batches(toy_lm):
    from tensordict.nn import TensorDictModule

    first = TensorDict({"positive": _pad(POS[:2], "left"), "negative": _pad(NEG[:2], "right")}, batch_size=[2])
    second = TensorDict({"positive": _pad(POS[2:], "left"), "negative": _pad(NEG[2:], "right")}, batch_size=[2])
    module = TensorDictModule(toy_lm, in_keys=["input_ids", "attention_mask"], out_keys=["logits"])
    method = ActivationAddition(["module.blocks.1"], read="last")
    with method.prepare(module) as hooked:
        hooked(first)
        out = hooked(second)
    batches = [
        {"positive": dict(td["positive"].items()), "negative": dict(td["negative"].items())} for td in (first, second)
    ]
    expected = extract(toy_lm, batches, ["blocks.1"], progress=False)
    torch.testing.assert_close(out["steer", "module.blocks.1"], expected["blocks.1"], atol=1e-6, rtol=1e-5)
    assert method.vector(toy_lm).metadata["num_examples"] == 4
    assert all(not m._forward_hooks for m in toy_lm.modules())
    # a new context starts from no data: its vector is the second batch's alone
    with method.prepare(module) as hooked:
        again = hooked(second)
    alone = extract(toy_lm, batches[1:], ["blocks.1"], progress=False)
    torch.testing.assert_close(again["steer", "module.blocks.1"], alone["blocks.1"], atol=1e-6, rtol=1e-5)
    assert method.vector(toy_lm).metadata["num_examples"] == 2


def test_steering_vectors_takes_a_steering_vector(toy_lm):
    vector = extract(
        toy_lm, [{"positive": _pad(POS, "left"), "negative": _pad(NEG, "left")}], ["blocks.1"], progress=False
    )
    ids = _pad(POS, "left")
    with tdsteer.steer(toy_lm, vector, scale=2.0):
        want = toy_lm(**ids)
    with tdsteer.SteeringVectors(["blocks.1"], vectors=vector, scale=2.0).prepare(toy_lm):
        got = toy_lm(**ids)  # the hooks are on the model itself
    assert torch.equal(got, want) and not torch.equal(got, toy_lm(**ids))


def test_cls_read_is_refused_before_any_forward_where_there_is_no_class_token():
    calls = []
    model = torch.nn.Sequential(torch.nn.Identity())
    model.register_forward_hook(lambda *_: calls.append(1))
    batches = [{"positive": torch.ones(2, 3, 4), "negative": torch.zeros(2, 3, 4)}]
    for site, alternative in [
        (Site("0", class_token=False), "read='patch_mean'"),
        (Site("0", layout="NCHW"), "read='spatial_mean'"),
    ]:
        with pytest.raises(ValueError, match=alternative):
            extract(model, batches, [site], read="cls", progress=False)
    assert calls == []
    read = extract(model, batches, [Site("0", class_token=True)], read="cls", progress=False)
    assert read["0"].tolist() == [1.0] * 4  # token 0 of the positives minus token 0 of the negatives


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "probe", "actadd"])
def test_no_contrast_warns_that_the_direction_is_all_zeros(method):
    model = torch.nn.Sequential(torch.nn.Identity())
    same = torch.randn(4, 3, 5)
    batches = [{"positive": same, "negative": same.clone()}]
    read = "all" if method == "actadd" else "last"
    with pytest.warns(UserWarning, match=rf"{method} direction is all zeros at 0.*no contrast"):
        vector = extract(model, batches, ["0"], method=method, read=read, progress=False)
    assert not vector["0"].any()
    different = [{"positive": same + 1, "negative": same}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(model, different, ["0"], method=method, read=read, progress=False)


class _ScalesInPlace(torch.nn.Module):
    """``inner``'s output is doubled in place after its hook ran, before ``after`` runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.after = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        h *= 2.0
        return self.after(h)


def _last_view(h, ctx):
    return h[:, -1]  # a view of the activation


@pytest.mark.parametrize(
    ("read", "take"),
    [("all", lambda x: x.flatten(0, 1)), (_last_view, lambda x: x[:, -1])],
    ids=["all", "custom-view"],
)
def test_a_reading_is_what_the_module_output_not_a_view_changed_later(read, take):
    torch.manual_seed(0)
    model = _ScalesInPlace()
    batch = {"positive": torch.randn(4, 5, 3), "negative": torch.randn(4, 5, 3)}
    with torch.no_grad():
        pos, neg = model.inner(batch["positive"]), model.inner(batch["negative"])  # what inner returned
    vector = extract(model, [batch], ["inner", "after"], read=read, progress=False)
    torch.testing.assert_close(vector["inner"], take(pos).mean(0) - take(neg).mean(0), atol=1e-6, rtol=1e-5)


def test_patch_mean_goes_through_the_attention_mask_after_the_prefix_tokens():
    """Padded token sequences: the mean over the real tokens after the first ``prefix_tokens`` real
    ones (the padding and the prefix never enter it); without a mask, every token after the prefix."""
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])  # left and right padding
    poisoned = h.clone()
    poisoned[mask == 0] = 1e6
    for read in ("patch_mean", "spatial_mean"):
        reader = as_reader(read)
        got = reader(poisoned, ReadContext(Site("x", prefix_tokens=1), attention_mask=mask))
        torch.testing.assert_close(got, torch.stack([h[0, 3:].mean(0), h[1, 1:4].mean(0)]))
        text = reader(poisoned, ReadContext(Site("x"), attention_mask=mask))  # no prefix: read="mean"
        torch.testing.assert_close(text, as_reader("mean")(h, ReadContext(Site("x"), attention_mask=mask)))
        unmasked = reader(h, ReadContext(Site("x", prefix_tokens=1)))
        torch.testing.assert_close(unmasked, h[:, 1:].mean(1))
