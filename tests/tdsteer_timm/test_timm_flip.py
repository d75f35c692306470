"""The trained flip test: a class direction extracted from a small trained CNN and a small trained ViT
flips their predictions when added; a random direction of the same norm does not."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn

import tdsteer
import tdsteer_timm

SIZE = 32


def _images(label: int, count: int, generator: torch.Generator) -> Tensor:
    """Noise with a colour cast: class 0 is red over blue, class 1 blue over red."""
    x = torch.randn(count, 3, SIZE, SIZE, generator=generator) * 0.5
    cast = torch.tensor([0.8, 0.0, -0.8]) * (1 if label == 0 else -1)
    return x + cast.view(1, 3, 1, 1)


def _train(model: nn.Module, generator: torch.Generator, steps: int = 40) -> nn.Module:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = torch.cat([_images(0, 16, generator), _images(1, 16, generator)])
        y = torch.cat([torch.zeros(16), torch.ones(16)]).long()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


MODELS: list[tuple[str, dict[str, Any], str, str]] = [
    ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 32)}, "stage", "spatial_mean"),
    (
        "vit_tiny_patch16_224",
        {"img_size": SIZE, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        "block",
        "cls",
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "kind", "read"), MODELS, ids=["cnn", "vit"])
def test_a_class_direction_flips_predictions_and_a_random_one_does_not(
    name: str, kwargs: dict[str, Any], kind: str, read: str
) -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _train(timm.create_model(name, pretrained=False, num_classes=2, **kwargs), generator)
    red, blue = _images(0, 32, generator), _images(1, 32, generator)
    with torch.no_grad():
        assert (model(red).argmax(-1) == 0).float().mean() == 1 and (model(blue).argmax(-1) == 1).float().mean() == 1

    site = tdsteer_timm.sites(model, -1, kind=kind)[0]
    batches = tdsteer_timm.contrastive_batches(blue, red, batch_size=16)
    vector = tdsteer.extract(model, batches, [site], method="mean_diff", read=read, progress=False)
    tdsteer_timm.check_vector(vector, model, check="error")
    direction = vector[site.key]
    control = torch.randn(direction.shape, generator=generator)
    control = control * direction.norm() / control.norm()

    test = _images(0, 64, generator)
    with torch.no_grad():
        with tdsteer.steer(model, vector, scale=2.0):
            flipped = (model(test).argmax(-1) == 1).float().mean()
        with tdsteer.steer(model, {site: control}, scale=2.0):
            random_flipped = (model(test).argmax(-1) == 1).float().mean()
        unchanged = (model(test).argmax(-1) == 1).float().mean()
    assert flipped >= 0.9, f"the class direction flipped only {flipped:.0%} of red images"
    assert random_flipped <= 0.1, f"a random direction of the same norm flipped {random_flipped:.0%}"
    assert unchanged == 0
