"""Mistakes in what a user hands the core get an error that names the thing and the fix, before any
wrong number is computed; hooks are removed."""

from __future__ import annotations

import pytest
import torch
from toy_models import ToyCNN, ToyLM, block_output, no_hooks

import tdsteer

IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[3, 5, 7, 9], [2, 4, 6, 8]])


def image_batches() -> list[dict[str, torch.Tensor]]:
    return [{"positive": IMAGES, "negative": -IMAGES}]


@pytest.mark.parametrize("read", ["spatial_mean", "mean", "last"])
def test_a_feature_map_read_as_tokens_is_refused(toy_cnn: ToyCNN, read: str) -> None:
    """A plain module path is a token site (NLC); a 4-D feature map read through it would be averaged
    over the wrong axes (the width taken for channels)."""
    with pytest.raises(ValueError, match=r"layout NLC .* a feature map: give the site its layout"):
        tdsteer.extract(toy_cnn, image_batches(), ["conv"], read=read, progress=False)
    assert no_hooks(toy_cnn)
    right = tdsteer.extract(toy_cnn, image_batches(), [tdsteer.Site("conv", layout="NCHW")], read=read, progress=False)
    assert right["conv"].shape == (4,)  # the channels


def test_a_feature_map_steered_as_tokens_is_refused(toy_cnn: ToyCNN) -> None:
    with (
        pytest.raises(ValueError, match="layout NLC .* a feature map"),
        tdsteer.steer(toy_cnn, {"conv": torch.ones(8)}),
    ):
        toy_cnn(IMAGES)
    assert no_hooks(toy_cnn)


def test_a_per_position_vector_on_a_feature_map_names_the_vector(toy_cnn: ToyCNN) -> None:
    site = tdsteer.Site("conv", layout="NCHW")
    with pytest.raises(ValueError, match=r"its vector is per position \(shape \(64, 4\)\)"):
        tdsteer.steer(toy_cnn, tdsteer.SteeringVector({site.key: torch.ones(64, 4)}, {site.key: site}))
    assert no_hooks(toy_cnn)


@pytest.mark.parametrize("layers", [1.0, "1,2"])
def test_layer_indices_of_the_wrong_type(layers: object) -> None:
    with pytest.raises(TypeError, match="indices must be an int, a slice, a range or a list"):
        tdsteer.take_indices(4, layers)  # type: ignore[arg-type]


def test_handle_set_with_a_bare_tensor(toy_lm: ToyLM) -> None:
    handle = tdsteer.steer(toy_lm, {"blocks.0": torch.ones(8)})
    with handle, pytest.raises(TypeError, match=r"handle.set\(vector=\{site_key: tensor\}\)"):
        handle.set(vector=torch.ones(8))  # type: ignore[arg-type]
    assert no_hooks(toy_lm)


def test_a_callable_object_with_three_arguments_is_an_operator(toy_lm: ToyLM) -> None:
    """``fn(h, v, scale)`` as a function or as an object's ``__call__``: the positions policy is applied around it."""

    class Shift:
        def __call__(self, h: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            return h + 3 * scale * v

    vector = torch.randn(8, generator=torch.Generator().manual_seed(1))
    plain = block_output(toy_lm, IDS)
    with tdsteer.steer(toy_lm, {"blocks.0": vector}, scale=0.5, operator=Shift(), positions="from:2"):
        steered = block_output(toy_lm, IDS)
    torch.testing.assert_close(steered[:, 2:], plain[:, 2:] + 1.5 * vector)
    assert torch.equal(steered[:, :2], plain[:, :2])


def test_an_operator_class_is_refused(toy_lm: ToyLM) -> None:
    with pytest.raises(TypeError, match=r"operator=Ablate is a class: pass an instance \(Ablate\(\)\)"):
        tdsteer.steer(toy_lm, {"blocks.0": torch.ones(8)}, operator=tdsteer.Ablate)  # type: ignore[arg-type]
    assert no_hooks(toy_lm)


def test_an_option_a_method_does_not_take(toy_lm: ToyLM) -> None:
    batches = [{"positive": IDS, "negative": IDS.flip(0)}]
    with pytest.raises(TypeError, match=r"Method 'mean_diff' takes no option 'l2'; its options: none"):
        tdsteer.extract(toy_lm, batches, ["blocks.0"], method="mean_diff", l2=0.1, progress=False)
    with pytest.raises(TypeError, match=r"Method 'probe' takes no option 'l3'; its options: l2, max_iter"):
        tdsteer.extract(toy_lm, batches, ["blocks.0"], method="probe", l3=0.1, progress=False)
    assert no_hooks(toy_lm)


def test_patches_on_sites_without_prefix_tokens_warns(toy_lm: ToyLM) -> None:
    """A plain path has no prefix tokens: 'patches' would steer a class token too; with them, no warning."""
    with pytest.warns(UserWarning, match="positions='patches' with sites that have no prefix tokens"):
        tdsteer.steer(toy_lm, {"blocks.0": torch.ones(8)}, positions="patches")
    site = tdsteer.Site("blocks.0", prefix_tokens=1)
    plain = block_output(toy_lm, IDS)
    with tdsteer.steer(
        toy_lm, tdsteer.SteeringVector({site.key: torch.ones(8)}, {site.key: site}), positions="patches"
    ):
        steered = block_output(toy_lm, IDS)
    assert torch.equal(steered[:, 0], plain[:, 0])
    torch.testing.assert_close(steered[:, 1:], plain[:, 1:] + 1)


def test_a_site_that_does_not_resolve_says_where_the_path_stops(toy_lm: ToyLM) -> None:
    with (
        pytest.raises(ValueError, match=r"'blocks' has no '7' \(it holds 3: '0', '1', '2'\)"),
        tdsteer.steer(toy_lm, {"blocks.7": torch.ones(8)}),
    ):
        pass
    with pytest.raises(ValueError, match=r"the model has no 'model' \(it holds 3: 'embed', 'blocks', 'head'\)"):
        tdsteer.extract(toy_lm, [{"positive": IDS, "negative": IDS.flip(0)}], ["model.layers.0"], progress=False)
    assert no_hooks(toy_lm)
