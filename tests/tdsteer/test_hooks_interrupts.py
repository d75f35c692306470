"""Hook hygiene under interruption: Ctrl-C at random moments, and failures at every step of installing."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from typing import Any

import pytest
import torch
from toy_models import ToyLM

import tdsteer
from tdsteer import SteeringVectors, hooking, interrupts
from tdsteer.hooking import Installation

CYCLES = 3000


@pytest.fixture(autouse=True)
def _default_sigint() -> Any:
    """Each test starts from Python's own Ctrl-C handler, whatever earlier tests or libraries left
    (a test that launches processes may leave SIGINT ignored, and then tdsteer installs nothing)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _leftovers(model: torch.nn.Module) -> list[str]:
    found = [
        f"{name or '<root>'}: {len(m._forward_hooks)} hooks, {len(m._forward_pre_hooks)} pre-hooks"
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    ]
    if "generate" in model.__dict__:
        found.append("a generate attribute")
    if interrupts.holding() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        found.append("tdsteer's SIGINT handler")
    return found


def _one_cycle(model: ToyLM, kind: int, ids: torch.Tensor, v: torch.Tensor) -> None:
    if kind == 0:  # a handle with position tracking (root hooks and the generate dispatcher)
        with tdsteer.steer(model, {"blocks.0": v, "blocks.2": v}, positions="generated"):
            model(ids)
    elif kind == 1:  # two nested handles
        with tdsteer.steer(model, {"blocks.1": v}, positions="prompt"), tdsteer.steer(model, {"blocks.1": v}):
            pass
    else:  # the tdhook factory path
        with SteeringVectors(["blocks.0"], vectors={"blocks.0": v}, positions="continuation").prepare(model):
            pass


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
# an interrupt that lands in a garbage-collector or weakref callback is printed and dropped by Python
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_random_ctrl_c_during_enter_exit_cycles_leaves_nothing(toy_lm: ToyLM) -> None:
    """Ctrl-C (a real SIGINT) at random moments, thousands of times: no hook, wrapper or handler outlives its context."""
    rng = random.Random(0)
    ids = torch.randint(0, 32, (1, 3))
    v = torch.randn(8)
    armed = [False]

    def alarm(signum: int, frame: Any) -> None:
        if armed[0]:  # what Ctrl-C does, at whatever bytecode of the cycle the alarm lands on
            signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGALRM, alarm)
    interrupted = 0
    try:
        for cycle in range(CYCLES):
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 2.5e-4))  # one alarm per cycle
            try:
                armed[0] = True
                _one_cycle(toy_lm, cycle % 3, ids, v)
                armed[0] = False
            except KeyboardInterrupt:
                armed[0] = False
                interrupted += 1
            assert not _leftovers(toy_lm), f"cycle {cycle} (kind {cycle % 3}): {_leftovers(toy_lm)}"
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > CYCLES // 10, f"only {interrupted} of {CYCLES} cycles were interrupted"
    with tdsteer.steer(toy_lm, {"blocks.0": v}):  # and the model still steers normally
        assert not torch.equal(toy_lm(ids), toy_lm.head(toy_lm.embed(ids)))
    assert not _leftovers(toy_lm)


def test_ctrl_c_inside_the_block_raises_at_once_and_cleans_up(toy_lm: ToyLM) -> None:
    v = torch.randn(8)
    with pytest.raises(KeyboardInterrupt), tdsteer.steer(toy_lm, {"blocks.0": v}, positions="generated"):
        assert interrupts.holding()
        signal.raise_signal(signal.SIGINT)
        pytest.fail("the interrupt was deferred past the block's first statement")  # pragma: no cover
    assert not _leftovers(toy_lm)


def test_ctrl_c_while_installing_is_raised_after_the_install_is_undone(
    toy_lm: ToyLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Installation.add_hook
    calls = []

    def interrupted(self: Installation, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # deferred: the install finishes, then it is undone
            assert self.active and interrupts.holding()

    monkeypatch.setattr(Installation, "add_hook", interrupted)
    with pytest.raises(KeyboardInterrupt), tdsteer.steer(toy_lm, {"blocks.0": torch.randn(8)}, positions="prompt"):
        pytest.fail("the block ran although the context's entry was interrupted")  # pragma: no cover
    assert len(calls) == 3 and not _leftovers(toy_lm)


def _failing(original: Callable[..., Any], at: int, after: bool, error: type[BaseException]) -> Callable[..., Any]:
    count = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == at and not after:
            raise error("injected")
        result = original(*args, **kwargs)
        if count[0] == at and after:
            raise error("injected")
        return result

    return wrapper


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("target", ["register_forward_hook", "register_forward_pre_hook", "_push_generate"])
def test_a_failure_at_any_step_of_installing_leaves_nothing(
    toy_lm: ToyLM, monkeypatch: pytest.MonkeyPatch, target: str, after: bool, error: type[BaseException]
) -> None:
    """Every registration fails in turn, before or after it took effect (its handle then never returned)."""
    v = torch.randn(8)
    sites = {"blocks.0": v, tdsteer.Site("blocks.1", io="input"): v, "blocks.2": v}
    for at in range(1, 5):
        with monkeypatch.context() as patch:
            if target == "_push_generate":
                patch.setattr(hooking, target, _failing(hooking._push_generate, at, after, error))
            else:
                patch.setattr(torch.nn.Module, target, _failing(getattr(torch.nn.Module, target), at, after, error))
            try:
                with tdsteer.steer(toy_lm, sites, positions="generated"):
                    pass
            except error:
                pass
        assert not _leftovers(toy_lm), (target, at, _leftovers(toy_lm))
