"""What a steering hook launches: one kernel per steered layer, as a bare hook does, under every policy.

On a GPU a small decoding step is bound by kernel launches, so each kernel a hook adds to every layer
costs as much as the add itself. The torch profiler counts the operators that run (on the CPU too):
the per-layer cost of a policy is what 4 steered layers launch beyond 1 steered layer, over 3. What a
policy computes once per model call (its position mask) does not grow with the layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import tdsteer
from tdsteer_hf.tiny import tiny_gpt2

# Operators that launch no kernel: views, and conversions that return their input.
NO_KERNEL = {
    "aten::as_strided",
    "aten::unsqueeze",
    "aten::slice",
    "aten::view",
    "aten::expand",
    "aten::reshape",
    "aten::select",
    "aten::squeeze",
    "aten::permute",
    "aten::transpose",
    "aten::movedim",
    "aten::alias",
    "aten::detach",
    "aten::to",  # a copy shows up as aten::_to_copy
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_strided",
}
LAYERS = 4


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_gpt2(vocab_size=64, n_layer=LAYERS, n_embd=16)


def _vectors(layers: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"transformer.h.{i}": torch.randn(16, generator=generator) for i in range(layers)}


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the policies' masks differ per row
    return {"input_ids": ids, "attention_mask": mask}


def _kernels(make_context: Callable[[], AbstractContextManager[object]], call: Callable[[], object]) -> Counter[str]:
    with torch.no_grad(), make_context():
        call()  # first call: the context casts and caches what it keeps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in NO_KERNEL)


@contextmanager
def _bare_hooks(model: torch.nn.Module, layers: int, scale: float) -> Iterator[None]:
    """The floor: a plain forward hook per layer adding a ready-made ``scale * v``."""

    def adder(delta: torch.Tensor) -> Callable[..., object]:
        return lambda module, args, out: (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    handles = [
        model.get_submodule(path).register_forward_hook(adder(scale * v)) for path, v in _vectors(layers).items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _per_layer(count: Callable[[int], Counter[str]]) -> Counter[str]:
    """Kernels that each steered layer adds; whatever is computed once per call cancels out."""
    one, every = count(1), count(LAYERS)
    extra = every - one
    assert not (one - every), f"steering more layers launched fewer kernels: {one - every}"
    assert all(n % (LAYERS - 1) == 0 for n in extra.values()), f"not the same kernels in every layer: {extra}"
    return Counter({name: n // (LAYERS - 1) for name, n in extra.items()})


def _calls(model: torch.nn.Module) -> dict[str, Callable[[], object]]:
    inputs = _inputs()
    return {
        "forward": lambda: model(**inputs),
        "generate": lambda: model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0),
    }


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_the_floor_launches_one_add_per_layer(model: torch.nn.Module, call: str) -> None:
    run = _calls(model)[call]
    per_layer = _per_layer(lambda layers: _kernels(lambda: _bare_hooks(model, layers, 2.0), run))
    steps = 1 if call == "forward" else 3
    assert per_layer == Counter({"aten::add": steps})


@pytest.mark.parametrize(
    ("positions", "call", "steered_calls"),
    [
        ("all", "forward", 1),
        ("from:4", "forward", 1),
        ("all", "generate", 3),
        ("from:4", "generate", 3),
        ("generated", "generate", 2),  # the prompt pass is not steered
        ("prompt", "generate", 1),  # only the prompt pass is
    ],
)
def test_steering_launches_one_kernel_per_layer_and_call(
    model: torch.nn.Module, positions: str, call: str, steered_calls: int
) -> None:
    run = _calls(model)[call]
    per_layer = _per_layer(
        lambda layers: _kernels(lambda: tdsteer.steer(model, _vectors(layers), scale=2.0, positions=positions), run)
    )
    # one add (one fused multiply-add under a position mask) per layer and steered call, as the floor
    assert sum(per_layer.values()) == steered_calls, per_layer
    assert set(per_layer) <= {"aten::add", "aten::addcmul"}, per_layer


def test_continuation_starts_launch_one_kernel_per_layer(model: torch.nn.Module) -> None:
    inputs = _inputs()

    def count(layers: int) -> Counter[str]:
        handle = tdsteer.steer(model, _vectors(layers), scale=2.0, positions="continuation")
        handle.set(starts=torch.tensor([5, 6]))
        return _kernels(lambda: handle, lambda: model(**inputs))

    per_layer = _per_layer(count)
    assert per_layer == Counter({"aten::addcmul": 1})


@pytest.mark.parametrize(("positions", "call", "steered_calls"), [("all", "forward", 1), ("generated", "generate", 2)])
def test_a_condition_adds_no_kernel_per_layer(
    model: torch.nn.Module, positions: str, call: str, steered_calls: int
) -> None:
    run = _calls(model)[call]
    condition = tdsteer.Condition({"transformer.h.0": torch.ones(16)}, threshold=-2.0)  # every row meets it

    def count(layers: int) -> Counter[str]:
        steer = lambda: tdsteer.steer(model, _vectors(layers), scale=2.0, positions=positions, condition=condition)  # noqa: E731
        return _kernels(steer, run)

    per_layer = _per_layer(count)
    assert sum(per_layer.values()) == steered_calls, per_layer
    assert set(per_layer) <= {"aten::add", "aten::addcmul"}, per_layer
