"""Steering a model that accelerate places across devices or offloads to disk: the same as in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tdsteer
import tdsteer_hf
from tdsteer_hf.tiny import save_tiny_gpt2

TEXTS = ["I love this movie", "I hate this movie", "the food was great", "the food was awful"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("model"), TEXTS, n_layer=4, n_positions=32)


def _logits(model: torch.nn.Module, vector: tdsteer.SteeringVector | None, scale: float) -> torch.Tensor:
    inputs = torch.tensor([[3, 4, 5, 6, 7], [7, 6, 5, 4, 3]])
    with torch.no_grad():
        if vector is None:
            return model(input_ids=inputs).logits
        with tdsteer.steer(model, vector, scale=scale):
            return model(input_ids=inputs).logits


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_layers_steer_exactly_as_in_memory(model_dir: Path, tmp_path: Path, offload: str) -> None:
    pytest.importorskip("accelerate")
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # Half the blocks live elsewhere: accelerate's hooks bring their weights in for each forward.
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    device_map |= {f"transformer.h.{i}": ("cpu" if i < 2 else offload) for i in range(4)}
    placed = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    if offload == "disk":
        assert any(p.device.type == "meta" for p in placed.transformer.h[3].parameters())
    generator = torch.Generator().manual_seed(0)
    sites = tdsteer_hf.sites(reference, [1, 3])  # one block in memory, one offloaded
    vector = tdsteer.SteeringVector({s.key: torch.randn(32, generator=generator) for s in sites})
    plain = _logits(reference, None, 0.0)
    torch.testing.assert_close(_logits(placed, None, 0.0), plain, atol=1e-5, rtol=1e-5)
    steered = _logits(reference, vector, 4.0)
    assert not torch.allclose(steered, plain, atol=1e-3)
    torch.testing.assert_close(_logits(placed, vector, 4.0), steered, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(placed, None, 0.0), plain, atol=1e-5, rtol=1e-5)  # hooks gone
