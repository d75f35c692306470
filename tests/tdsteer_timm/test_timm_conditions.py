"""Conditional steering of timm models: each image decides its own gate, token maps and feature maps alike."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import tdsteer
import tdsteer_timm


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}),
        ("resnet10t", {}),
    ],
)
def test_each_image_meets_the_condition_or_is_left_alone(name: str, kwargs: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    first, last = tdsteer_timm.sites(model, [0, -1], kind="stage" if name.startswith("resnet") else "block")
    images = torch.randn(6, 3, 32, 32)
    read = {}
    handle = model.get_submodule(first.path).register_forward_hook(lambda m, a, out: read.__setitem__("h", out))
    with torch.no_grad():
        plain = model(images)
    handle.remove()
    h = read["h"]
    reading = h.mean(dim=(2, 3)) if h.ndim == 4 else h.mean(dim=1)  # spatial mean / mean over tokens
    direction = reading[0] - reading.mean(0)
    scores = F.cosine_similarity(reading, direction.unsqueeze(0), dim=-1)
    distinct = scores.unique()
    threshold = float(distinct[2] + distinct[3]) / 2
    met = scores > threshold
    condition = tdsteer.Condition({first: direction}, threshold)
    read.clear()
    handle = model.get_submodule(last.path).register_forward_hook(lambda m, a, out: read.__setitem__("h", out))
    with torch.no_grad():
        model(images[:1])
    handle.remove()
    channels = read["h"].shape[1] if read["h"].ndim == 4 else read["h"].shape[-1]
    v = {last: 5 * torch.randn(channels)}
    with torch.no_grad():
        with tdsteer.steer(model, v):
            everyone = model(images)
        handle = tdsteer.steer(model, v, condition=condition)
        with handle:
            gated = model(images)
    assert torch.equal(handle.condition_met, met)
    torch.testing.assert_close(gated[met], everyone[met], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gated[~met], plain[~met], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(everyone[met], plain[met], atol=1e-3)
