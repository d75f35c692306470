"""CUDA-only: steering Hugging Face models on the GPU, in bf16, and inside generate()."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import build

import tdsteer
import tdsteer_hf

pytestmark = pytest.mark.gpu


def _prompts(device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], device=device)
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", 2])
def test_cuda_generation_same_with_and_without_cache(device, model_type, positions):
    model = build(model_type).to(device).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    site = tdsteer_hf.sites(model, layers=0)[0]
    vector = {site: torch.randn(model.config.hidden_size) * 4}
    outputs = []
    with tdsteer.steer(model, vector, scale=2.0, positions=positions):
        for use_cache in (True, False):
            out = model.generate(
                **_prompts(device), max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache
            )
            outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])


def test_bf16_steering_adds_exactly_the_cast_vector(device):
    model = build("llama").to(device, torch.bfloat16).eval()
    site = tdsteer_hf.sites(model, layers=-1, kind="resid_post")[0]
    v = torch.randn(model.config.hidden_size)
    inputs = _prompts(device)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        seen = {}
        # registered after any steering hook, so it sees the steered output
        handle = site.module(model).register_forward_hook(lambda m, a, o: seen.__setitem__("h", site.select(o)))
        try:
            logits = model(**inputs).logits
        finally:
            handle.remove()
        return seen["h"], logits

    with torch.no_grad():
        plain, unsteered_logits = run()
        with tdsteer.steer(model, {site: v}, scale=3.0):
            steered, logits = run()
    assert steered.dtype == torch.bfloat16
    torch.testing.assert_close(steered, plain + (3.0 * v).to(device, torch.bfloat16), atol=0, rtol=0)
    assert not torch.equal(logits, unsteered_logits)


def test_extract_then_steer_on_cuda_matches_cpu(device):
    model = build("gpt2").eval()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "positive": {
                "input_ids": torch.randint(4, 90, (4, 6), generator=generator),
                "attention_mask": torch.ones(4, 6, dtype=torch.long),
            },
            "negative": {
                "input_ids": torch.randint(4, 90, (4, 5), generator=generator),
                "attention_mask": torch.ones(4, 5, dtype=torch.long),
            },
        }
        for _ in range(2)
    ]
    sites = tdsteer_hf.sites(model, layers=[0, -1])
    cpu = tdsteer.extract(model, batches, sites, progress=False)
    gpu = tdsteer.extract(model.to(device), batches, sites, progress=False)
    for key in cpu:
        torch.testing.assert_close(gpu[key], cpu[key], atol=1e-4, rtol=1e-4)
