"""Overhead of steering and extraction on a GPT-2-small-shaped model (random weights, no download).

Measures, against the same model run plainly:

* (a) a forward pass steered by ``tdsteer.steer`` at one layer and at all 12 layers (``add``, positions
  ``"all"`` and ``"from:k"``, which builds a per-row position mask in every hooked layer);
* (b) ``generate`` of new tokens (greedy, KV cache) steered at all layers, positions ``"all"`` and
  ``"generated"`` (a position mask on every decoding step);
* (c) the floor, a bare ``register_forward_hook`` that adds the vector, tdhook's own
  ``SteeringVectors``, and the peer, the ``steering-vectors`` package, when it is importable;
* (d) ``tdsteer.extract`` over N contrastive batches against a plain forward over the same batches,
  reading a middle and the last layer, with ``stop_early`` on (the default) and off;
* (e) opening and closing each context (target: 50 us plus 10 us per site on a CPU);
* (f) compiled vs eager ``generate`` with a static cache, plain and steered (target: compiled steered
  within 1.01x compiled plain);
* (g) on CUDA, the peak memory of steered ``generate`` against plain (target: plain plus the vectors,
  and the moment in which a block's output and its steered copy both exist).

Every timed call runs inside an already open context (for forwards, after one untimed 1-token
call that lets the context do its first-call setup); opening and closing the contexts is timed
apart. Cases are interleaved round by round (the order rotates), and the table gives medians.

    python benchmarks/bench_steering.py                 # cuda if available, else cpu (small sizes)
    python benchmarks/bench_steering.py --device cpu --full
    python benchmarks/bench_steering.py --quick         # tiny batches, few rounds
    python benchmarks/bench_steering.py --smoke         # the correctness checks only, no timing (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

import tdsteer

# _common.py (the helpers the benchmarks share) sits beside this script. `python benchmarks/<script>.py`
# puts this folder on sys.path; runpy.run_path and `python -P` do not, so make sure it is there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, write_results
from _steering_compiled import bench_compiled, default_backend
from _steering_contexts import (
    bare_hooks,
    context_cases,
    layer_path,
    load_peer,
    peer_context,
    print_contexts,
    tdhook_context,
    tdsteer_context,
    time_contexts,
    time_set_scale,
)
from _steering_memory import bench_memory, print_memory
from _steering_timing import COMPILED_TARGET, EXTRACT_TARGET, FORWARD_TARGET, ContextFactory, interleaved, print_table
from _steering_timing import summarize as summarize_times

# Sizes: "full" is the GPU default, "small" the CPU default (same model shape, smaller batches), "quick"
# a smoke run that only shows that every case runs.
PRESETS: dict[str, dict[str, int]] = {
    "full": {
        "batch": 8,
        "seq_len": 128,
        "gen_batch": 8,
        "prompt_len": 64,
        "new_tokens": 32,
        "extract_batches": 16,
        "extract_batch": 8,
        "extract_len": 128,
        "repeats": 60,
        "gen_repeats": 15,
        "extract_repeats": 5,
        "warmup": 3,
    },
    "small": {
        "batch": 2,
        "seq_len": 64,
        "gen_batch": 2,
        "prompt_len": 32,
        "new_tokens": 32,
        "extract_batches": 4,
        "extract_batch": 2,
        "extract_len": 64,
        "repeats": 15,
        "gen_repeats": 7,
        "extract_repeats": 5,
        "warmup": 0,  # the correctness checks already ran every forward and generate case once
    },
    "quick": {
        "batch": 2,
        "seq_len": 16,
        "gen_batch": 2,
        "prompt_len": 8,
        "new_tokens": 4,
        "extract_batches": 2,
        "extract_batch": 1,
        "extract_len": 16,
        "repeats": 3,
        "gen_repeats": 2,
        "extract_repeats": 2,
        "warmup": 0,
    },
}

# -- data -----------------------------------------------------------------------------------------


def left_padded(batch: int, length: int, vocab: int, generator: torch.Generator, pad_id: int = 0) -> dict[str, Tensor]:
    """Random token ids ``[batch, length]``; row ``i`` has ``i * length // (2 * batch)`` left padding tokens."""
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    padding = torch.tensor([i * length // (2 * batch) for i in range(batch)])
    mask = (torch.arange(length).unsqueeze(0) >= padding.unsqueeze(1)).long()
    return {"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask}


def to_device(inputs: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


# -- the benchmark --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="small batches (the default on cpu)")
    size.add_argument("--full", action="store_true", help="full batches: 8 x 128 (the default on cuda)")
    size.add_argument("--quick", action="store_true", help="a smoke run: batches of 2 x 16, 2-3 rounds")
    for name in PRESETS["full"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="overrides the preset")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["forward", "generate", "extract", "peer", "contexts", "compiled", "memory"],
    )
    parser.add_argument(
        "--smoke", action="store_true", help="run every correctness check at the quick sizes, time nothing (CI)"
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of (f): inductor where a C compiler is present, else aot_eager "
        "(aot_eager with --smoke, which compiles faster)",
    )
    parser.add_argument("--context-cycles", type=int, default=200, help="enter/exit cycles per sample of (e)")
    add_common_args(parser, results="steering-<cpu|cuda>.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else default_backend()
    if args.quick or args.smoke:
        preset = "quick"
    else:
        preset = "full" if args.full or (not args.small and device.type == "cuda") else "small"
    args.preset = preset
    for name, value in PRESETS[preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def build_model(device: torch.device, dtype: torch.dtype) -> GPT2LMHeadModel:
    config = GPT2Config()  # GPT-2 small: 12 layers, 768 hidden, 12 heads, vocab 50257
    model = GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def check_same(name: str, got: Tensor, want: Tensor, checks: dict[str, Any], atol: float) -> None:
    diff = float((got.float() - want.float()).abs().max())
    checks[name] = {"max_abs_diff": diff, "ok": diff <= atol}
    if diff > atol:
        print(f"WARNING: {name}: max abs difference {diff:.3g} > {atol:g}", file=sys.stderr)


def greedy_generate(model: nn.Module, prompt: dict[str, Tensor], new_tokens: int) -> Callable[[], Tensor]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens with the KV cache, as a call."""
    return lambda: model.generate(
        **prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0
    )


def bench_forward(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    device, scale, one, every = ctx["device"], args.scale, ctx["one"], ctx["every"]
    inputs = to_device(left_padded(args.batch, args.seq_len, ctx["vocab"], ctx["generator"]), device)
    k = args.seq_len // 2
    contexts: dict[str, ContextFactory] = {
        "plain": contextlib.nullcontext,
        "tdsteer 1 layer": tdsteer_context(model, one, scale, "all"),
        "tdsteer 12 layers": tdsteer_context(model, every, scale, "all"),
        f"tdsteer 12 layers from:{k}": tdsteer_context(model, every, scale, f"from:{k}"),
        "tdsteer 12 layers, condition": lambda: tdsteer.steer(model, every, scale=scale, condition=ctx["condition"]),
        "floor 1 layer": lambda: bare_hooks(model, ctx["one_delta"]),
        "floor 12 layers": lambda: bare_hooks(model, ctx["every_delta"]),
        "tdhook SteeringVectors 12 layers": tdhook_context(model, ctx["every_delta"]),
    }
    if ctx["peer"] is not None:
        contexts["steering-vectors 1 layer"] = peer_context(ctx["peer"], model, ctx["one_peer"], scale)
        contexts["steering-vectors 12 layers"] = peer_context(ctx["peer"], model, ctx["every_peer"], scale)

    last_token = {key: value[:, -1:] for key, value in inputs.items()}

    def forward() -> Tensor:
        return model(**inputs).logits

    def prime() -> None:
        model(**last_token)

    checks: dict[str, Any] = {}
    plain = forward()
    outputs = {}
    for name, make_context in contexts.items():
        with make_context():
            outputs[name] = forward()
    atol = 1e-3 if args.dtype == "float32" else 5e-2
    check_same(
        "forward: tdsteer 12 layers == floor 12 layers",
        outputs["tdsteer 12 layers"],
        outputs["floor 12 layers"],
        checks,
        atol,
    )
    check_same(
        "forward: tdsteer 1 layer == floor 1 layer", outputs["tdsteer 1 layer"], outputs["floor 1 layer"], checks, atol
    )
    check_same(
        "forward: tdsteer 12 layers, condition met by every row == floor 12 layers",
        outputs["tdsteer 12 layers, condition"],
        outputs["floor 12 layers"],
        checks,
        atol,
    )
    check_same(
        "forward: tdhook SteeringVectors 12 layers == floor 12 layers",
        outputs["tdhook SteeringVectors 12 layers"],
        outputs["floor 12 layers"],
        checks,
        atol,
    )
    if "steering-vectors 12 layers" in outputs:
        check_same(
            "forward: steering-vectors 12 layers == floor 12 layers",
            outputs["steering-vectors 12 layers"],
            outputs["floor 12 layers"],
            checks,
            atol,
        )
    # from:k leaves the first k real tokens of each row alone (causal model), and steers the rest.
    real = inputs["attention_mask"].cumsum(-1) - 1
    early = (real < k) & (inputs["attention_mask"] > 0)
    steered = outputs[f"tdsteer 12 layers from:{k}"]
    check_same(f"forward: from:{k} leaves real positions < {k} unchanged", steered[early], plain[early], checks, atol)
    changed = float((steered[~early] - plain[~early]).abs().max())
    checks[f"forward: from:{k} steers real positions >= {k}"] = {"max_abs_diff": changed, "ok": changed > atol}
    del outputs, plain, steered
    if args.smoke:
        return {"checks": checks, "from_k": k}
    times = interleaved(
        {name: (factory, forward) for name, factory in contexts.items()},
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
        label="forward",
        prime=prime,
    )
    return {"summary": summarize_times(times, "plain"), "checks": checks, "from_k": k}


def bench_generate(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    device, scale, every = ctx["device"], args.scale, ctx["every"]
    prompt = to_device(left_padded(args.gen_batch, args.prompt_len, ctx["vocab"], ctx["generator"]), device)
    contexts: dict[str, ContextFactory] = {
        "plain": contextlib.nullcontext,
        "tdsteer 12 layers": tdsteer_context(model, every, scale, "all"),
        "tdsteer 12 layers generated": tdsteer_context(model, every, scale, "generated"),
        "tdsteer 12 layers generated, condition": lambda: tdsteer.steer(
            model, every, scale=scale, positions="generated", condition=ctx["condition"]
        ),
        "floor 12 layers": lambda: bare_hooks(model, ctx["every_delta"]),
    }
    if ctx["peer"] is not None:
        contexts["steering-vectors 12 layers"] = peer_context(ctx["peer"], model, ctx["every_peer"], scale)

    generate = greedy_generate(model, prompt, args.new_tokens)
    checks: dict[str, Any] = {}
    plain = generate()
    outputs = {}
    for name, make_context in contexts.items():
        with make_context():
            outputs[name] = generate()
    new = slice(args.prompt_len, None)
    same = bool(torch.equal(outputs["tdsteer 12 layers"], outputs["floor 12 layers"]))
    checks["generate: tdsteer 12 layers == floor 12 layers (tokens)"] = {"ok": same}
    if not same:
        print("WARNING: generate: tdsteer and the bare hooks produced different tokens", file=sys.stderr)
    differs = not torch.equal(outputs["tdsteer 12 layers"][:, new], plain[:, new])
    checks["generate: steering changed the generated tokens"] = {"ok": differs}
    # "generated" leaves the prompt pass alone, so the first new token is the plain one.
    gated = bool(torch.equal(outputs["tdsteer 12 layers generated, condition"], outputs["tdsteer 12 layers generated"]))
    checks["generate: a condition met by every row steers as no condition (tokens)"] = {"ok": gated}
    first = bool(torch.equal(outputs["tdsteer 12 layers generated"][:, args.prompt_len], plain[:, args.prompt_len]))
    checks["generate: positions=generated keeps the first new token"] = {"ok": first}
    if args.smoke:
        return {"checks": checks}
    times = interleaved(
        {name: (factory, generate) for name, factory in contexts.items()},
        repeats=args.gen_repeats,
        warmup=args.warmup,
        device=device,
        label="generate",
    )
    return {"summary": summarize_times(times, "plain"), "checks": checks}


def bench_extract(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    device = ctx["device"]
    batches = [
        {
            "positive": left_padded(args.extract_batch, args.extract_len, ctx["vocab"], ctx["generator"]),
            "negative": left_padded(args.extract_batch, args.extract_len, ctx["vocab"], ctx["generator"]),
        }
        for _ in range(args.extract_batches)
    ]
    middle, last = layer_path(ctx["layers"] // 2 - 1), layer_path(ctx["layers"] - 1)

    def plain() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**to_device(batch["positive"], device))
                model(**to_device(batch["negative"], device))

    def extraction(site: str, stop_early: bool) -> Callable[[], Any]:
        return lambda: tdsteer.extract(
            model, batches, [site], method="mean_diff", read="last", progress=False, stop_early=stop_early
        )

    calls = {
        "plain forward": plain,
        f"extract {middle} stop_early": extraction(middle, True),
        f"extract {middle} full forward": extraction(middle, False),
        f"extract {last} stop_early": extraction(last, True),
        f"extract {last} full forward": extraction(last, False),
    }
    if args.smoke:  # stopping early reads the same activations as a full forward
        early, full = extraction(middle, True)(), extraction(middle, False)()
        diff = max(float((early.directions[k] - full.directions[k]).abs().max()) for k in early.directions)
        return {"checks": {"extract: stop_early == full forward": {"ok": diff <= 1e-5, "max_abs_diff": diff}}}
    times = interleaved(
        {name: (contextlib.nullcontext, call) for name, call in calls.items()},
        repeats=args.extract_repeats,
        warmup=args.warmup,
        device=device,
        label="extract",
    )
    return {"summary": summarize_times(times, "plain forward"), "middle": middle, "last": last}


# -- report ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(args.seed)

    model = build_model(device, dtype)
    layers, hidden, vocab = model.config.n_layer, model.config.n_embd, model.config.vocab_size
    directions = {
        i: (0.05 * torch.randn(hidden, generator=generator)).to(device=device, dtype=dtype) for i in range(layers)
    }
    middle = layers // 2
    peer, peer_reason = (None, "skipped (--skip peer)") if "peer" in args.skip else load_peer()
    ctx: dict[str, Any] = {
        "device": device,
        "generator": generator,
        "vocab": vocab,
        "layers": layers,
        "one": {layer_path(middle): directions[middle]},
        "every": {layer_path(i): v for i, v in directions.items()},
        "one_delta": {layer_path(middle): args.scale * directions[middle]},
        "every_delta": {layer_path(i): args.scale * v for i, v in directions.items()},
        "one_peer": {middle: directions[middle]},
        "every_peer": dict(directions),
        "peer": peer,
        # a condition at the first block that every row meets: what reading the prompt and gating cost
        "condition": tdsteer.Condition({layer_path(0): directions[0]}, threshold=-2.0),
    }
    if peer is not None:
        try:
            with peer_context(peer, model, ctx["every_peer"], args.scale)():
                pass
        except Exception as error:  # the peer's layer matching may not know this transformers version
            ctx["peer"], peer_reason = None, f"steering-vectors failed to hook the model: {error!r}"

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"bench_steering: GPT-2 small shape ({layers} layers, {hidden} hidden, vocab {vocab}, random weights), "
        f"{device} ({device_name}), {args.dtype}, preset {args.preset}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, tdsteer {tdsteer.__version__}"
    )
    if ctx["peer"] is None:
        print(f"peer: {peer_reason}")
    else:
        print(f"peer: steering-vectors {getattr(peer, '__version__', '')}".rstrip())

    results: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name,
        "dtype": args.dtype,
        "preset": args.preset,
        "sizes": {name: getattr(args, name) for name in PRESETS["full"]},
        "scale": args.scale,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "tdsteer": tdsteer.__version__,
        "python": platform.python_version(),
        "peer": None if ctx["peer"] is None else "steering-vectors",
        "peer_skipped_because": peer_reason if ctx["peer"] is None else None,
        "targets": {
            "steered_vs_plain": FORWARD_TARGET,
            "extract_vs_plain_forward": EXTRACT_TARGET,
            "compiled_steered_vs_compiled_plain": COMPILED_TARGET,
            "context_enter_exit_us": "50 + 10 per site",
        },
        "compile_backend": args.compile_backend,
    }
    cpu_column = device.type == "cpu"
    print(
        ("smoke run: the correctness checks only, nothing is timed; " if args.smoke else "")
        + "ratio = median / median of plain; paired = median of each round's case / plain; the target column says "
        "ok or OVER when both agree, noise? when they straddle the target"
        + (
            "; cpu-time = the same ratio of this process's CPU seconds (less hurt by a busy machine)"
            if cpu_column
            else ""
        )
    )
    sections = [section for section in SECTIONS if section not in args.skip]
    for section in sections:
        results[section] = SECTIONS[section](args, model, ctx)
        if not args.smoke:
            report(section, results[section], args, cpu_column)
    checks = {name: check for section in sections for name, check in results[section].get("checks", {}).items()}
    print("\nchecks:")
    for name, check in checks.items():
        diff = f" (max abs diff {check['max_abs_diff']:.3g})" if "max_abs_diff" in check else ""
        print(f"  {'ok  ' if check['ok'] else 'FAIL'} {name}{diff}")
    failed = [name for name, check in checks.items() if not check["ok"]]
    if not args.smoke:
        write_results(results, args.out, f"steering-{device.type}.json")
    if failed:
        print(f"\n{len(failed)} check(s) failed", file=sys.stderr)
        return 1
    return 0


def bench_contexts(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    """(e) Enter + exit of every context; in a smoke run, only check that each one steers like the floor."""
    cases = context_cases(model, ctx, args.scale)
    inputs = to_device(left_padded(2, 8, ctx["vocab"], ctx["generator"]), ctx["device"])
    checks: dict[str, Any] = {}
    with bare_hooks(model, ctx["one_delta"]):
        floor = model(**inputs).logits
    plain = model(**inputs).logits
    for name, make_context in cases.items():
        if " 1 layer" in name:
            # "generated" steers nothing in a plain forward call
            want, label = (plain, "plain") if name.endswith("generated") else (floor, "floor 1 layer")
            with make_context():
                check_same(f"contexts: {name} == {label}", model(**inputs).logits, want, checks, 1e-3)
    if args.smoke:
        return {"checks": checks}
    rounds = 9 if args.preset != "quick" else 3
    return {
        "timings": time_contexts(cases, rounds=rounds, cycles=args.context_cycles),
        "set_scale_us": time_set_scale(model, ctx["every"], args.context_cycles),
        "checks": checks,
    }


def bench_compiled_generate(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    """(f) Compiled vs eager generate, plain and steered (a static cache)."""
    prompt = to_device(left_padded(args.gen_batch, args.prompt_len, ctx["vocab"], ctx["generator"]), ctx["device"])
    return bench_compiled(args, model, ctx, prompt)


def bench_generate_memory(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    """(g) Peak CUDA memory of generate, plain and steered."""
    prompt = to_device(left_padded(args.gen_batch, args.prompt_len, ctx["vocab"], ctx["generator"]), ctx["device"])
    return bench_memory(args, model, ctx, greedy_generate(model, prompt, args.new_tokens), prompt["input_ids"].shape)


SECTIONS: dict[str, Callable[[argparse.Namespace, nn.Module, dict[str, Any]], dict[str, Any]]] = {
    "forward": bench_forward,
    "generate": bench_generate,
    "extract": bench_extract,
    "contexts": bench_contexts,
    "compiled": bench_compiled_generate,
    "memory": bench_generate_memory,
}


def report(section: str, result: dict[str, Any], args: argparse.Namespace, cpu_column: bool) -> None:
    if section == "forward":
        title = f"(a, c) forward, batch {args.batch} x {args.seq_len} tokens (left padded)"
        print_table(section, title, result, cpu_column)
        print(
            "  each timed forward runs in a freshly opened context after one untimed 1-token call, so the "
            "context's first-call setup is not in it"
        )
    elif section == "generate":
        title = (
            f"(b, c) generate {args.new_tokens} new tokens, greedy, KV cache, batch {args.gen_batch} x "
            f"{args.prompt_len} prompt tokens"
        )
        print_table(section, title, result, cpu_column)
    elif section == "extract":
        title = (
            f"(d) extraction (mean_diff, read last) over {args.extract_batches} contrastive batches of "
            f"{args.extract_batch} x {args.extract_len} tokens vs a plain forward over the same batches"
        )
        print_table(section, title, result, cpu_column)
        print(
            "  stop_early skips the layers after the read site (and the LM head), so it can beat the plain forward; "
            "'full forward' is stop_early=False"
        )
    elif section == "contexts":
        print_contexts(result)
    elif section == "memory":
        print_memory(result)
    else:
        title = (
            f"(f) generate {args.new_tokens} new tokens with a static cache, compiled ({result['backend']}, mode "
            f"{result['mode']}) vs eager, batch {args.gen_batch} x {args.prompt_len} prompt tokens; ratios vs "
            "compiled plain"
        )
        print_table(section, title, result, cpu_column)


if __name__ == "__main__":
    sys.exit(main())
