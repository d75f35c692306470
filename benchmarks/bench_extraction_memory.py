"""Streaming extraction keeps memory flat: peak RSS does not grow with the number of examples.

Each (method, number of examples) runs in a fresh Python process, so that its peak resident set
size is its own. The child builds a small GPT-2 (4 layers, 128 hidden by default, vocab 1,000,
random weights), runs one warm-up batch, then ``tdsteer.extract`` over contrastive batches that a
generator makes lazily (random token ids, ragged lengths, left padding with attention masks),
reading several layers. The parent prints the peak RSS of each run and the ratio of the largest to
the smallest run, which should stay within a few per cent.

glibc's malloc raises its mmap threshold as large blocks are freed, after which ragged batches
fragment the heap and the peak RSS wanders by tens of MiB from run to run whatever the code does.
The children therefore run with ``MALLOC_MMAP_THRESHOLD_`` pinned (``--malloc-mmap-threshold``; 0
keeps glibc's default behaviour), so that the peak measures what the process holds.

    python benchmarks/bench_extraction_memory.py
    python benchmarks/bench_extraction_memory.py --sizes 256 4096 16384 --methods mean_diff
    python benchmarks/bench_extraction_memory.py --quick      # a smoke run: 64 and 256 examples
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# _common.py (the helpers the benchmarks share) sits beside this script. `python benchmarks/<script>.py`
# puts this folder on sys.path; runpy.run_path and `python -P` do not, so make sure it is there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    STABLE_MMAP_THRESHOLD,
    add_common_args,
    emit_result,
    mib,
    parse_with_quick,
    peak_rss_bytes,
    print_header,
    run_child_process,
    timed,
    write_results,
)

RATIO_TARGET = 1.05
QUICK = {"sizes": [64, 256]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 4096], help="numbers of examples")
    parser.add_argument("--methods", nargs="+", default=["mean_diff", "pca_diff"])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2], help="layers read (of 4)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 4)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=STABLE_MMAP_THRESHOLD,
        help="MALLOC_MMAP_THRESHOLD_ for the children, in bytes (0: glibc's adaptive default)",
    )
    add_common_args(parser, results="extraction-memory-<cpu|cuda>.json", children=True)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return parse_with_quick(parser, argv, QUICK)


# -- child ----------------------------------------------------------------------------------------


def current_rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None
    return int(psutil.Process().memory_info().rss)


def contrastive_batches(args: argparse.Namespace, examples: int, vocab: int, seed: int) -> Iterator[dict[str, Any]]:
    """Yield ``{"positive": ..., "negative": ...}`` batches, made one at a time (nothing is kept)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def side(rows: int) -> dict[str, Any]:
        lengths = torch.randint(args.min_len, args.max_len + 1, (rows,), generator=generator)
        width = int(lengths.max())
        ids = torch.randint(1, vocab, (rows, width), generator=generator)
        mask = (torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()  # left padding
        return {"input_ids": ids * mask, "attention_mask": mask}

    for start in range(0, examples, args.batch_size):
        rows = min(args.batch_size, examples - start)
        yield {"positive": side(rows), "negative": side(rows)}


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # imported in the child process only, so the parent measures nothing of its own

    import tdsteer
    from tdsteer_hf.tiny import tiny_gpt2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = tiny_gpt2(
        vocab_size=1000,
        n_layer=4,
        n_embd=args.hidden,
        n_head=4,
        n_positions=max(64, args.max_len),
        seed=args.seed,
        bos_token_id=999,
        eos_token_id=999,
    ).to(device)
    config = model.config
    sites = [f"transformer.h.{layer}" for layer in args.layers]

    # Warm up at the longest length, so that one-off allocations (allocator pools, kernels) are not
    # counted as growth.
    warm = {"min_len": args.max_len, "max_len": args.max_len, "batch_size": args.batch_size}
    tdsteer.extract(
        model,
        contrastive_batches(argparse.Namespace(**warm), args.batch_size, config.vocab_size, args.seed + 1),
        sites,
        method=args.method,
        progress=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_bytes()
    peak_before = peak_rss_bytes()

    with timed(device) as clock:
        vector = tdsteer.extract(
            model,
            contrastive_batches(args, args.examples, config.vocab_size, args.seed),
            sites,
            method=args.method,
            progress=False,
        )
    seconds = clock.wall
    return {
        "hidden": args.hidden,
        "method": args.method,
        "examples": args.examples,
        "num_examples_seen": vector.metadata["num_examples"],
        "batches": -(-args.examples // args.batch_size),
        "sites": sites,
        "device": str(device),
        "seconds": seconds,
        "examples_per_s": args.examples / seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_before_bytes": peak_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_bytes": current_rss_bytes(),
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# -- parent ---------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, method: str, examples: int) -> dict[str, Any]:
    command = [
        "--child",
        "--method",
        method,
        "--examples",
        str(examples),
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--min-len",
        str(args.min_len),
        "--max-len",
        str(args.max_len),
        "--seed",
        str(args.seed),
        "--hidden",
        str(args.hidden),
        "--layers",
        *map(str, args.layers),
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    result, seconds = run_child_process(
        __file__, command, what=f"child for {method} x {examples} examples", mmap_threshold=args.malloc_mmap_threshold
    )
    result["process_seconds"] = seconds
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        emit_result(child(args))
        return 0
    if args.min_len < 1 or args.max_len < args.min_len:
        raise SystemExit("--min-len must be >= 1 and <= --max-len")
    if args.hidden < 4 or args.hidden % 4:
        raise SystemExit("--hidden must be a positive multiple of 4 (4 heads)")
    if any(not 0 <= layer < 4 for layer in args.layers):
        raise SystemExit("--layers must be in 0..3")

    sizes = sorted(set(args.sizes))
    print(
        f"bench_extraction_memory: GPT-2 (4 layers, {args.hidden} hidden, vocab 1000, random weights) on "
        f"{args.device}, sites transformer.h.{{{','.join(map(str, args.layers))}}}, read last, batches of "
        f"{args.batch_size} pairs, lengths {args.min_len}-{args.max_len} (left padded); one fresh process per run; "
        + (
            f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
            if args.malloc_mmap_threshold > 0
            else "glibc's adaptive malloc"
        )
    )
    runs: list[dict[str, Any]] = []
    for method in args.methods:
        for examples in sizes:
            print(f"  running {method} over {examples} examples ...", file=sys.stderr, flush=True)
            runs.append(run_child(args, method, examples))

    cuda = args.device.startswith("cuda")
    print()
    header = (
        f"  {'method':<11}{'examples':>9}{'batches':>9}{'RSS before':>12}{'peak RSS':>10}{'growth':>8}"
        f"{'RSS after':>11}{'extract s':>11}{'ex/s':>9}"
    )
    if cuda:
        header += f"{'cuda peak':>11}"
    print_header(header + "   (MiB)", indent=2)
    for run in runs:
        growth = run["peak_rss_bytes"] - run["peak_rss_before_bytes"]
        line = (
            f"  {run['method']:<11}{run['examples']:>9}{run['batches']:>9}"
            f"{mib(run['rss_before_bytes'], unit=False):>12}{mib(run['peak_rss_bytes'], unit=False):>10}"
            f"{mib(growth, unit=False):>8}{mib(run['rss_after_bytes'], unit=False):>11}"
            f"{run['seconds']:>11.2f}{run['examples_per_s']:>9.0f}"
        )
        if cuda:
            line += f"{mib(run['cuda_peak_allocated_bytes'], unit=False):>11}"
        print(line)

    print(
        "  RSS before: after the warm-up batch; growth: peak RSS minus the peak the warm-up reached; "
        "RSS after: when the extraction returned"
    )
    ratios: dict[str, dict[str, Any]] = {}
    print()
    for method in args.methods:
        mine = [run for run in runs if run["method"] == method]
        small, large = mine[0], mine[-1]
        ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
        ratios[method] = {"small": small["examples"], "large": large["examples"], "peak_rss_ratio": ratio}
        verdict = "ok" if ratio <= RATIO_TARGET else "OVER"
        line = (
            f"  {method}: peak RSS {large['examples']} / {small['examples']} examples = {ratio:.3f}x "
            f"(target <= {RATIO_TARGET:.2f}x: {verdict})"
        )
        if cuda and small["cuda_peak_allocated_bytes"]:
            cuda_ratio = large["cuda_peak_allocated_bytes"] / small["cuda_peak_allocated_bytes"]
            ratios[method]["cuda_peak_ratio"] = cuda_ratio
            line += f"; CUDA peak allocated {cuda_ratio:.3f}x"
        print(line)
        if large["num_examples_seen"] != large["examples"]:
            print(f"  WARNING: {method} saw {large['num_examples_seen']} of {large['examples']} examples")

    results = {
        "device": args.device,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
        "lengths": [args.min_len, args.max_len],
        "layers": args.layers,
        "hidden": args.hidden,
        "malloc_mmap_threshold": args.malloc_mmap_threshold or None,
        "target_peak_rss_ratio": RATIO_TARGET,
        "runs": runs,
        "ratios": ratios,
    }
    device_type = "cuda" if cuda else "cpu"
    write_results(results, args.out, f"extraction-memory-{device_type}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
