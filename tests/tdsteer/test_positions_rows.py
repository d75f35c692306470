"""positions="continuation": per-row starts, the generate default, and changes to an open context."""

from __future__ import annotations

import pytest
import torch
from toy_models import ToyLM, block_output, no_hooks

import tdsteer
from tdsteer.positions import PositionTracker, Span, as_policy


def test_per_row_starts_steer_exactly_from_each_start(toy_lm: ToyLM) -> None:
    ids = torch.randint(0, 32, (3, 6))
    v = torch.randn(8)
    plain = block_output(toy_lm, ids)
    handle = tdsteer.steer(toy_lm, {"blocks.0": v}, scale=2.0, positions="continuation")
    with handle:
        handle.set(starts=torch.tensor([0, 3, 5]))
        steered = block_output(toy_lm, ids)
    changed = (steered - plain).abs().sum(-1) > 0
    assert changed.tolist() == [[True] * 6, [False] * 3 + [True] * 3, [False] * 5 + [True]]
    torch.testing.assert_close((steered - plain)[1, 3:], (2.0 * v).expand(3, 8), rtol=0, atol=1e-6)
    assert handle.starts is None and no_hooks(toy_lm)  # cleared and unhooked on exit


def test_without_starts_a_plain_forward_is_not_steered(toy_lm: ToyLM) -> None:
    ids = torch.randint(0, 32, (2, 4))
    plain = toy_lm(ids)
    with tdsteer.steer(toy_lm, {"blocks.0": torch.randn(8)}, scale=5.0, positions="continuation"):
        assert torch.equal(toy_lm(ids), plain)


class _Recorder:
    """An operator object (it gets the mask) that records which positions of each call it is asked to steer."""

    def __init__(self) -> None:
        self.calls: list[list[bool]] = []

    def __call__(self, h: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
        selected = torch.ones(h.shape[1], dtype=torch.bool) if mask is None else mask[0, :, 0].bool()
        self.calls.append(selected.tolist())
        return h


def test_in_generate_the_last_prompt_token_and_the_new_ones(toy_lm: ToyLM) -> None:
    recorder = _Recorder()
    with tdsteer.steer(toy_lm, {"blocks.0": torch.ones(8)}, operator=recorder, positions="continuation"):
        toy_lm.generate(torch.randint(0, 32, (1, 4)), max_new_tokens=3, use_cache=True)
    # the prompt call steers its last token only; each cached step steers its one new token
    assert recorder.calls == [[False, False, False, True], [True], [True]]


@pytest.mark.parametrize("starts", [None, [1, 4]], ids=["generate-default", "row-starts"])
def test_kv_cache_does_not_change_continuation_steering(toy_lm: ToyLM, starts: list[int] | None) -> None:
    ids = torch.randint(0, 32, (2, 5))
    v = torch.randn(8) * 4
    plain = toy_lm.generate(ids, max_new_tokens=5)
    handle = tdsteer.steer(toy_lm, {"blocks.0": v, "blocks.2": -v}, scale=3.0, positions="continuation")
    with handle:
        handle.set(starts=None if starts is None else torch.tensor(starts))
        cached = toy_lm.generate(ids, max_new_tokens=5, use_cache=True)
        uncached = toy_lm.generate(ids, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)
    assert no_hooks(toy_lm)


def test_set_scale_while_open_equals_a_new_context(toy_lm: ToyLM) -> None:
    ids = torch.randint(0, 32, (2, 5))
    v = torch.randn(8)
    handle = tdsteer.steer(toy_lm, {"blocks.1": v}, scale=1.0)
    with handle:
        first = toy_lm(ids)
        handle.set(scale=-3.0)
        changed = toy_lm(ids)
    with tdsteer.steer(toy_lm, {"blocks.1": v}, scale=-3.0):
        fresh = toy_lm(ids)
    assert torch.equal(changed, fresh) and not torch.equal(first, changed)
    assert handle.scale == -3.0


def test_set_positions_while_open(toy_lm: ToyLM) -> None:
    ids = torch.randint(0, 32, (2, 5))
    v = torch.randn(8)
    plain = block_output(toy_lm, ids)
    handle = tdsteer.steer(toy_lm, {"blocks.0": v}, positions="prompt")
    with handle:
        handle.set(positions="continuation", starts=torch.tensor([2, 4]))
        steered = block_output(toy_lm, ids)
    changed = (steered - plain).abs().sum(-1) > 0
    assert changed.tolist() == [[False, False, True, True, True], [False, False, False, False, True]]
    # leaving "all" needs position tracking, asked for up front
    untracked = tdsteer.steer(toy_lm, {"blocks.0": v})
    with untracked, pytest.raises(ValueError, match="track_positions=True"):
        untracked.set(positions="continuation")
    tracked = tdsteer.steer(toy_lm, {"blocks.0": v}, track_positions=True)
    with tracked:
        tracked.set(positions="continuation", starts=torch.tensor([2, 4]))
        assert torch.equal(block_output(toy_lm, ids), steered)
    assert no_hooks(toy_lm)


def test_bad_starts_are_clear_errors(toy_lm: ToyLM) -> None:
    handle = tdsteer.steer(toy_lm, {"blocks.0": torch.randn(8)}, positions="continuation")
    with pytest.raises(ValueError, match="1-D integer tensor"):
        handle.set(starts=torch.tensor([1.5, 2.0]))
    with handle, pytest.raises(ValueError, match="2 row starts were set but the batch has 3 rows"):
        handle.set(starts=torch.tensor([1, 2]))
        toy_lm(torch.randint(0, 32, (3, 4)))
    assert no_hooks(toy_lm)
    with pytest.raises(RuntimeError, match="already open"), handle, handle:
        pass


def test_one_mask_per_model_call_for_every_layer(toy_lm: ToyLM, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    original = PositionTracker.mask

    def counting(self: PositionTracker, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PositionTracker, "mask", counting)
    v = torch.randn(8)
    handle = tdsteer.steer(toy_lm, {"blocks.0": v, "blocks.1": v, "blocks.2": v}, positions="continuation")
    with handle:
        handle.set(starts=torch.tensor([1, 2]))
        toy_lm(torch.randint(0, 32, (2, 4)))
        toy_lm(torch.randint(0, 32, (2, 4)))
    assert len(built) == 2  # one per call, shared by the three hooked layers


def test_tracker_mask_values() -> None:
    tracker, cpu = PositionTracker(), torch.device("cpu")
    policy = as_policy("continuation")
    assert tracker.mask(policy, 3, cpu) is Span.NONE
    tracker.set_starts(torch.tensor([2, 0]))
    assert tracker.mask(policy, 3, cpu).tolist() == [[False, False, True], [True, True, True]]
    tracker.start = 2  # a cached step covering absolute positions 2..3
    assert tracker.mask(policy, 2, cpu).tolist() == [[True, True], [True, True]]
