"""Cost of evaluating with steering: a steered lm-eval run against an unsteered one, and a sweep of
five scales against five separate runs.

A random GPT-2 (``tdsteer_hf.tiny``, sized by ``--layers`` / ``--hidden``; nothing is downloaded) with a
tokenizer trained on the shipped tasks' sample data, evaluated on the shipped tasks
``tdsteer_caa_ab`` (A/B loglikelihoods) and ``tdsteer_perplexity`` (rolling loglikelihoods). The
table also gives the ratio of the process's CPU time, which time spent descheduled by other
processes does not inflate:

* (a) one ``lm_eval.simple_evaluate`` of ``HFLM`` (unsteered) against ``SteeredLM`` steering every
  layer at scale 4, with ``positions="all"`` and ``"continuation"`` (per-row starts: tdsteer's own
  scoring loop), and against lm-eval's own ``steered`` model with the same vector (checked to give
  the same scores as ``positions="all"``). Cases alternate round by round; the table gives the median of each and its ratio
  to the unsteered run (target <= 1.05x). lm-eval's environment report (``pip list``, about a second
  per evaluation) is collected once before timing, so that it does not hide the steering's cost.
* (b) ``tdsteer_eval.run_sweep`` over five scales (one model load, one environment report, results
  folder, plots, report) against five separate runs, each building its task manager, loading the
  model and running ``simple_evaluate`` at one scale as ``tdsteer eval run`` does (target <= 1.05x;
  the interpreter start and lm-eval's task catalogue, seconds per command, are left out). It also
  gives the sweep against five evaluations of one loaded model (environment report once): what
  the folder, the plots and the report add.

    python benchmarks/bench_eval.py                 # default sizes (about a minute on 2 CPU cores)
    python benchmarks/bench_eval.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import lm_eval
import torch
from lm_eval.models.hf_steered import SteeredModel
from lm_eval.models.huggingface import HFLM

import tdsteer
from tdsteer_eval import EvalOptions, SteeredLM, run_sweep, task_manager
from tdsteer_eval.runner import environment_once
from tdsteer_eval.task_data import SAMPLES_DIR
from tdsteer_hf.tiny import bpe_tokenizer, tiny_gpt2

# _common.py (the helpers the benchmarks share) sits beside this script. `python benchmarks/<script>.py`
# puts this folder on sys.path; runpy.run_path and `python -P` do not, so make sure it is there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, parse_with_quick, print_header, timed, write_results

TASKS = ["tdsteer_caa_ab", "tdsteer_perplexity"]
SCALES = [-4.0, -2.0, 0.0, 2.0, 4.0]
TARGET = 1.05
QUICK = {"layers": 2, "hidden": 64, "limit": 4, "rounds": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (default: 6)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256)")
    parser.add_argument("--limit", type=int, default=8, help="documents per task (default: 8, the whole A/B sample)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of (a) (default: 5)")
    parser.add_argument("--batch-size", type=int, default=4, help="lm-eval batch size (default: 4)")
    # one thread: on a small shared CPU, two threads contend with other processes and the timings wander
    add_common_args(parser, results="eval.json", threads=1)
    return parse_with_quick(parser, argv, QUICK)


def build(args: argparse.Namespace, folder: Path) -> Path:
    """Save a random GPT-2 and its tokenizer (trained on the shipped samples) to ``folder``."""
    texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLES_DIR.iterdir())]
    tokenizer = bpe_tokenizer(texts * 2, vocab_size=512)
    model = tiny_gpt2(tokenizer, n_layer=args.layers, n_embd=args.hidden, n_head=4, n_positions=1024, seed=args.seed)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(args.seed)
    sites = {f"transformer.h.{i}": torch.randn(args.hidden, generator=generator) for i in range(args.layers)}
    tdsteer.SteeringVector(sites, metadata={"model_type": "gpt2", "method": "random"}).save(
        folder / "vector.safetensors"
    )
    return folder


def evaluate(lm: Any, manager: Any, limit: int) -> dict[str, Any]:
    results = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, limit=limit, log_samples=True)
    assert results is not None
    return results


def _model_args(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The ``HFLM`` arguments every case shares: the saved model, on the CPU, in float32."""
    return {"pretrained": str(folder / "model"), "device": "cpu", "dtype": "float32", "batch_size": args.batch_size}


def _same_metrics(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether every numeric metric of every task agrees to 1e-6 (relative)."""
    for task, values in ours.items():
        for key, value in values.items():
            if isinstance(value, float) and abs(value - theirs[task][key]) > 1e-6 * max(1.0, abs(value)):
                return False
    return True


def steered_vs_plain(args: argparse.Namespace, folder: Path, manager: Any) -> dict[str, Any]:
    common = _model_args(args, folder)
    vector = str(folder / "vector.safetensors")
    # lm-eval's own steered model, with the same vector exported to its .pt format (GPT-2's hookpoints
    # are named relative to model.base_model, "transformer")
    exported = tdsteer.SteeringVector.load(vector).to_lm_eval(folder / "vector.pt", scale=4.0, prefix="transformer")
    cases = {
        "unsteered (HFLM)": HFLM(**common),
        "steered, positions=all": SteeredLM(**common, vector=vector, scale=4.0),
        "steered, positions=continuation": SteeredLM(**common, vector=vector, scale=4.0, positions="continuation"),
        "lm-eval's steered model (same vector)": SteeredModel(**common, steer_path=str(exported)),
    }
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    metrics = {}
    for name in names:  # warm-up: first-call costs (dataset caches, jinja templates) out of the timing
        metrics[name] = evaluate(cases[name], manager, args.limit)["results"]
    # both steer every position with the same vector: the same scores
    same = _same_metrics(metrics["steered, positions=all"], metrics["lm-eval's steered model (same vector)"])
    print(f"check: tdsteer's SteeredLM and lm-eval's steered model score alike: {'ok' if same else 'FAIL'}")
    if not same:
        raise SystemExit("SteeredLM (positions=all) and lm-eval's steered model disagree")
    for round_number in range(args.rounds):
        for name in names[round_number % len(names) :] + names[: round_number % len(names)]:
            with timed() as clock:
                evaluate(cases[name], manager, args.limit)
            wall[name].append(clock.wall)
            cpu[name].append(clock.cpu)
    base, base_cpu = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    return {
        name: {
            "median_s": statistics.median(wall[name]),
            "ratio": statistics.median(wall[name]) / base,
            "median_cpu_s": statistics.median(cpu[name]),
            "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
        }
        for name in names
    }


def sweep_vs_separate(args: argparse.Namespace, folder: Path, manager: Any) -> dict[str, Any]:
    common = _model_args(args, folder)
    vector = str(folder / "vector.safetensors")
    with timed() as separate:
        # what five `tdsteer eval run` invocations do, minus the interpreter start: each builds its task
        # manager, loads the model and runs simple_evaluate (with lm-eval's environment report)
        for scale in SCALES:
            evaluate(SteeredLM(**common, vector=vector, scale=scale), task_manager(TASKS), args.limit)
    lm = SteeredLM(**common, vector=vector)
    with timed() as evaluations, environment_once():
        for scale in SCALES:
            lm.scale = scale
            evaluate(lm, manager, args.limit)
    with timed() as swept:  # run_sweep collects the environment report once itself
        run_sweep(
            SteeredLM(**common, vector=vector),
            TASKS,
            SCALES,
            folder / "sweep",
            manager=manager,
            options=EvalOptions(limit=args.limit),
            progress=None,
        )
    return {
        "five_separate_runs_s": separate.wall,
        "five_evaluations_of_a_loaded_model_s": evaluations.wall,
        "sweep_s": swept.wall,
        "ratio_to_separate_runs": swept.wall / separate.wall,
        "ratio_to_loaded_evaluations": swept.wall / evaluations.wall,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    manager = task_manager(TASKS)
    print(
        f"bench_eval: {args.layers} layers x {args.hidden} hidden, {args.limit} documents per task, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(args, Path(tmp))
        with environment_once():  # (a) measures the steering, not lm-eval's environment report
            steering = steered_vs_plain(args, folder, manager)
        sweeping = sweep_vs_separate(args, folder, manager)
    print()
    print_header(f"{'(a) one lm-eval run of ' + ', '.join(TASKS):<48} {'median s':>9} {'ratio':>7} {'cpu ratio':>10}")
    for name, row in steering.items():
        print(f"{name:<48} {row['median_s']:>9.3f} {row['ratio']:>6.3f}x {row['cpu_ratio']:>9.3f}x")
    print()
    print_header(f"{'(b) five scales':<48} {'s':>9} {'ratio':>7}")
    print(f"{'five separate runs (load + evaluate each)':<48} {sweeping['five_separate_runs_s']:>9.2f}")
    print(f"{'five evaluations of one loaded model':<48} {sweeping['five_evaluations_of_a_loaded_model_s']:>9.2f}")
    print(
        f"{'run_sweep (folder, plots, report)':<48} {sweeping['sweep_s']:>9.2f} {sweeping['ratio_to_separate_runs']:>6.3f}x"
    )
    print(f"{'  ... against the loaded evaluations':<48} {'':>9} {sweeping['ratio_to_loaded_evaluations']:>6.3f}x")
    worst = max(row["ratio"] for name, row in steering.items() if name.startswith("steered"))
    ok = worst <= TARGET and sweeping["ratio_to_separate_runs"] <= TARGET
    print(
        f"\ntargets (<= {TARGET}x): steered run {worst:.3f}x, sweep {sweeping['ratio_to_separate_runs']:.3f}x -> "
        f"{'met' if ok else 'NOT met'}"
    )
    write_results(
        {"args": vars(args) | {"out": str(args.out)}, "steering": steering, "sweep": sweeping, "targets_met": ok},
        args.out,
        "eval.json",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
