"""Applying vectors: operators, positions, per-row scales, nesting, cleanup."""

from __future__ import annotations

import functools

import pytest
import torch
from toy_models import block_output, no_hooks

import tdsteer
from tdsteer import Site, SteeringVector, SteeringVectors, steer

_block_output = functools.partial(block_output, layer=1)  # these tests read block 1 unless told


def test_add_changes_output_by_exactly_scale_v(toy_lm, device):
    model = toy_lm.to(device)
    ids = torch.randint(0, 32, (2, 5), device=device)
    v = torch.randn(8, device=device)
    plain = _block_output(model, ids)
    with steer(model, {"blocks.1": v}, scale=3.0):
        steered = _block_output(model, ids)
    torch.testing.assert_close(steered - plain, (3.0 * v).expand_as(plain), rtol=0, atol=1e-6)
    assert no_hooks(model)


def test_positions_from_k_touch_only_those_tokens(toy_lm):
    ids = torch.randint(0, 32, (2, 6))
    v = torch.randn(8)
    plain = _block_output(toy_lm, ids, layer=0)
    with steer(toy_lm, {"blocks.0": v}, scale=2.0, positions=3):
        steered = _block_output(toy_lm, ids, layer=0)
    delta = steered - plain
    torch.testing.assert_close(delta[:, 3:], (2.0 * v).expand(2, 3, 8), rtol=0, atol=1e-6)
    assert torch.equal(delta[:, :3], torch.zeros(2, 3, 8))


def test_from_k_counts_from_the_first_real_token_under_left_padding(toy_lm):
    ids = torch.randint(1, 32, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    v = torch.randn(8)
    plain = _block_output(toy_lm, ids, layer=0, attention_mask=mask)
    with steer(toy_lm, {"blocks.0": v}, positions="from:2"):
        steered = _block_output(toy_lm, ids, layer=0, attention_mask=mask)
    changed = (steered - plain).abs().sum(-1) > 0
    assert changed.tolist() == [[False, False, False, False, True, True], [False, False, True, True, True, True]]


def test_ablate_leaves_zero_projection(toy_lm):
    ids = torch.randint(0, 32, (3, 4))
    v = torch.randn(8)
    with steer(toy_lm, {"blocks.2": v}, operator="ablate"):
        steered = _block_output(toy_lm, ids, layer=2)
    projection = steered @ (v / v.norm())
    assert projection.abs().max() < 1e-5
    assert steered.abs().max() > 0.1


def test_clamp_sets_projection_to_value(toy_lm):
    ids = torch.randint(0, 32, (3, 4))
    v = torch.randn(8)
    with steer(toy_lm, {"blocks.1": v}, operator=tdsteer.Clamp(2.5)):
        steered = _block_output(toy_lm, ids)
    torch.testing.assert_close(steered @ (v / v.norm()), torch.full((3, 4), 2.5), rtol=0, atol=1e-5)
    # operator="clamp" sets the projection to that of scale * v
    with steer(toy_lm, {"blocks.1": v}, operator="clamp", scale=-1.5):
        steered = _block_output(toy_lm, ids)
    torch.testing.assert_close(steered @ (v / v.norm()), torch.full((3, 4), -1.5 * v.norm().item()), atol=1e-5, rtol=0)


def test_add_norm_keeps_token_norms(toy_lm):
    ids = torch.randint(0, 32, (2, 4))
    v = torch.randn(8) * 5
    plain = _block_output(toy_lm, ids)
    with steer(toy_lm, {"blocks.1": v}, operator="add_norm", scale=2.0):
        steered = _block_output(toy_lm, ids)
    torch.testing.assert_close(steered.norm(dim=-1), plain.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, plain)


def test_custom_callable_operator_respects_positions(toy_lm):
    ids = torch.randint(0, 32, (1, 5))
    plain = _block_output(toy_lm, ids)
    with steer(toy_lm, {"blocks.1": torch.ones(8)}, operator=lambda h, v, s: torch.zeros_like(h), positions=2):
        steered = _block_output(toy_lm, ids)
    assert torch.equal(steered[:, 2:], torch.zeros(1, 3, 8))
    assert torch.equal(steered[:, :2], plain[:, :2])


def test_per_row_scales_equal_separate_runs(toy_lm):
    ids = torch.randint(0, 32, (1, 5)).expand(3, 5)
    v = torch.randn(8)
    scales = [-2.0, 0.0, 2.0]
    with steer(toy_lm, {"blocks.1": v}, scale=torch.tensor(scales)):
        batched = toy_lm(ids)
    for row, scale in enumerate(scales):
        with steer(toy_lm, {"blocks.1": v}, scale=scale):
            single = toy_lm(ids[:1])
        torch.testing.assert_close(batched[row : row + 1], single, rtol=0, atol=1e-6)


def test_per_row_scale_of_wrong_length_is_refused(toy_lm):
    with steer(toy_lm, {"blocks.1": torch.randn(8)}, scale=torch.ones(4)), pytest.raises(ValueError, match="4 values"):
        toy_lm(torch.randint(0, 32, (3, 5)))
    assert no_hooks(toy_lm)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "continuation", 2, "from:6"])
def test_generation_same_with_and_without_cache(toy_lm, positions):
    ids = torch.randint(0, 32, (2, 4))
    v = torch.randn(8) * 4
    plain = toy_lm.generate(ids, max_new_tokens=5)
    with steer(toy_lm, {"blocks.0": v, "blocks.2": -v}, scale=3.0, positions=positions):
        cached = toy_lm.generate(ids, max_new_tokens=5, use_cache=True)
        uncached = toy_lm.generate(ids, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)
    assert no_hooks(toy_lm)


def test_prompt_and_generated_split_the_tokens(toy_lm):
    ids = torch.randint(0, 32, (1, 4))
    v = torch.randn(8) * 4
    touched: dict[str, list[int]] = {}
    for policy in ("prompt", "generated"):
        positions: list[int] = []

        def record(h, vec, scale, _positions=positions):
            _positions.append(h.shape[1])
            return h + vec

        with steer(toy_lm, {"blocks.0": v}, operator=record, positions=policy):
            toy_lm.generate(ids, max_new_tokens=3, use_cache=True)
        touched[policy] = positions
    # the custom operator is called only when some token of the call is selected
    assert touched["prompt"] == [4]
    assert touched["generated"] == [1, 1]


def test_plain_forward_has_no_generated_tokens(toy_lm):
    ids = torch.randint(0, 32, (2, 4))
    plain = toy_lm(ids)
    with steer(toy_lm, {"blocks.0": torch.randn(8)}, scale=5.0, positions="generated"):
        assert torch.equal(toy_lm(ids), plain)
    with steer(toy_lm, {"blocks.0": torch.randn(8)}, scale=5.0, positions="prompt"):
        assert not torch.equal(toy_lm(ids), plain)


def test_contexts_nest_and_compose(toy_lm):
    ids = torch.randint(0, 32, (2, 3))
    a, b = torch.randn(8), torch.randn(8)
    plain = _block_output(toy_lm, ids)
    with steer(toy_lm, {"blocks.1": a}), steer(toy_lm, {"blocks.1": b}, scale=2.0):
        both = _block_output(toy_lm, ids)
        torch.testing.assert_close(both - plain, (a + 2 * b).expand_as(plain), atol=1e-6, rtol=0)
    assert no_hooks(toy_lm)


def test_hooks_removed_after_exception(toy_lm):
    with pytest.raises(RuntimeError, match="boom"), steer(toy_lm, {"blocks.1": torch.randn(8)}, positions="prompt"):
        toy_lm.generate(torch.randint(0, 32, (1, 3)), max_new_tokens=1)
        raise RuntimeError("boom")
    assert no_hooks(toy_lm)


def test_hooks_removed_after_error_inside_hook(toy_lm):
    with pytest.raises(ValueError, match="hidden size 5"), steer(toy_lm, {"blocks.1": torch.randn(5)}):
        toy_lm(torch.randint(0, 32, (1, 3)))
    assert no_hooks(toy_lm)


def test_hidden_size_mismatch_names_site_and_sizes(toy_lm):
    with steer(toy_lm, {"blocks.1": torch.randn(5)}), pytest.raises(ValueError) as info:
        toy_lm(torch.randint(0, 32, (1, 3)))
    message = str(info.value)
    assert "blocks.1" in message and "hidden size 5" in message and "8 channels" in message


def test_unknown_site_operator_and_policy_are_clear_errors(toy_lm):
    with pytest.raises(ValueError, match="blocks.9"), steer(toy_lm, {"blocks.9": torch.randn(8)}):
        pass
    assert no_hooks(toy_lm)
    with (
        pytest.raises(ValueError, match="Unknown operator 'shove'"),
        steer(toy_lm, {"blocks.1": torch.randn(8)}, operator="shove"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="Unknown position policy 'middle'"),
        steer(toy_lm, {"blocks.1": torch.randn(8)}, positions="middle"),
    ):
        pass
    with pytest.raises(ValueError, match="NaN"), steer(toy_lm, {"blocks.1": torch.full((8,), float("nan"))}):
        pass
    assert no_hooks(toy_lm)


def test_vector_cast_once_to_activation_dtype(toy_lm):
    model = toy_lm.to(torch.bfloat16)
    ids = torch.randint(0, 32, (2, 3))
    v = torch.randn(8, dtype=torch.float64)
    plain = _block_output(model, ids)
    with steer(model, {"blocks.1": v}):
        steered = _block_output(model, ids)
    assert steered.dtype == torch.bfloat16
    torch.testing.assert_close(steered, plain + v.to(torch.bfloat16), atol=0, rtol=0)


def test_model_type_mismatch_warns_or_errors(toy_lm):
    vector = SteeringVector({"blocks.1": torch.randn(8)}, metadata={"model_type": "llama"})
    with pytest.warns(UserWarning, match="model type 'llama'"), steer(toy_lm, vector):
        pass
    with pytest.raises(ValueError, match="model type 'llama'"), steer(toy_lm, vector, check="error"):
        pass
    assert no_hooks(toy_lm)


def test_per_position_vector_is_added_at_real_positions(toy_lm):
    ids = torch.randint(1, 32, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    v = torch.randn(2, 8)
    plain = _block_output(toy_lm, ids, layer=0, attention_mask=mask)
    with steer(toy_lm, {"blocks.0": v}):
        steered = _block_output(toy_lm, ids, layer=0, attention_mask=mask)
    delta = steered - plain
    torch.testing.assert_close(delta[0, 1:3], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(delta[1, 0:2], v, atol=1e-6, rtol=0)
    assert delta[0, [0, 3, 4]].abs().max() == 0 and delta[1, 2:].abs().max() == 0


def test_input_site_steers_the_block_input(toy_lm):
    ids = torch.randint(0, 32, (1, 3))
    v = torch.randn(8)
    site = Site("blocks.1", io="input")
    before = _block_output(toy_lm, ids, layer=0)
    with steer(toy_lm, {site: v}):
        after_input = _block_output(toy_lm, ids, layer=1)
    expected = toy_lm.blocks[1](before + 0.1 * (before.cumsum(1) / torch.arange(1, 4).view(1, -1, 1)) + v)[0]
    torch.testing.assert_close(after_input, expected, atol=1e-5, rtol=1e-5)


def test_channel_first_feature_maps(toy_cnn):
    x = torch.randn(2, 3, 5, 5)
    v = torch.randn(4)
    plain = toy_cnn.conv(x)
    with steer(toy_cnn, {Site("conv", layout="NCHW"): v}, scale=2.0):
        steered = toy_cnn.conv(x)
    torch.testing.assert_close(steered - plain, (2.0 * v).view(1, 4, 1, 1).expand_as(plain), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="NLC"):
        SteeringVectors([Site("conv", layout="NCHW")], vectors={"conv": v}, positions="prompt")


def test_tdhook_style_steer_fn_with_tensordict(toy_cnn):
    from tensordict import TensorDict

    def steer_fn(module_key, output):
        return output * 0

    x = torch.randn(2, 3, 4, 4)
    context = SteeringVectors([Site("conv", layout="NCHW")], steer_fn=steer_fn).prepare(toy_cnn)
    with context as hooked:
        out = hooked(TensorDict({"input": x}, batch_size=[2]))["output"]
    expected = toy_cnn.head(torch.zeros(2, 4))
    torch.testing.assert_close(out, expected)
    assert no_hooks(toy_cnn)
