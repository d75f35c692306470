"""``output_hidden_states=True`` inside a steering context reports the steered residual stream (issue 12).

Transformers 5 records hidden states with its own forward hooks on the decoder blocks. tdsteer's hooks
run before them, so the state recorded at a steered layer is the steered one, consistent with what
the later layers see, whether transformers installed its recorders before the context opened or
during its first call inside it.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import build
from torch import nn

import tdsteer
import tdsteer_hf

MODELS = ["gpt2", "llama", "gpt_neox", "qwen2", "falcon"]
SCALE = 3.0


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 90, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _block_outputs(model: nn.Module, sites: list[tdsteer.Site], **inputs: torch.Tensor) -> tuple[list, object]:
    """Each site's block output (read by a hook registered last) and the model's output."""
    seen: list[torch.Tensor] = []
    handles = [
        model.get_submodule(site.path).register_forward_hook(
            lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        )
        for site in sites
    ]
    try:
        with torch.no_grad():
            output = model(**inputs, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


@pytest.mark.parametrize("recorders_first", [True, False], ids=["recorders-installed-before", "first-call-inside"])
@pytest.mark.parametrize("model_type", MODELS)
def test_hidden_states_include_the_steering(model_type: str, recorders_first: bool) -> None:
    model = build(model_type).double()
    inputs = _inputs()
    site = tdsteer_hf.sites(model, 0)[0]
    vector = torch.randn(tdsteer_hf.describe(model).hidden_size, dtype=torch.float64)
    if recorders_first:
        _, plain = _block_outputs(model, [site], **inputs)
    with tdsteer.steer(model, {site: vector}, scale=SCALE):
        (steered_block,), steered = _block_outputs(model, [site], **inputs)
    if not recorders_first:
        _, plain = _block_outputs(model, [site], **inputs)
    recorded = steered.hidden_states[1]  # the output of layer 0 (index 0 is the embeddings)
    torch.testing.assert_close(recorded, steered_block, rtol=0, atol=0)
    torch.testing.assert_close(recorded - plain.hidden_states[1], (SCALE * vector).expand_as(recorded))
    # the embeddings are untouched and the later layers carry the steering on
    torch.testing.assert_close(steered.hidden_states[0], plain.hidden_states[0], rtol=0, atol=0)
    assert not torch.allclose(steered.hidden_states[2], plain.hidden_states[2])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_nested_contexts_are_recorded_in_nesting_order(model_type: str) -> None:
    model = build(model_type).double()
    inputs = _inputs()
    site = tdsteer_hf.sites(model, 0)[0]
    hidden = tdsteer_hf.describe(model).hidden_size
    a, b = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    _, plain = _block_outputs(model, [site], **inputs)
    with (
        tdsteer.steer(model, {site: a}),
        tdsteer.steer(model, {site: b}, operator="ablate"),  # applied after a: no component along b is left
    ):
        (block,), both = _block_outputs(model, [site], **inputs)
    recorded = both.hidden_states[1]
    torch.testing.assert_close(recorded, block, rtol=0, atol=0)
    unit = b / b.norm()
    assert (recorded @ unit).abs().max() < 1e-9
    expected = plain.hidden_states[1] + a
    expected = expected - (expected @ unit).unsqueeze(-1) * unit
    torch.testing.assert_close(recorded, expected)
