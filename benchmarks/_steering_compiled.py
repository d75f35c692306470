"""Compiled vs eager steered generation for bench_steering.py (not a benchmark itself).

The recipe of docs/benchmarks.md ("Compiled models"): ``torch._dynamo.config.skip_nnmodule_hook_guards =
False``, then Hugging Face ``generate`` with a static cache, whose decoding steps run a compiled
``__call__`` (``cache_implementation="static"`` and a ``CompileConfig``; transformers compiles on GPUs by
itself, and on CPUs when the config says ``_compile_all_devices``). Each steered case keeps one handle,
opened again every round: the same hook functions, so its compiled graph is reused, not recompiled.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Callable
from typing import Any

import torch
from _steering_timing import ContextFactory, interleaved, summarize
from torch import Tensor, nn
from torch._dynamo.utils import counters
from transformers import CompileConfig

import tdsteer


def default_backend() -> str:
    """``inductor`` where a C compiler is present (always on CUDA), ``aot_eager`` otherwise."""
    if torch.cuda.is_available() or shutil.which("g++") or shutil.which("c++") or shutil.which("gcc"):
        return "inductor"
    return "aot_eager"


def compile_config(backend: str, device: torch.device) -> CompileConfig:
    # reduce-overhead (CUDA graphs) is transformers' default on GPUs; modes are inductor's alone
    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None
    config = CompileConfig(backend=backend, mode=mode, fullgraph=True)
    config._compile_all_devices = True  # compile on the CPU as well
    return config


def bench_compiled(
    args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any], prompt: dict[str, Tensor]
) -> dict[str, Any]:
    """Time plain and steered ``generate``, eager and compiled; check that compiled steering equals eager."""
    torch._dynamo.config.skip_nnmodule_hook_guards = False  # the recipe: compiled graphs guard on module hooks
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    config = compile_config(args.compile_backend, ctx["device"])
    every, scale = ctx["every"], args.scale

    def generate(compiled: bool) -> Callable[[], Any]:
        extra: dict[str, Any] = {"cache_implementation": "static", "compile_config": config} if compiled else {}

        def call() -> Any:
            return model.generate(
                **prompt,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
                **extra,
            )

        return call

    steer_all = tdsteer.steer(model, every, scale=scale)
    steer_generated = tdsteer.steer(model, every, scale=scale, positions="generated")
    # a condition every row meets (decided in the eager prompt pass): the compiled steps read its gate
    steer_gated = tdsteer.steer(model, every, scale=scale, positions="generated", condition=ctx["condition"])
    cases: dict[str, tuple[ContextFactory, Any]] = {
        "eager plain": (contextlib.nullcontext, generate(False)),
        f"eager tdsteer {ctx['layers']} layers": (lambda: steer_all, generate(False)),
        "compiled plain": (contextlib.nullcontext, generate(True)),
        f"compiled tdsteer {ctx['layers']} layers": (lambda: steer_all, generate(True)),
        f"compiled tdsteer {ctx['layers']} layers generated": (lambda: steer_generated, generate(True)),
        f"compiled tdsteer {ctx['layers']} layers generated, condition": (lambda: steer_gated, generate(True)),
    }
    checks: dict[str, Any] = {}
    counters.clear()
    outputs = {}
    for name, (make_context, call) in cases.items():
        with make_context():
            outputs[name] = call()
    with steer_generated:
        eager_generated = generate(False)()
    _check_equal(checks, "compiled plain == eager plain", outputs["compiled plain"], outputs["eager plain"])
    steered = f"tdsteer {ctx['layers']} layers"
    _check_equal(checks, f"compiled {steered} == eager", outputs[f"compiled {steered}"], outputs[f"eager {steered}"])
    _check_equal(
        checks, f"compiled {steered} generated == eager", outputs[f"compiled {steered} generated"], eager_generated
    )
    _check_equal(
        checks,
        f"compiled {steered} generated, condition met by every row == eager without one",
        outputs[f"compiled {steered} generated, condition"],
        eager_generated,
    )
    changed = not torch.equal(outputs[f"compiled {steered}"].sequences, outputs["compiled plain"].sequences)
    checks["compiled: steering changed the generated tokens"] = {"ok": changed}
    checks["compiled: no graph break"] = {
        "ok": not counters["graph_break"],
        "graph_breaks": dict(counters["graph_break"]),
    }
    compiled_graphs = counters["stats"]["unique_graphs"]
    with steer_all:
        steer_all.set(scale=-scale)
        generate(True)()
        steer_all.set(scale=scale)
    checks["compiled: handle.set(scale=...) recompiles nothing"] = {
        "ok": counters["stats"]["unique_graphs"] == compiled_graphs
    }
    result: dict[str, Any] = {"checks": checks, "backend": args.compile_backend, "mode": config.mode}
    if args.smoke:
        return result
    timings = interleaved(
        cases, repeats=args.gen_repeats, warmup=args.warmup, device=ctx["device"], label="compiled generate"
    )
    checks["compiled: the timed rounds recompiled nothing"] = {
        "ok": counters["stats"]["unique_graphs"] == compiled_graphs
    }
    result["summary"] = summarize(timings, "compiled plain")
    return result


def _check_equal(checks: dict[str, Any], name: str, got: Any, want: Any) -> None:
    same_tokens = bool(torch.equal(got.sequences, want.sequences))
    diff = float((torch.stack(got.logits) - torch.stack(want.logits)).abs().max())
    checks[f"compiled: {name}"] = {"ok": same_tokens and diff < 1e-3, "max_abs_diff": diff}
