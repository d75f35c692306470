"""``tdsteer demo``: the main job, offline, from contrastive pairs to a report.

On the demo model that tdsteer-hf ships (a small GPT-2 trained on a synthetic review language), or on
any model given with ``--model``: extract a vector from the pairs, print greedy continuations of a
few prompts at several scales side by side, and sweep the A/B behaviour task and the perplexity
task over the same scales into a results folder (``results.json``, CSVs, plots, ``report.md``).

The folder is checked before any work: a rerun with the same settings (model, layer, scales, limit
and the contents of the pairs, A/B and text files) resumes the sweep, and recomputes nothing once
it is complete; other settings are refused before the model loads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import tdsteer
import tdsteer_hf
from tdsteer.cli import Command, one_line, output_file, parse_layers, parse_scales, positive_int, quote
from tdsteer.cli.command import SUMMARIES
from tdsteer_eval.lm import SteeredLM
from tdsteer_eval.results import check_output
from tdsteer_eval.runner import EvalOptions, run_sweep, task_manager
from tdsteer_eval.vectors import describe_vector, file_sha256
from tdsteer_hf.cli.generate import generate_texts
from tdsteer_hf.cli.loading import load_model, load_tokenizer, transformers_console
from tdsteer_hf.demo import DEMO_LAYER, DEMO_SCALES, data_path, load_demo_model, positive_fraction

DEFAULT_SCALES = ",".join(f"{scale:g}" for scale in DEMO_SCALES)
DEFAULT_OUTPUT = "tdsteer-demo"
VECTOR_FILE = "vector.safetensors"
TASKS = ("tdsteer_caa_ab", "tdsteer_perplexity")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory or id (default: the shipped demo model)")
    parser.add_argument("--pairs", default=None, help="contrastive pairs file (default: the demo's)")
    parser.add_argument("--ab", default=None, help="A/B behaviour task, CAA JSON (default: the demo's)")
    parser.add_argument(
        "--text",
        default=None,
        help="held-out text for perplexity: one text a line, or texts separated by blank lines (default: the demo's)",
    )
    parser.add_argument("--prompts", default=None, help="prompts to continue, one a line (default: the demo's)")
    parser.add_argument(
        "--layers",
        default=None,
        help=f"layer to steer: 2, or -1 (default: {DEMO_LAYER} on the demo model, else the middle layer)",
    )
    parser.add_argument(
        "--scales", default=DEFAULT_SCALES, help=f"scales, in units of the mean difference (default: {DEFAULT_SCALES})"
    )
    parser.add_argument("--limit", type=int, default=60, help="A/B items and texts per task (default: 60)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="tokens per continuation (default: 12)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"results folder (default: ./{DEFAULT_OUTPUT})")


def _lines(path: Path, limit: int) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]


def _settings(args: argparse.Namespace, files: dict[str, Path], scales: list[float]) -> dict[str, Any]:
    """What the demo's numbers depend on besides the model's weights, known before any work: checked
    against the results folder first, and recorded in its provenance (``demo``)."""
    return {
        "model": args.model,
        "layers": args.layers,
        "scales": scales,
        "limit": args.limit,
        **{name: {"file": path.name, "sha256": file_sha256(path)} for name, path in files.items()},
    }


def _model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    if args.model is None:
        demo, demo_tokenizer = load_demo_model()
        return demo, demo_tokenizer, "the shipped demo model (tdsteer_hf.demo)"
    with transformers_console():
        model = load_model(args.model, device="cpu", need_generate=True)
        tokenizer = load_tokenizer(args.model)
    return model, tokenizer, args.model


def _generations(
    model: Any, tokenizer: Any, vector: tdsteer.SteeringVector, prompts: list[str], scales: list[float], tokens: int
) -> list[list[str]]:
    """Greedy continuations in one batch, a row per prompt and scale; per prompt, one text per scale."""
    rows = [prompt for prompt in prompts for _ in scales]
    row_scales = torch.tensor([scale for _ in prompts for scale in scales], dtype=torch.float32)
    with tdsteer.steer(model, vector, scale=row_scales, check="ignore"):
        texts = generate_texts(model, tokenizer, rows, max_new_tokens=tokens, seed=None)
    return [texts[p * len(scales) : (p + 1) * len(scales)] for p in range(len(prompts))]


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    scales = parse_scales([args.scales], "--scales")
    if 0.0 not in scales:
        scales = sorted([*scales, 0.0])
    positive_int("--limit", args.limit)
    positive_int("--max-new-tokens", args.max_new_tokens)
    layers = parse_layers(args.layers)
    folder = Path(args.output).expanduser()
    output_file(str(folder / "results.json"))
    pairs_file = Path(args.pairs) if args.pairs else data_path("pairs")
    ab_file = Path(args.ab) if args.ab else data_path("ab")
    text_file = Path(args.text) if args.text else data_path("heldout")
    prompts_file = Path(args.prompts) if args.prompts else data_path("prompts")
    for option, path in (
        ("--pairs", pairs_file),
        ("--ab", ab_file),
        ("--text", text_file),
        ("--prompts", prompts_file),
    ):
        if not path.is_file():
            raise FileNotFoundError(f"{option} {str(path)!r} does not exist")
    settings = _settings(args, {"pairs": pairs_file, "ab": ab_file, "text": text_file}, scales)
    check_output(folder, {"demo": settings, "tasks": list(TASKS)}, partial=True)  # before any work
    pairs = tdsteer_hf.read_pairs(pairs_file)
    prompts = _lines(prompts_file, 4)
    model, tokenizer, name = _model(args)

    count = tdsteer_hf.num_layers(model)
    default = DEMO_LAYER if args.model is None else count // 2
    layer = tdsteer.take_indices(count, layers or [default])[0]
    print(f"tdsteer demo on {name}: {len(pairs)} contrastive pairs from {pairs_file}. Nothing is downloaded.")
    print(f"\n1. Extract a mean_diff vector at layer {layer} (the residual stream after the block)")
    batches = tdsteer_hf.contrastive_batches(tokenizer, pairs, batch_size=32, padding_side="right")
    sites = tdsteer_hf.sites(model, layer)
    vector = tdsteer.extract(model, batches, sites, method="mean_diff", model_name=name)
    print(f"   {sites[0].key}: norm {float(vector[sites[0].key].norm()):.3g}")

    print(f"\n2. Greedy continuations at scales {', '.join(f'{s:g}' for s in scales)}")
    continuations = _generations(model, tokenizer, vector, prompts, scales, args.max_new_tokens)
    width = max(len(f"{s:g}") for s in scales)
    for prompt, texts in zip(prompts, continuations, strict=True):
        print(f"   {quote(prompt)}")
        for scale, text in zip(scales, texts, strict=True):
            print(f"     scale {scale:>{width}g} -> {quote(one_line(text))}")
    shares = {scale: positive_fraction([texts[i] for texts in continuations]) for i, scale in enumerate(scales)}
    print("   positive words among the continuations: " + ", ".join(f"{s:g}: {v:.0%}" for s, v in shares.items()))
    print(
        f"\n3. Sweep the A/B behaviour task and perplexity over the scales "
        f"(at most {args.limit} A/B items and {args.limit} texts)"
    )
    metadata = {"caa_path": str(ab_file), "text_path": str(text_file)}
    manager = task_manager(list(TASKS), metadata=metadata)
    lm = SteeredLM(pretrained=model, tokenizer=tokenizer, vector=vector, batch_size=16, check="ignore")
    computed: list[str] = []

    def progress(line: str) -> None:
        computed.append(line)
        print(f"   {line}")

    data = run_sweep(
        lm,
        list(TASKS),
        scales,
        folder,
        manager=manager,
        options=EvalOptions(limit=args.limit, seed=0),
        # the vector is saved in the folder (below), and its settings stand in for its creation time
        provenance={"demo": settings, "vector": {**describe_vector(vector, vector), "file": VECTOR_FILE}},
        progress=progress,
    )
    if len(computed) < len(scales):
        print(
            f"   {len(scales) - len(computed)} of {len(scales)} scales were already in {folder} "
            "(same settings): kept, not recomputed"
        )
    vector.save(folder / VECTOR_FILE)  # beside the sweep's results, once the folder is the sweep's
    records = [
        {"prompt": prompt, "scale": scale, "text": text}
        for prompt, texts in zip(prompts, continuations, strict=True)
        for scale, text in zip(scales, texts, strict=True)
    ]
    (folder / "generations.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    summary = data.get("summary", {}).get("tdsteer_caa_ab", {})
    if "steerability" in summary:
        print(f"   steerability (slope of mean propensity over scale): {summary['steerability']:.3g}")
    print(
        f"\nDone in {time.perf_counter() - started:.0f} s. Results: {folder / 'report.md'} (plots, results.json, CSV)."
    )
    return 0


COMMAND = Command(
    name="demo",
    help=SUMMARIES["demo"],
    description=(
        "On the demo model tdsteer-hf ships (a small GPT-2 trained on a synthetic review language; nothing is "
        "downloaded), or on --model: extract a steering vector from contrastive pairs, print greedy continuations "
        "at several scales side by side, and sweep an A/B behaviour task and a perplexity task over the same "
        "scales into a results folder with a report and plots."
    ),
    add_arguments=_add_arguments,
    run=_run,
    signed_options=("--scales", "--layers"),
)
