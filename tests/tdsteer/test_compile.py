"""Steering a ``torch.compile``d model (issue 13): same results as eager, no graph break, no recompile on ``set``.

Every test compiles with ``fullgraph=True``, so a graph break caused by tdsteer's hooks fails it.
Recompiles are counted with ``torch._dynamo.utils.counters``. The correctness tests use the
``inductor`` backend where a C compiler is present (``aot_eager`` otherwise); the recompile counts do
not depend on the backend, so they use ``aot_eager``, which compiles much faster.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from toy_models import ToyLM

import tdsteer

BACKEND = "inductor" if shutil.which("g++") or shutil.which("c++") or shutil.which("gcc") else "aot_eager"
IDS = torch.tensor([[3, 5, 7, 9, 11], [2, 4, 6, 8, 10]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


pytestmark = pytest.mark.usefixtures("clean_dynamo")


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def breaks() -> dict[str, int]:
    return dict(counters["graph_break"])


def vectors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {f"blocks.{i}": torch.randn(8, generator=generator) for i in (0, 2)}


@pytest.mark.parametrize(
    ("operator", "positions"),
    [("add", "all"), ("add", "from:2"), ("ablate", "continuation"), ("clamp", "prompt")],
)
def test_compiled_steering_equals_eager(toy_lm: ToyLM, operator: str, positions: str) -> None:
    compiled = torch.compile(toy_lm, backend=BACKEND, fullgraph=True)
    handle = tdsteer.steer(toy_lm, vectors(), scale=2.5, operator=operator, positions=positions)
    with handle:
        handle.set(starts=torch.tensor([3, 1]))
        got = compiled(IDS, attention_mask=MASK)
        want = toy_lm(IDS, attention_mask=MASK)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, toy_lm(IDS, attention_mask=MASK))
    assert breaks() == {}
    # after the context, the compiled model is plain again (its graph guards on the module hooks)
    torch.testing.assert_close(compiled(IDS, attention_mask=MASK), toy_lm(IDS, attention_mask=MASK))


def test_set_scale_vector_and_starts_do_not_recompile(toy_lm: ToyLM) -> None:
    compiled = torch.compile(toy_lm, backend="aot_eager", fullgraph=True)
    handle = tdsteer.steer(toy_lm, vectors(), scale=1.0, positions="continuation")
    with handle:
        handle.set(starts=torch.tensor([1, 2]))
        compiled(IDS)
        first = graphs()
        changes = [
            {"scale": -4.0},
            {"vector": {"blocks.0": torch.randn(8)}},  # a new tensor of the same shape
            {"starts": torch.tensor([4, 0])},
            {"scale": 0.5, "starts": torch.tensor([2, 2])},
        ]
        for change in changes:
            handle.set(**change)
            got = compiled(IDS)
            torch.testing.assert_close(got, toy_lm(IDS), rtol=1e-6, atol=1e-6)
        handle.factory._vectors["blocks.2"].mul_(-3)  # values changed in place
        torch.testing.assert_close(compiled(IDS), toy_lm(IDS), rtol=1e-6, atol=1e-6)
    assert graphs() == first, f"{graphs() - first} recompile(s) after handle.set"
    assert breaks() == {}


def test_set_from_k_does_not_recompile(toy_lm: ToyLM) -> None:
    compiled = torch.compile(toy_lm, backend="aot_eager", fullgraph=True)
    handle = tdsteer.steer(toy_lm, vectors(), scale=3.0, positions="from:1")
    with handle:
        compiled(IDS, attention_mask=MASK)
        first = graphs()
        for k in (2, 4, 7):
            handle.set(positions=f"from:{k}")
            torch.testing.assert_close(
                compiled(IDS, attention_mask=MASK), toy_lm(IDS, attention_mask=MASK), rtol=1e-6, atol=1e-6
            )
    assert graphs() == first
    assert breaks() == {}


def test_per_row_scales_compile_and_change_without_recompiling(toy_lm: ToyLM) -> None:
    compiled = torch.compile(toy_lm, backend="aot_eager", fullgraph=True)
    handle = tdsteer.steer(toy_lm, vectors(), scale=torch.tensor([1.0, -1.0]))
    with handle:
        compiled(IDS)
        first = graphs()
        handle.set(scale=torch.tensor([3.0, 0.0]))
        torch.testing.assert_close(compiled(IDS), toy_lm(IDS), rtol=1e-6, atol=1e-6)
    assert graphs() == first


def test_reopening_the_same_handle_reuses_its_graph(toy_lm: ToyLM) -> None:
    compiled = torch.compile(toy_lm, backend="aot_eager", fullgraph=True)
    handle = tdsteer.steer(toy_lm, vectors(), scale=2.0)
    with handle:
        compiled(IDS)
    compiled(IDS)  # plain
    opened = graphs()
    with handle:
        handle.set(scale=5.0)
        torch.testing.assert_close(compiled(IDS), toy_lm(IDS), rtol=1e-6, atol=1e-6)
    assert graphs() == opened  # the same hook functions: the graph compiled for the first opening is reused
    assert breaks() == {}


def test_generate_with_a_compiled_forward_matches_eager(toy_lm: ToyLM) -> None:
    """The toy model's own KV-cached generate calls a compiled forward; policies that track positions."""
    eager = {}
    for positions in ("generated", "continuation", 2):
        with tdsteer.steer(toy_lm, vectors(), scale=6.0, positions=positions):
            eager[positions] = toy_lm.generate(IDS, max_new_tokens=4)
    toy_lm.forward = torch.compile(toy_lm.forward, backend="aot_eager", fullgraph=True)  # type: ignore[method-assign]
    for positions, want in eager.items():
        handle = tdsteer.steer(toy_lm, vectors(), scale=6.0, positions=positions)
        with handle:
            assert torch.equal(toy_lm.generate(IDS, max_new_tokens=4), want), positions
            compiled_once = graphs()
            handle.set(scale=-6.0)
            toy_lm.generate(IDS, max_new_tokens=4)
            assert graphs() == compiled_once, positions
    assert breaks() == {}


def test_a_stale_compiled_graph_is_warned_about(toy_lm: ToyLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warned once per batch of new graphs: a second model compiled later (after a reset) warns again."""
    monkeypatch.setattr(tdsteer.steering, "_warned_at_graphs", 0)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        for model in (toy_lm, ToyLM().eval()):
            torch._dynamo.reset()
            torch.compile(model, backend="aot_eager")(IDS)
            with (
                pytest.warns(UserWarning, match="skip_nnmodule_hook_guards = False"),
                tdsteer.steer(model, vectors()),
            ):
                pass
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with tdsteer.steer(model, vectors()):  # nothing compiled since: no second warning
                    pass


def test_conditional_steering_compiled_equals_eager(toy_lm: ToyLM) -> None:
    """A condition decided inside the compiled graph: per row, the eager result; a batch whose rows meet
    it the other way round, or a new scale, recompiles nothing."""
    hidden = toy_lm.blocks[0](toy_lm.embed(IDS))[0]
    direction = hidden[0].mean(0) - hidden[1].mean(0)
    condition = tdsteer.Condition({"blocks.0": direction}, threshold=0.0, read="mean")
    compiled = torch.compile(toy_lm, backend=BACKEND, fullgraph=True)
    steered = {f"blocks.{i}": v for i, v in zip((1, 2), vectors().values(), strict=True)}
    handle = tdsteer.steer(toy_lm, steered, scale=2.0, condition=condition)
    with handle:
        for ids, scale in ((IDS, 2.0), (IDS.flip(0), 2.0), (IDS, -3.0)):
            handle.set(scale=scale)
            want, met = toy_lm(ids), handle.condition_met
            torch.testing.assert_close(compiled(ids), want, rtol=1e-5, atol=1e-5)
            assert met is not None and torch.equal(handle.condition_met, met)
            assert met.tolist() == ([True, False] if ids is IDS else [False, True])
        assert graphs() == 1
    plain = toy_lm(IDS)
    assert torch.equal(want[1], plain[1]) and not torch.allclose(want[0], plain[0])
    assert breaks() == {}
