"""Steering faults a hostile user finds (issue 12): each is refused clearly or handled, and leaks nothing."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from toy_models import ToyCNN, ToyLM, block_output

import tdsteer
from tdsteer import Site, SteeringVectors
from tdsteer.hooking import generate_trackers


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _clean(model: torch.nn.Module) -> bool:
    return _hook_count(model) == 0 and "generate" not in model.__dict__


# -- 1. non-finite scales, wherever a scale enters --------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_float_scale_is_refused_everywhere(toy_lm: ToyLM, bad: float) -> None:
    v = {"blocks.0": torch.randn(8)}
    with pytest.raises(ValueError, match="scale must be finite"):
        tdsteer.steer(toy_lm, v, scale=bad)
    with pytest.raises(ValueError, match="scale must be finite"):
        SteeringVectors(["blocks.0"], vectors=v, scale=bad)
    handle = tdsteer.steer(toy_lm, v, scale=1.0)
    with handle:
        with pytest.raises(ValueError, match="scale must be finite"):
            handle.set(scale=bad)
        assert handle.scale == 1.0  # unchanged by the refused value
        assert torch.isfinite(toy_lm(torch.randint(0, 32, (1, 3)))).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        handle.set(scale=torch.tensor([1.0, bad]))
    with pytest.raises(TypeError, match="scale must be a float"):
        handle.set(scale="2")  # type: ignore[arg-type]
    assert _clean(toy_lm)


def test_a_refused_set_changes_nothing(toy_lm: ToyLM) -> None:
    handle = tdsteer.steer(toy_lm, {"blocks.0": torch.randn(8)}, positions="prompt")
    with pytest.raises(ValueError, match="scale must be finite"):
        handle.set(positions="generated", scale=math.nan)
    assert handle.factory.policy.kind == "prompt"


# -- 2. containers and modules that never run --------------------------------------------------------


def test_a_module_list_site_is_refused_with_the_block_path(toy_lm: ToyLM) -> None:
    with (
        pytest.raises(ValueError, match=r"'blocks' is a ModuleList.*'blocks\.0'") as info,
        tdsteer.steer(toy_lm, {"blocks": torch.randn(8)}),
    ):
        pass
    assert "never calls" in str(info.value)
    assert _clean(toy_lm)


def test_a_module_dict_site_is_refused(toy_lm: ToyLM) -> None:
    toy_lm.extra = torch.nn.ModuleDict({"first": torch.nn.Linear(8, 8)})
    with (
        pytest.raises(ValueError, match=r"ModuleDict.*'extra\.first'"),
        tdsteer.steer(toy_lm, {"extra": torch.randn(8)}),
    ):
        pass
    assert _clean(toy_lm)


def test_a_site_that_never_runs_warns_on_exit(toy_lm: ToyLM) -> None:
    toy_lm.unused = torch.nn.Linear(8, 8)
    v = torch.randn(8)
    with pytest.warns(UserWarning, match=r"\['unused'\] never ran.*'blocks\.0' ran 1 time"):
        with tdsteer.steer(toy_lm, {"blocks.0": v, "unused": v}):
            toy_lm(torch.randint(0, 32, (1, 3)))
    with warnings.catch_warnings():  # every site ran, or none did: nothing to say
        warnings.simplefilter("error")
        with tdsteer.steer(toy_lm, {"blocks.0": v, "blocks.2": v}):
            toy_lm(torch.randint(0, 32, (1, 3)))
        with tdsteer.steer(toy_lm, {"blocks.0": v, "unused": v}):
            pass
    assert _clean(toy_lm)


# -- 3. contexts exited in any order -----------------------------------------------------------------


POLICIES = ["generated", "prompt", "continuation"]


def _steered_generate(model: ToyLM, ids: torch.Tensor, vectors: list[torch.Tensor], which: list[int]) -> torch.Tensor:
    handles = [tdsteer.steer(model, {f"blocks.{i}": vectors[i]}, scale=2.0, positions=POLICIES[i]) for i in which]
    for handle in handles:
        handle.__enter__()
    try:
        return model.generate(ids, max_new_tokens=3)
    finally:
        for handle in reversed(handles):
            handle.__exit__(None, None, None)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_generate_wrapping_survives_any_exit_order(toy_lm: ToyLM, order: tuple[int, ...]) -> None:
    ids = torch.randint(0, 32, (2, 4))
    vectors = [torch.randn(8) * 3 for _ in range(3)]
    reference = copy.deepcopy(toy_lm)
    handles = [tdsteer.steer(toy_lm, {f"blocks.{i}": vectors[i]}, scale=2.0, positions=POLICIES[i]) for i in range(3)]
    for handle in handles:
        handle.__enter__()
    open_now = [0, 1, 2]
    for index in order:
        handles[index].__exit__(None, None, None)
        open_now.remove(index)
        assert list(generate_trackers(toy_lm)) == [handles[i].factory.tracker for i in open_now]
        # what is still open steers exactly as the same contexts opened afresh on a copy
        got = toy_lm.generate(ids, max_new_tokens=3)
        assert torch.equal(got, _steered_generate(reference, ids, vectors, open_now))
    assert _clean(toy_lm)


def test_a_user_generate_attribute_is_restored(toy_lm: ToyLM) -> None:
    def mine(*args: object, **kwargs: object) -> str:
        return "mine"

    object.__setattr__(toy_lm, "generate", mine)
    a = tdsteer.steer(toy_lm, {"blocks.0": torch.randn(8)}, positions="generated")
    b = tdsteer.steer(toy_lm, {"blocks.1": torch.randn(8)}, positions="generated")
    a.__enter__()
    b.__enter__()
    assert toy_lm.generate() == "mine"
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert toy_lm.__dict__["generate"] is mine


# -- 6. training a learnable vector inside one context ----------------------------------------------


def test_training_a_vector_for_several_steps_in_one_context(toy_lm: ToyLM) -> None:
    torch.manual_seed(1)
    for p in toy_lm.parameters():
        p.requires_grad_(False)
    vector = torch.nn.Parameter(torch.zeros(8))
    optimizer = torch.optim.SGD([vector], lr=0.5)
    ids = torch.randint(0, 32, (4, 5))
    target = torch.full((4, 5), 7)
    losses = []
    with tdsteer.steer(toy_lm, {"blocks.1": vector}, scale=2.0):
        for _ in range(6):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(toy_lm(ids).flatten(0, 1), target.flatten())
            loss.backward()
            assert vector.grad is not None and vector.grad.abs().sum() > 0
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():  # after the steps, inference sees the trained values
            steered = toy_lm(ids)
    with torch.no_grad(), tdsteer.steer(toy_lm, {"blocks.1": vector.detach().clone()}, scale=2.0):
        assert torch.equal(steered, toy_lm(ids))
    assert losses[-1] < losses[0]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))


def test_an_in_place_change_of_the_vector_applies_from_the_next_call(toy_lm: ToyLM) -> None:
    v = torch.ones(8)
    ids = torch.randint(0, 32, (1, 3))
    plain = block_output(toy_lm, ids)
    with tdsteer.steer(toy_lm, {"blocks.0": v}):
        first = block_output(toy_lm, ids)
        v.mul_(3)
        second = block_output(toy_lm, ids)
    torch.testing.assert_close(first - plain, torch.ones_like(plain), rtol=0, atol=1e-6)
    torch.testing.assert_close(second - plain, torch.full_like(plain, 3.0), rtol=0, atol=1e-6)


# -- 7. one handle, entered twice --------------------------------------------------------------------


def test_entering_an_open_handle_again_is_a_clear_error(toy_lm: ToyLM) -> None:
    handle = tdsteer.steer(toy_lm, {"blocks.0": torch.randn(8)}, positions="generated")
    with handle:
        with pytest.raises(RuntimeError, match=r"already open: exit it first, or make a new one with tdsteer\.steer"):
            handle.__enter__()
        assert handle.is_open and _hook_count(toy_lm) == 3  # the open context is untouched
    assert _clean(toy_lm)
    with handle:  # closed: it opens again
        pass
    factory = SteeringVectors(["blocks.0"], vectors={"blocks.0": torch.randn(8)})
    with factory.prepare(toy_lm), pytest.raises(RuntimeError, match="already open on a model"), factory.prepare(toy_lm):
        pass
    assert _clean(toy_lm)


# -- 9. feature maps and token policies ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("positions", [2, "from:1", "prompt", "generated", "continuation"])
def test_token_policies_are_refused_on_feature_maps(toy_cnn: ToyCNN, layout: str, positions: object) -> None:
    site = Site("conv", layout=layout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"feature map \\(layout {layout}\\), which has no token positions"):
        tdsteer.steer(toy_cnn, {site: torch.randn(4)}, positions=positions)  # type: ignore[arg-type]
    handle = tdsteer.steer(toy_cnn, {site: torch.randn(4)}, track_positions=True)
    with handle, pytest.raises(ValueError, match="no token positions"):
        handle.set(positions=positions)  # type: ignore[arg-type]
    assert _clean(toy_cnn)


def test_a_feature_map_behind_a_token_site_is_a_clear_error() -> None:
    # a plain path means layout NLC; a 4-D activation with a token policy must not mask image rows
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1))
    with (
        tdsteer.steer(conv, {"0": torch.randn(5)}, positions=1),
        pytest.raises(ValueError, match=r"layout NLC .* a feature map: give the site its layout"),
    ):
        conv(torch.randn(2, 3, 5, 5))  # [2, 5, 5, 5]: the last dimension even matches the vector
    assert _clean(conv)
