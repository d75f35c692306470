"""Steering under ``generate()``: the KV cache must not change what gets steered.

Greedy generation with ``use_cache=True`` and ``use_cache=False`` gives the same tokens (and, in
float64, the same logits) under every position policy, on left-padded batches whose prompts differ
in length; and steering changes the output.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_tiny import generation_model, padded_prompts
from torch import nn

import tdsteer
import tdsteer_hf

MODELS = ["gpt2", "llama", "gpt_neox", "falcon"]
POLICIES: list[Any] = ["all", "prompt", "generated", "continuation", 2]
NEW_TOKENS = 6
PAD = 0


def prompts() -> dict[str, torch.Tensor]:
    """Three left-padded prompts of 7, 5 and 3 real tokens."""
    return padded_prompts([7, 5, 3], pad=PAD)


def model_for(model_type: str) -> nn.Module:
    return generation_model(model_type, pad=PAD)  # always generate NEW_TOKENS tokens


def generate(model: nn.Module, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation tokens ``[B, NEW_TOKENS]`` and their logits ``[NEW_TOKENS, B, vocab]``."""
    inputs = prompts()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """Describe the first generation step where the tokens of ``a`` and ``b`` differ."""
    for step in range(a.shape[1]):
        if not torch.equal(a[:, step], b[:, step]):
            rows = (a[:, step] != b[:, step]).nonzero().flatten().tolist()
            return f"first differing step {step}, rows {rows}: {a[:, step].tolist()} vs {b[:, step].tolist()}"
    return "no difference"


def steering_vector(model: nn.Module) -> dict[tdsteer.Site | str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    hidden = tdsteer_hf.describe(model).hidden_size
    chosen = [tdsteer_hf.sites(model, 0)[0], tdsteer_hf.sites(model, -1, kind="attn_out")[0]]
    vector: dict[tdsteer.Site | str, torch.Tensor] = {
        site: torch.randn(hidden, generator=generator, dtype=torch.float64) for site in chosen
    }
    return vector


@pytest.mark.parametrize("model_type", MODELS)
def test_unsteered_cache_baseline(model_type: str) -> None:
    """Without steering the two paths agree, so any difference below is the steering's."""
    model = model_for(model_type)
    cached, cached_logits = generate(model, use_cache=True)
    fresh, fresh_logits = generate(model, use_cache=False)
    assert torch.equal(cached, fresh), f"{model_type} unsteered: {first_difference(cached, fresh)}"
    torch.testing.assert_close(cached_logits, fresh_logits, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("positions", POLICIES, ids=str)
@pytest.mark.parametrize("model_type", MODELS)
def test_kv_cache_does_not_change_steering(model_type: str, positions: Any) -> None:
    model = model_for(model_type)
    vector = steering_vector(model)
    plain, plain_logits = generate(model, use_cache=True)
    with tdsteer.steer(model, vector, scale=8.0, positions=positions):
        cached, cached_logits = generate(model, use_cache=True)
        fresh, fresh_logits = generate(model, use_cache=False)
    where = f"{model_type}, positions={positions!r}"
    assert torch.equal(cached, fresh), f"{where}: use_cache=True vs False, {first_difference(cached, fresh)}"
    for step in range(NEW_TOKENS):
        assert torch.allclose(cached_logits[step], fresh_logits[step], rtol=1e-7, atol=1e-9), (
            f"{where}: logits with and without the KV cache differ first at step {step}"
        )
    # Steering did something.
    assert not torch.allclose(cached_logits, plain_logits), f"{where}: steering left the logits unchanged"
    if positions == "generated":
        # The prompt is not steered, so the first new token's logits are the unsteered ones.
        torch.testing.assert_close(cached_logits[0], plain_logits[0])
        assert not torch.allclose(cached_logits[1], plain_logits[1])
    else:
        assert not torch.allclose(cached_logits[0], plain_logits[0])
    # The hooks are gone once the context closes.
    after, _ = generate(model, use_cache=True)
    assert torch.equal(after, plain)


@pytest.mark.parametrize("model_type", MODELS)
def test_steering_changes_tokens(model_type: str) -> None:
    model = model_for(model_type)
    plain, _ = generate(model, use_cache=True)
    with tdsteer.steer(model, steering_vector(model), scale=8.0, positions="all"):
        steered, _ = generate(model, use_cache=True)
    assert not torch.equal(plain, steered), f"{model_type}: a scale-8 vector changed no generated token"


def test_from_k_leaves_earlier_positions_alone() -> None:
    """positions=k counts from each row's first real token: a prompt shorter than k is untouched."""
    model = model_for("llama")
    vector = steering_vector(model)
    plain, plain_logits = generate(model, use_cache=True)
    # Row 2 has 3 real prompt tokens: with k=3 only its generated tokens (real position >= 3) are
    # steered, so its first new token is unchanged; rows 0 and 1 (7 and 5 real tokens) are steered.
    with tdsteer.steer(model, vector, scale=8.0, positions=3):
        _, logits = generate(model, use_cache=True)
    torch.testing.assert_close(logits[0, 2], plain_logits[0, 2])
    assert not torch.allclose(logits[0, 0], plain_logits[0, 0])
    assert not torch.allclose(logits[0, 1], plain_logits[0, 1])
