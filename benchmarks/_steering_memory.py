"""(g) of bench_steering.py: peak CUDA memory of steered ``generate`` against plain ``generate``.

The target: steered generation needs the memory of plain generation plus the vectors. What tdsteer
keeps is the vectors cast to the model's dtype and the cached ``scale * v`` (one hidden-size row per
site); a hook adds out of place, so for a moment the block's output and the steered output both
exist: one activation of the largest call (two with a position mask), freed before the next block
runs. The check allows exactly that. Not a benchmark itself (``nox -s bench`` skips ``_*.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from _steering_contexts import tdsteer_context
from _steering_timing import ContextFactory
from torch import Tensor, nn


def _peak_bytes(make_context: ContextFactory, call: Callable[[], Any], device: torch.device) -> int:
    """Peak allocated bytes while ``make_context()`` is open around ``call``, above what was allocated
    before the context opened (what the context keeps, such as ``scale * v``, counts)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with make_context():
        call()
        torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_memory(
    args: Any, model: nn.Module, ctx: dict[str, Any], generate: Callable[[], Tensor], prompt_shape: torch.Size
) -> dict[str, Any]:
    """Peak CUDA memory of ``generate``, plain and steered at every layer (``"all"``, ``"generated"``).

    Args:
        args: bench_steering's arguments (``scale``, ``dtype``).
        model: The model, on a CUDA device.
        ctx: bench_steering's shared context (``device``, ``every``).
        generate: The ``generate`` call to measure.
        prompt_shape: ``[batch, length]`` of its prompt.

    Returns:
        ``{"skipped": reason}`` off CUDA; else the peaks in bytes per case, the bytes the vectors take,
        the allowance and a check per steered case.
    """
    device: torch.device = ctx["device"]
    if device.type != "cuda":
        return {"skipped": "peak memory is measured on CUDA devices only"}

    cases: dict[str, ContextFactory] = {
        "plain": contextlib.nullcontext,
        "tdsteer 12 layers": tdsteer_context(model, ctx["every"], args.scale, "all"),
        "tdsteer 12 layers generated": tdsteer_context(model, ctx["every"], args.scale, "generated"),
    }
    generate()  # warm-up: kernels and allocator pools of the plain call
    peaks = {name: _peak_bytes(factory, generate, device) for name, factory in cases.items()}
    vectors = ctx["every"]
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    # a copy of each direction in the model's dtype (none here: they are made in it) and the cached
    # scale * v: at most two hidden-size rows per site
    vector_bytes = 2 * sum(v.numel() for v in vectors.values()) * itemsize
    batch, length = prompt_shape
    hidden = next(iter(vectors.values())).numel()
    activation = batch * length * hidden * itemsize
    checks = {}
    for name, peak in peaks.items():
        if name == "plain":
            continue
        excess = peak - peaks["plain"]
        allowed = vector_bytes + 2 * activation
        checks[f"memory: {name} peak <= plain + vectors + 2 activations"] = {
            "ok": excess <= allowed,
            "excess_bytes": excess,
            "allowed_bytes": allowed,
        }
    return {
        "peak_bytes": peaks,
        "vector_bytes": vector_bytes,
        "activation_bytes": activation,
        "checks": checks,
    }


def print_memory(result: dict[str, Any]) -> None:
    """The table of (g)."""
    if "skipped" in result:
        print(f"\n(g) peak memory: {result['skipped']}")
        return
    plain = result["peak_bytes"]["plain"]
    print("\n(g) peak CUDA memory of generate (above the model and inputs)")
    print(f"  {'case':<32} {'peak MiB':>10} {'excess KiB':>11}")
    for name, peak in result["peak_bytes"].items():
        print(f"  {name:<32} {peak / 2**20:>10.2f} {(peak - plain) / 2**10:>11.1f}")
    print(
        f"  vectors and cached scale*v: {result['vector_bytes'] / 2**10:.1f} KiB; one activation of the prompt "
        f"pass: {result['activation_bytes'] / 2**10:.1f} KiB"
    )
