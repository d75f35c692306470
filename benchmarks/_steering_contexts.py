"""The contexts bench_steering.py compares, and what opening and closing each one costs.

Contexts: ``tdsteer.steer`` (a new handle each time, and an existing handle opened again), the floor (a
bare ``register_forward_hook`` per layer that adds a ready-made delta), tdhook's own
``tdhook.latent.steering_vectors.SteeringVectors`` and the peer, the ``steering-vectors`` package,
when it is importable. Not a benchmark itself (``nox -s bench`` skips ``_*.py``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from _steering_timing import ContextFactory
from torch import Tensor, nn

import tdsteer

CONTEXT_BASE_US = 50.0  # target: enter + exit under 50 us plus 10 us per site (CPU)
CONTEXT_PER_SITE_US = 10.0


def layer_path(index: int) -> str:
    return f"transformer.h.{index}"


def tdsteer_context(model: nn.Module, vectors: dict[str, Tensor], scale: float, positions: str) -> ContextFactory:
    return lambda: tdsteer.steer(model, vectors, scale=scale, operator="add", positions=positions)


@contextlib.contextmanager
def bare_hooks(model: nn.Module, deltas: dict[str, Tensor]) -> Iterator[None]:
    """The floor: one ``register_forward_hook`` per layer that adds a ready-made delta."""

    def adder(delta: Tensor) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] + delta,) + output[1:]
            return output + delta

        return hook

    handles = [model.get_submodule(path).register_forward_hook(adder(delta)) for path, delta in deltas.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tdhook_context(model: nn.Module, deltas: dict[str, Tensor]) -> ContextFactory:
    """tdhook's own steering factory, with a ``steer_fn`` that adds the ready-made delta."""
    from tdhook.latent.steering_vectors import SteeringVectors  # tdhook is a dependency of tdsteer

    def steer_fn(module_key: str, output: Tensor) -> Tensor:
        return output + deltas[module_key]

    return lambda: SteeringVectors(list(deltas), steer_fn).prepare(model)


def load_peer() -> tuple[Any, str | None]:
    """The ``steering_vectors`` module, or ``None`` and why not."""
    try:
        import steering_vectors  # optional: the peer is measured only where it is installed
    except ImportError as error:
        return None, (
            f"steering-vectors is not importable ({error}). Its metadata pins transformers<5, so a plain "
            "`pip install steering-vectors` would replace this environment's transformers; "
            "`pip install --no-deps steering-vectors` installs it beside transformers 5 (it needs scikit-learn)"
        )
    return steering_vectors, None


def peer_context(peer: Any, model: nn.Module, vectors: dict[int, Tensor], scale: float) -> ContextFactory:
    vector = peer.SteeringVector(layer_activations=vectors, layer_type="decoder_block")
    return lambda: vector.apply(model, multiplier=scale)


def reopened(handle: tdsteer.SteeringHandle) -> ContextFactory:
    return lambda: handle


def context_cases(model: nn.Module, ctx: dict[str, Any], scale: float) -> dict[str, ContextFactory]:
    """Every context at one and at all layers, keyed ``"<what> <n> layer(s)"``."""
    cases: dict[str, ContextFactory] = {}
    for label, vectors, deltas, peer_vectors in (
        ("1 layer", ctx["one"], ctx["one_delta"], ctx["one_peer"]),
        (f"{ctx['layers']} layers", ctx["every"], ctx["every_delta"], ctx["every_peer"]),
    ):
        cases[f"tdsteer steer() {label}"] = tdsteer_context(model, vectors, scale, "all")
        cases[f"tdsteer steer() {label} generated"] = tdsteer_context(model, vectors, scale, "generated")
        cases[f"tdsteer reopened handle {label}"] = reopened(tdsteer.steer(model, vectors, scale=scale))
        cases[f"tdhook SteeringVectors {label}"] = tdhook_context(model, deltas)
        cases[f"floor {label}"] = lambda deltas=deltas: bare_hooks(model, deltas)
        if ctx["peer"] is not None:
            cases[f"steering-vectors {label}"] = peer_context(ctx["peer"], model, peer_vectors, scale)
    return cases


def context_target_us(name: str) -> float | None:
    """The enter + exit target of a tdsteer row, in microseconds."""
    if not name.startswith("tdsteer"):
        return None
    sites = 1 if " 1 layer" in name else int(name.split(" layers")[0].rsplit(" ", 1)[-1])
    return CONTEXT_BASE_US + CONTEXT_PER_SITE_US * sites


def time_contexts(cases: dict[str, ContextFactory], *, rounds: int, cycles: int) -> dict[str, dict[str, float]]:
    """Median microseconds (wall and this process's CPU) of one enter + exit, constructing the context included.

    Each sample times ``cycles`` enter/exit cycles in a row; cases are interleaved round by round.
    """
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, make_context in cases.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(cycles):
                with make_context():
                    pass
            wall[name].append((time.perf_counter() - start) / cycles * 1e6)
            cpu[name].append((time.process_time() - start_cpu) / cycles * 1e6)
    return {name: {"wall_us": statistics.median(wall[name]), "cpu_us": statistics.median(cpu[name])} for name in cases}


def time_set_scale(model: nn.Module, vectors: dict[str, Tensor], cycles: int) -> float:
    """Median microseconds of ``handle.set(scale=...)`` on an open context."""
    handle = tdsteer.steer(model, vectors, scale=1.0)
    samples = []
    with handle:
        for _ in range(5):
            start = time.perf_counter()
            for i in range(cycles):
                handle.set(scale=float(i % 7))
            samples.append((time.perf_counter() - start) / cycles * 1e6)
    return statistics.median(samples)


def print_contexts(result: dict[str, Any]) -> None:
    print("\n(e) opening + closing a context (constructing it included; no model call), median per cycle")
    width = max(len(name) for name in result["timings"]) + 2
    print(f"  {'case':<{width}}{'wall us':>9}{'cpu us':>9}   target")
    print("  " + "-" * (width + 30))
    for name, row in result["timings"].items():
        target = context_target_us(name)
        verdict = "" if target is None else f"<= {target:.0f} us  {'ok' if row['cpu_us'] <= target else 'OVER'}"
        print(f"  {name:<{width}}{row['wall_us']:>9.1f}{row['cpu_us']:>9.1f}   {verdict}")
    print(f"  handle.set(scale=...) on an open context: {result['set_scale_us']:.2f} us")
