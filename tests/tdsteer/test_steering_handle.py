"""SteeringHandle.set while open: new vectors, all-or-nothing changes, and the tdhook view of a context."""

from __future__ import annotations

import pytest
import torch
from toy_models import ToyLM, block_output

import tdsteer
from tdsteer import SteeringVector, SteeringVectors


def test_set_vector_while_open_equals_a_new_context(toy_lm: ToyLM) -> None:
    ids = torch.randint(0, 32, (2, 4))
    old, new = torch.randn(8), torch.randn(8)
    handle = tdsteer.steer(toy_lm, {"blocks.0": old, "blocks.2": old}, scale=2.0)
    with handle:
        toy_lm(ids)
        handle.set(vector={"blocks.0": new})
        changed = toy_lm(ids)
    with tdsteer.steer(toy_lm, {"blocks.0": new, "blocks.2": old}, scale=2.0):
        assert torch.equal(changed, toy_lm(ids))
    handle.set(vector=SteeringVector({"blocks.2": new}))  # closed: applies when it opens again
    with handle:
        again = toy_lm(ids)
    with tdsteer.steer(toy_lm, {"blocks.0": new, "blocks.2": new}, scale=2.0):
        assert torch.equal(again, toy_lm(ids))


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        ({"blocks.1": torch.randn(8)}, "No site 'blocks.1'"),
        ({"blocks.0": torch.randn(5)}, r"shaped like the one it replaces \(\(8,\)\)"),
        ({"blocks.0": torch.full((8,), float("inf"))}, "NaN or infinite"),
    ],
)
def test_a_bad_set_changes_nothing(toy_lm: ToyLM, vector: dict[str, torch.Tensor], message: str) -> None:
    v = torch.randn(8)
    handle = tdsteer.steer(toy_lm, {"blocks.0": v}, positions="prompt", scale=1.0)
    with handle:
        with pytest.raises(ValueError, match=message):
            handle.set(positions="generated", scale=3.0, vector=vector, starts=torch.tensor([1]))
        assert handle.factory.policy.kind == "prompt" and handle.scale == 1.0 and handle.starts is None
        assert handle.factory._vectors["blocks.0"] is v


def test_a_steer_fn_context_has_no_vectors_to_replace(toy_lm: ToyLM) -> None:
    factory = SteeringVectors(["blocks.0"], steer_fn=lambda module_key, output: output)
    with pytest.raises(ValueError, match="steer_fn"):
        factory.set_vectors({"blocks.0": torch.randn(8)})


def test_the_tdhook_context_shows_its_program(toy_lm: ToyLM) -> None:
    factory = SteeringVectors(["blocks.0", "blocks.2"], vectors=[torch.randn(8), torch.randn(8)], positions="prompt")
    context = factory.prepare(toy_lm)
    with context:
        program = context.program
        assert [(spec.module_path, spec.direction) for spec in program.hooks] == [
            ("blocks.0", "fwd"),
            ("blocks.2", "fwd"),
            ("", "fwd_pre_kwargs"),
            ("", "fwd"),
        ]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in toy_lm.modules())


def test_hooks_run_before_other_hooks_and_in_nesting_order(toy_lm: ToyLM) -> None:
    ids = torch.randint(0, 32, (1, 3))
    seen: list[torch.Tensor] = []
    reader = toy_lm.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
    try:
        plain = block_output(toy_lm, ids)
        a, b = torch.randn(8), torch.randn(8)
        with tdsteer.steer(toy_lm, {"blocks.0": a}), tdsteer.steer(toy_lm, {"blocks.0": b}, operator="ablate"):
            toy_lm(ids)
    finally:
        reader.remove()
    unit = b / b.norm()
    expected = plain + a
    expected = expected - (expected @ unit).unsqueeze(-1) * unit
    # the reader was registered before both contexts, and still sees a then b applied
    torch.testing.assert_close(seen[-1], expected, rtol=1e-5, atol=1e-5)


def test_open_and_close_steer_outside_a_with_block(toy_lm: ToyLM) -> None:
    """``handle.open()`` steers every call until ``close()``, as the ``with`` block does."""
    ids = torch.tensor([[1, 2, 3, 4]])
    vector = {"blocks.0": torch.randn(8, generator=torch.Generator().manual_seed(3))}
    handle = tdsteer.steer(toy_lm, vector, scale=2.0)
    with handle:
        want = toy_lm(ids)
    plain = toy_lm(ids)
    opened = handle.open()
    assert opened is handle and handle.is_open
    assert torch.equal(toy_lm(ids), want) and torch.equal(toy_lm(ids), want)  # every call until close
    with pytest.raises(RuntimeError, match="already open"):
        handle.open()
    handle.close()
    handle.close()  # a second close is a no-op
    assert not handle.is_open and torch.equal(toy_lm(ids), plain)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in toy_lm.modules())
