"""CUDA-only checks: dtype casting, models split over devices, no host-device syncs in hooks."""

from __future__ import annotations

import pytest
import torch
from toy_models import ToyLM

import tdsteer
from tdsteer import steer

pytestmark = pytest.mark.gpu


class SplitLM(ToyLM):
    """Blocks spread over two devices, as ``device_map`` does: activations move between them."""

    def __init__(self, devices: list[torch.device]) -> None:
        super().__init__(layers=len(devices))
        self.devices = devices
        for block, device in zip(self.blocks, devices, strict=True):
            block.to(device)
        self.embed.to(devices[0])
        self.head.to(devices[-1])

    def forward(self, input_ids, attention_mask=None, cache=None, history=None):  # type: ignore[override]
        x = self.embed(input_ids.to(self.devices[0]))
        for block, device in zip(self.blocks, self.devices, strict=True):
            x = block(x.to(device))[0]
        return self.head(x)


def _block_output(model: ToyLM, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Output of a block as the next module sees it (captured after any steering hook)."""
    seen = {}
    handle = model.blocks[layer].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0]))
    try:
        model(ids)
    finally:
        handle.remove()
    return seen["h"]


def test_bf16_cuda_steering_is_exact(device):
    model = ToyLM().to(device, torch.bfloat16).eval()
    ids = torch.randint(0, 32, (4, 6), device=device)
    v = torch.randn(8)  # float32 on the CPU: cast once to the activation's dtype and device
    plain = _block_output(model, ids, 1)
    with steer(model, {"blocks.1": v}, scale=2.0):
        steered = _block_output(model, ids, 1)
    assert steered.dtype == torch.bfloat16 and steered.device.type == device.type
    torch.testing.assert_close(steered, plain + (2.0 * v).to(device, torch.bfloat16), atol=0, rtol=0)


def test_vectors_follow_each_module_device(device):
    model = SplitLM([device, torch.device("cpu"), device]).eval()
    ids = torch.randint(0, 32, (2, 5))
    v = {f"blocks.{i}": torch.randn(8) for i in range(3)}
    plain = model(ids)
    with steer(model, v, scale=1.5, positions=2):
        steered = model(ids)
    assert not torch.allclose(steered, plain)
    cpu_model = SplitLM([torch.device("cpu")] * 3).eval()
    cpu_model.load_state_dict({k: t.cpu() for k, t in model.state_dict().items()})
    with steer(cpu_model, v, scale=1.5, positions=2):
        reference = cpu_model(ids)
    torch.testing.assert_close(steered.cpu(), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["all", 2, "prompt"])
@pytest.mark.parametrize("operator", ["add", "ablate", "clamp", "add_norm"])
def test_hooks_never_synchronise(device, positions, operator):
    model = ToyLM().to(device).eval()
    ids = torch.randint(0, 32, (4, 6), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    scale = torch.tensor([1.0, -1.0, 2.0, 0.0], device=device)
    with steer(
        model,
        {"blocks.0": torch.randn(8), "blocks.2": torch.randn(8)},
        scale=scale,
        operator=operator,
        positions=positions,
    ):
        model(ids, attention_mask=mask)  # first call casts and caches the vectors
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_extraction_on_cuda_matches_cpu(device):
    torch.manual_seed(0)
    model = ToyLM().eval()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, 32, (4, 5), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        batches.append(
            {
                "positive": {"input_ids": ids, "attention_mask": mask},
                "negative": {"input_ids": ids.flip(1), "attention_mask": mask.flip(1)},
            }
        )
    cpu = tdsteer.extract(model, batches, ["blocks.1"], read="mean", progress=False)
    gpu = tdsteer.extract(model.to(device), batches, ["blocks.1"], read="mean", progress=False)
    torch.testing.assert_close(gpu["blocks.1"], cpu["blocks.1"], atol=1e-5, rtol=1e-5)


def test_conditional_hooks_never_synchronise(device):
    model = ToyLM().to(device).eval()
    ids = torch.randint(0, 32, (4, 6), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    condition = tdsteer.Condition({"blocks.0": torch.randn(8)}, 0.0)
    with steer(model, {"blocks.2": torch.randn(8)}, scale=2.0, condition=condition) as steered:
        steered(ids, attention_mask=mask)  # first call casts and caches the vectors
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steered(ids, attention_mask=mask)  # a new sequence: the condition reads the prompt again
        finally:
            torch.cuda.set_sync_debug_mode("default")
