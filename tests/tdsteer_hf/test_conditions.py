"""Conditional steering (tdsteer.Condition): per row, decided on the prompt, kept while a sequence goes on."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tdsteer
from tdsteer_hf.demo import data_path, load_demo_model
from tdsteer_hf.tiny import tiny_gpt2

HIDDEN = 16


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_gpt2(vocab_size=64, n_layer=3, n_embd=HIDDEN, initializer_range=0.2, seed=0)


def _inputs(rows: int = 6, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (rows, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row in range(rows):
        mask[row, : row % 3] = 0  # left padding of 0, 1 or 2 tokens
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _condition_splitting_rows(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], *, like_generate: bool = False
) -> tuple[tdsteer.Condition, torch.Tensor]:
    """A condition at block 0 that half the rows meet, and which rows (from a plain forward; with
    ``like_generate``, with the position ids that ``generate`` gives left-padded rows)."""
    extra = {}
    if like_generate:
        extra["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        h0 = model(**inputs, **extra, output_hidden_states=True).hidden_states[1]  # output of transformer.h.0
    real = inputs["attention_mask"].unsqueeze(-1).float()
    reading = (h0 * real).sum(1) / real.sum(1)
    direction = reading[0] - reading[1:].mean(0)
    scores = F.cosine_similarity(reading, direction.unsqueeze(0), dim=-1)
    distinct = scores.unique()  # sorted; the threshold halfway between two of them, far from every score
    threshold = float(distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2
    met = scores > threshold
    assert 0 < int(met.sum()) < len(met)
    return tdsteer.Condition({"transformer.h.0": direction}, threshold), met


def test_rows_that_meet_the_condition_are_steered_exactly(model: torch.nn.Module) -> None:
    inputs = _inputs()
    condition, met = _condition_splitting_rows(model, inputs)
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states[2]  # output of transformer.h.1
        handle = tdsteer.steer(model, {"transformer.h.1": v}, scale=3.0, condition=condition)
        with handle:
            steered = model(**inputs, output_hidden_states=True).hidden_states[2]
    assert torch.equal(handle.condition_met, met)
    expected = plain + 3.0 * v * met.float().view(-1, 1, 1)
    torch.testing.assert_close(steered, expected, atol=0, rtol=0)
    assert torch.equal(steered[~met], plain[~met])


@pytest.mark.parametrize("positions", ["all", "generated", "from:5"])
def test_the_prompt_decides_and_the_kv_cache_does_not_matter(model: torch.nn.Module, positions: str) -> None:
    inputs = _inputs()
    condition, met = _condition_splitting_rows(model, inputs, like_generate=True)
    vectors = {f"transformer.h.{i}": torch.randn(HIDDEN, generator=torch.Generator().manual_seed(i)) for i in (1, 2)}

    def generate(**kwargs: object) -> torch.Tensor:
        return model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)

    plain = generate()
    with tdsteer.steer(model, vectors, scale=4.0, positions=positions):
        everyone = generate()
    handle = tdsteer.steer(model, vectors, scale=4.0, positions=positions, condition=condition)
    with handle, warnings.catch_warnings():
        warnings.simplefilter("error")  # every steered site runs after the condition site
        cached = generate(use_cache=True)
        assert torch.equal(handle.condition_met, met)  # decided on the prompt, not on generated tokens
        uncached = generate(use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[~met], plain[~met])
    assert torch.equal(cached[met], everyone[met])
    assert not torch.equal(everyone[met], plain[met])  # the test would not see a gate that lets nothing through


def test_sites_before_the_condition_site_are_not_steered_in_the_prompt_call(model: torch.nn.Module) -> None:
    inputs = _inputs()
    condition, met = _condition_splitting_rows(model, inputs)
    condition = tdsteer.Condition({"transformer.h.1": condition.direction}, condition.threshold)
    v = torch.randn(HIDDEN)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states
        with tdsteer.steer(model, {"transformer.h.0": v, "transformer.h.2": v}, condition=condition):
            with pytest.warns(UserWarning, match=r"'transformer.h.0' ran before the condition site 'transformer.h.1'"):
                steered = model(**inputs, output_hidden_states=True).hidden_states
    assert torch.equal(steered[1], plain[1])  # block 0: the gate was not decided yet
    assert torch.equal(steered[2], plain[2])  # so block 1, the condition site, read the plain stream


def test_a_condition_site_that_never_runs_warns(model: torch.nn.Module) -> None:
    model.add_module("unused", torch.nn.Linear(HIDDEN, HIDDEN))
    try:
        condition = tdsteer.Condition({"unused": torch.ones(HIDDEN)}, 0.0)
        with pytest.warns(UserWarning) as caught:
            with tdsteer.steer(model, {"transformer.h.1": torch.ones(HIDDEN)}, condition=condition):
                out = model(**_inputs()).logits
        messages = [str(w.message) for w in caught]
        assert any("condition site 'unused' never ran" in m for m in messages), messages
        assert torch.equal(out, model(**_inputs()).logits)  # nothing was steered
    finally:
        del model.unused


def test_bad_conditions_are_refused() -> None:
    v = torch.ones(HIDDEN)
    with pytest.raises(ValueError, match="reads one site, got 2"):
        tdsteer.Condition({"a": v, "b": v}, 0.1)
    with pytest.raises(ValueError, match="zero or not finite"):
        tdsteer.Condition({"a": torch.zeros(HIDDEN)}, 0.1)
    with pytest.raises(ValueError, match="must be a \\[C\\] tensor"):
        tdsteer.Condition({"a": torch.ones(2, HIDDEN)}, 0.1)
    with pytest.raises(ValueError, match="read='all' for a Condition"):
        tdsteer.Condition({"a": v}, 0.1, read="all")
    with pytest.raises(ValueError, match="threshold must be finite"):
        tdsteer.Condition({"a": v}, float("nan"))
    with pytest.raises(ValueError, match="is a module's input"):
        tdsteer.Condition({tdsteer.Site("transformer.h.1", io="input"): v}, 0.1)


def test_fit_learns_when_a_review_is_negative_on_the_demo_model() -> None:
    """A condition fitted on 150 reviews tells held-out negative reviews from positive ones, and
    steering towards positive then changes the continuations of the negative ones only."""
    demo, tokenizer = load_demo_model()
    records = [json.loads(line) for line in data_path("pairs").read_text().splitlines()]
    flipped = [{"positive": r["negative"], "negative": r["positive"]} for r in records]  # "meets": negative
    fit, held_out = flipped[:150], flipped[150:]
    from tdsteer_hf import contrastive_batches, sites

    site = sites(demo, layers=[0])[0]
    batches = contrastive_batches(tokenizer, fit, batch_size=32, position_ids=True)  # positions as generate has them
    condition = tdsteer.Condition.fit(demo, batches, site, read="last", progress=False)
    assert condition.accuracy == 1.0, condition
    held_out_batches = contrastive_batches(tokenizer, held_out, batch_size=32, position_ids=True)
    assert condition.evaluate(demo, held_out_batches, progress=False) >= 0.95

    texts = [r["positive"] for r in held_out[:8]] + [r["negative"] for r in held_out[:8]]  # 8 negative, 8 positive
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    vector = tdsteer.extract(demo, contrastive_batches(tokenizer, records, batch_size=32), [site], progress=False)
    handle = tdsteer.steer(demo, vector, scale=0.5, positions="generated", condition=condition)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        plain = demo.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        with handle:
            steered = demo.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    negative = torch.tensor([True] * 8 + [False] * 8)
    assert float((handle.condition_met == negative).float().mean()) >= 0.9
    met = handle.condition_met
    assert torch.equal(steered[~met], plain[~met])
    assert not torch.equal(steered[met], plain[met])


def test_a_condition_file_keeps_its_rule(model: torch.nn.Module, tmp_path: Path) -> None:
    inputs = _inputs()
    fitted = tdsteer.Condition.fit(
        model,
        [{"positive": {k: v[:3] for k, v in inputs.items()}, "negative": {k: v[3:] for k, v in inputs.items()}}],
        "transformer.h.0",
        read="last",
        progress=False,
    )
    path = fitted.save(tmp_path / "condition.safetensors")
    loaded = tdsteer.Condition.load(path)
    assert torch.equal(loaded.direction, fitted.direction) and loaded.site == fitted.site
    assert (loaded.threshold, loaded.above, loaded.read, loaded.accuracy) == (
        fitted.threshold,
        True,
        "last",
        fitted.accuracy,
    )
    assert loaded.metadata["model_type"] == "gpt2" and loaded.metadata["method"] == "mean_diff"
    h = torch.randn(6, 7, HIDDEN)
    assert torch.equal(loaded.score(h, None), fitted.score(h, None))
    plain_file = tdsteer.SteeringVector({"transformer.h.0": torch.ones(HIDDEN)}).save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="without a condition"):
        tdsteer.Condition.load(plain_file)


def test_a_condition_for_another_model_is_refused(model: torch.nn.Module) -> None:
    condition = tdsteer.Condition({"transformer.h.0": torch.ones(HIDDEN + 1)}, 0.0)
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    handle = tdsteer.steer(model, {"transformer.h.1": torch.ones(HIDDEN)}, condition=condition)
    with pytest.raises(ValueError, match=f"hidden size {HIDDEN + 1}, but the activation has {HIDDEN} channels"):
        with handle:
            model(**_inputs())
    assert not handle.is_open  # and every hook removed:
    assert hooks == [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    condition = tdsteer.Condition({"transformer.h.9": torch.ones(HIDDEN)}, 0.0)
    with pytest.raises(ValueError, match="transformer.h.9"):
        with tdsteer.steer(model, {"transformer.h.1": torch.ones(HIDDEN)}, condition=condition):
            pass


def test_nested_contexts_make_rules(model: torch.nn.Module) -> None:
    """ "If the condition holds steer with v1, else with v2": two contexts, one condition and its converse."""
    inputs = _inputs()
    condition, met = _condition_splitting_rows(model, inputs)
    converse = ~condition
    assert converse.site == condition.site and converse.threshold == condition.threshold and not converse.above
    v1, v2 = torch.randn(HIDDEN), torch.randn(HIDDEN)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states[2]  # output of transformer.h.1
        with (
            tdsteer.steer(model, {"transformer.h.1": v1}, scale=2.0, condition=condition),
            tdsteer.steer(model, {"transformer.h.1": v2}, scale=3.0, condition=converse),
        ):
            steered = model(**inputs, output_hidden_states=True).hidden_states[2]
    rows = met.float().view(-1, 1, 1)
    torch.testing.assert_close(steered, plain + rows * 2.0 * v1 + (1 - rows) * 3.0 * v2, atol=1e-6, rtol=0)


def test_a_new_threshold_applies_from_the_next_sequence(model: torch.nn.Module) -> None:
    inputs = _inputs()
    condition, met = _condition_splitting_rows(model, inputs)
    handle = tdsteer.steer(model, {"transformer.h.1": torch.ones(HIDDEN)}, condition=condition)
    with torch.no_grad(), handle:
        model(**inputs)
        assert torch.equal(handle.condition_met, met)
        condition.threshold = -1.5  # a cosine is at least -1: every row
        model(**inputs)
        assert bool(handle.condition_met.all())
