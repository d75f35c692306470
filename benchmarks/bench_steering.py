"""Overhead of steering and extraction on a GPT-2-small-shaped model (random weights, no download).

Measures, against the same model run plainly:

* (a) a forward pass steered by ``tdsteer.steer`` at one layer and at all 12 layers (``add``, positions
  ``"all"`` and ``"from:k"``, which builds a per-row position mask in every hooked layer);
* (b) ``generate`` of new tokens (greedy, KV cache) steered at all layers, positions ``"all"`` and
  ``"generated"`` (a position mask on every decoding step);
* (c) the floor, a bare ``register_forward_hook`` that adds the vector, and the peer, the
  ``steering-vectors`` package, when it is importable;
* (d) ``tdsteer.extract`` over N contrastive batches against a plain forward over the same batches,
  reading a middle and the last layer, with ``stop_early`` on (the default) and off.

Every timed call runs inside an already open context (for forwards, after one untimed 1-token
call that lets the context do its first-call setup); opening and closing the contexts is timed
apart. Cases are interleaved round by round (the order rotates), and the table gives medians.

    python benchmarks/bench_steering.py                 # cuda if available, else cpu (small sizes)
    python benchmarks/bench_steering.py --device cpu --full
    python benchmarks/bench_steering.py --quick         # a smoke run: tiny batches, few rounds
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
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
from _common import add_common_args, print_header, timed, write_results

FORWARD_TARGET = 1.02
EXTRACT_TARGET = 1.05

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

ContextFactory = Callable[[], contextlib.AbstractContextManager[Any]]


# -- timing ---------------------------------------------------------------------------------------


def interleaved(
    cases: dict[str, tuple[ContextFactory, Callable[[], Any]]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    label: str,
    prime: Callable[[], Any] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time ``call`` inside ``context()`` for every case, one round of all cases after another.

    The order of the cases rotates every round so that no case always runs first or last. ``prime``
    runs untimed inside the context first, so that what a context does once on its first call
    (casting the vector, ``scale * v``) is left out. Returns wall-clock seconds and this process's
    CPU seconds (all threads) of each timed call.
    """
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            make_context, call = cases[name]
            with make_context():
                if prime is not None:
                    prime()
                with timed(device) as clock:
                    call()
            if round_index >= warmup:
                times[name].append(clock.wall)
                cpu_times[name].append(clock.cpu)
        done = round_index + 1
        print(f"  {label}: round {done}/{warmup + repeats}{' (warm-up)' if done <= warmup else ''}", file=sys.stderr)
    return times, cpu_times


def context_overhead(factories: dict[str, ContextFactory], repeats: int) -> dict[str, float]:
    """Median seconds to open and close each context, with no model call inside."""
    samples: dict[str, list[float]] = {name: [] for name in factories}
    for _ in range(repeats):
        for name, make_context in factories.items():
            start = time.perf_counter()
            with make_context():
                pass
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def summarize(
    timings: tuple[dict[str, list[float]], dict[str, list[float]]], baseline: str
) -> dict[str, dict[str, Any]]:
    """Median, ratio of medians and median of the per-round ratios against ``baseline``.

    The CPU-time ratio (this process's CPU seconds) shrugs off time spent descheduled by other
    processes on a busy machine; it means little on CUDA, where the host waits for the device.
    """
    times, cpu_times = timings
    base, base_cpu = times[baseline], cpu_times[baseline]
    summary = {}
    for name, values in times.items():
        paired = [value / ref for value, ref in zip(values, base)]
        summary[name] = {
            "median_s": statistics.median(values),
            "ratio": statistics.median(values) / statistics.median(base),
            "paired_ratio": statistics.median(paired),
            "paired_min": min(paired),
            "paired_max": max(paired),
            "cpu_median_s": statistics.median(cpu_times[name]),
            "cpu_ratio": statistics.median(cpu_times[name]) / max(statistics.median(base_cpu), 1e-12),
            "times_s": values,
            "cpu_times_s": cpu_times[name],
        }
    return summary


# -- contexts -------------------------------------------------------------------------------------


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


def load_peer() -> tuple[Any, str | None]:
    """The ``steering_vectors`` module, or ``None`` and why not."""
    try:
        import steering_vectors
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
    parser.add_argument("--skip", nargs="*", default=[], choices=["forward", "generate", "extract", "peer"])
    add_common_args(parser, results="steering-<cpu|cuda>.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
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


def bench_forward(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    device, scale, one, every = ctx["device"], args.scale, ctx["one"], ctx["every"]
    inputs = to_device(left_padded(args.batch, args.seq_len, ctx["vocab"], ctx["generator"]), device)
    k = args.seq_len // 2
    contexts: dict[str, ContextFactory] = {
        "plain": contextlib.nullcontext,
        "tdsteer 1 layer": tdsteer_context(model, one, scale, "all"),
        "tdsteer 12 layers": tdsteer_context(model, every, scale, "all"),
        f"tdsteer 12 layers from:{k}": tdsteer_context(model, every, scale, f"from:{k}"),
        "floor 1 layer": lambda: bare_hooks(model, ctx["one_delta"]),
        "floor 12 layers": lambda: bare_hooks(model, ctx["every_delta"]),
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

    times = interleaved(
        {name: (factory, forward) for name, factory in contexts.items()},
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
        label="forward",
        prime=prime,
    )
    overhead = context_overhead({n: f for n, f in contexts.items() if n != "plain"}, repeats=max(10, args.repeats))
    return {"summary": summarize(times, "plain"), "context_s": overhead, "checks": checks, "from_k": k}


def bench_generate(args: argparse.Namespace, model: nn.Module, ctx: dict[str, Any]) -> dict[str, Any]:
    device, scale, every = ctx["device"], args.scale, ctx["every"]
    prompt = to_device(left_padded(args.gen_batch, args.prompt_len, ctx["vocab"], ctx["generator"]), device)
    contexts: dict[str, ContextFactory] = {
        "plain": contextlib.nullcontext,
        "tdsteer 12 layers": tdsteer_context(model, every, scale, "all"),
        "tdsteer 12 layers generated": tdsteer_context(model, every, scale, "generated"),
        "floor 12 layers": lambda: bare_hooks(model, ctx["every_delta"]),
    }
    if ctx["peer"] is not None:
        contexts["steering-vectors 12 layers"] = peer_context(ctx["peer"], model, ctx["every_peer"], scale)

    def generate() -> Tensor:
        return model.generate(
            **prompt,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )

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
    first = bool(torch.equal(outputs["tdsteer 12 layers generated"][:, args.prompt_len], plain[:, args.prompt_len]))
    checks["generate: positions=generated keeps the first new token"] = {"ok": first}

    times = interleaved(
        {name: (factory, generate) for name, factory in contexts.items()},
        repeats=args.gen_repeats,
        warmup=args.warmup,
        device=device,
        label="generate",
    )
    return {"summary": summarize(times, "plain"), "checks": checks}


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
    times = interleaved(
        {name: (contextlib.nullcontext, call) for name, call in calls.items()},
        repeats=args.extract_repeats,
        warmup=args.warmup,
        device=device,
        label="extract",
    )
    return {"summary": summarize(times, "plain forward"), "middle": middle, "last": last}


# -- report ---------------------------------------------------------------------------------------


def target_for(section: str, name: str) -> float | None:
    if section in ("forward", "generate") and name.startswith("tdsteer"):
        return FORWARD_TARGET
    if section == "extract" and name.startswith("extract"):
        return EXTRACT_TARGET
    return None


def judge(row: dict[str, Any], target: float) -> str:
    """``ok`` or ``OVER`` when both ratios agree, ``noise?`` when one is within the target and one is not."""
    within = [row["ratio"] <= target, row["paired_ratio"] <= target]
    return "ok" if all(within) else "OVER" if not any(within) else "noise?"


def add_verdicts(section: str, result: dict[str, Any]) -> None:
    for name, row in result["summary"].items():
        target = target_for(section, name)
        row["target"] = target
        row["verdict"] = None if target is None else judge(row, target)


def print_table(section: str, title: str, result: dict[str, Any], cpu_column: bool) -> None:
    add_verdicts(section, result)
    summary = result["summary"]
    width = max(len(name) for name in summary) + 2
    print(f"\n{title}")
    header = f"  {'case':<{width}}{'median ms':>11}{'ratio':>8}{'paired':>8}{'paired range':>15}"
    if cpu_column:
        header += f"{'cpu-time':>10}"
    header += "   target"
    print_header(header, indent=2, extend=18)  # the rule runs on under the verdicts
    for name, row in summary.items():
        target = target_for(section, name)
        verdict = ""
        if target is not None:
            verdict = f"<= {target:.2f}x  {judge(row, target)}"
        spread = f"{row['paired_min']:.3f}-{row['paired_max']:.3f}"
        line = f"  {name:<{width}}{row['median_s'] * 1e3:>11.2f}{row['ratio']:>7.3f}x{row['paired_ratio']:>7.3f}x{spread:>15}"
        if cpu_column:
            line += f"{row['cpu_ratio']:>9.3f}x"
        print(f"{line}   {verdict}")


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
        "targets": {"steered_vs_plain": FORWARD_TARGET, "extract_vs_plain_forward": EXTRACT_TARGET},
    }
    cpu_column = device.type == "cpu"
    print(
        "ratio = median / median of plain; paired = median of each round's case / plain; the target column says "
        "ok or OVER when both agree, noise? when they straddle the target"
        + (
            "; cpu-time = the same ratio of this process's CPU seconds (less hurt by a busy machine)"
            if cpu_column
            else ""
        )
    )
    if "forward" not in args.skip:
        forward = bench_forward(args, model, ctx)
        results["forward"] = forward
        print_table(
            "forward", f"(a, c) forward, batch {args.batch} x {args.seq_len} tokens (left padded)", forward, cpu_column
        )
        reference = forward["summary"]["plain"]["median_s"]
        print(
            "  each timed forward runs in a freshly opened context after one untimed 1-token call, so the "
            "context's first-call setup is not in it"
        )
        print("\n  opening + closing the context (no model call):")
        for name, seconds in forward["context_s"].items():
            print(f"    {name:<34}{seconds * 1e3:>9.3f} ms  ({seconds / reference:.2%} of a plain forward)")
    if "generate" not in args.skip:
        generate = bench_generate(args, model, ctx)
        results["generate"] = generate
        print_table(
            "generate",
            f"(b, c) generate {args.new_tokens} new tokens, greedy, KV cache, batch {args.gen_batch} x "
            f"{args.prompt_len} prompt tokens",
            generate,
            cpu_column,
        )
    if "extract" not in args.skip:
        extract = bench_extract(args, model, ctx)
        results["extract"] = extract
        print_table(
            "extract",
            f"(d) extraction (mean_diff, read last) over {args.extract_batches} contrastive batches of "
            f"{args.extract_batch} x {args.extract_len} tokens vs a plain forward over the same batches",
            extract,
            cpu_column,
        )
        print(
            "  stop_early skips the layers after the read site (and the LM head), so it can beat the plain forward; "
            "'full forward' is stop_early=False"
        )
    checks = {**results.get("forward", {}).get("checks", {}), **results.get("generate", {}).get("checks", {})}
    if checks:
        print("\nchecks:")
        for name, check in checks.items():
            diff = f" (max abs diff {check['max_abs_diff']:.3g})" if "max_abs_diff" in check else ""
            print(f"  {'ok  ' if check['ok'] else 'FAIL'} {name}{diff}")

    write_results(results, args.out, f"steering-{device.type}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
