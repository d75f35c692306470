"""Memory, disk size and speed of ``tdsteer.ActivationCache`` recorded to disk.

Records ``N`` labelled examples x 12 sites x hidden 768 (one row per example, ``read="last"``) with
a model of 12 cheap elementwise blocks, so that the cache, not the model, is what is measured:

* (a) peak RSS and wall time of the recording, each size in a fresh subprocess (default 2,000 and
  20,000 examples, preallocated with ``num_examples=``; the largest size once more without it, so
  the cache grows ``chunk_rows`` rows at a time). The child reports ``ru_maxrss`` and splits its
  resident memory into anonymous memory (heap, tensors) and file-backed pages (the memory-mapped
  cache files), sampled every 5 ms, and how much of it the cache's own mappings hold;
* (b) the bytes on disk against ``examples x sites x hidden x bytes per element``: the overhead is
  the four int64 row columns (``label``, ``pair``, ``index``, ``length``: 32 bytes a row), the two
  JSON files and, for a grown cache, the rows allocated but never filled;
* (c) reopening the largest cache (``ActivationCache.load``) and fitting ``to_vector("mean_diff")``,
  in a fresh subprocess, with the files evicted from the page cache first (cold) and again warm.

``ru_maxrss`` counts every page the process has resident, the file-backed pages of its ``MAP_SHARED``
mappings included: pages of the cache files written through the cache's memory maps stay in the
recording process's resident set (as page cache the kernel can reclaim) until the cache object is
dropped. The table therefore splits the peak into anonymous and file-backed memory, and gives the
resident pages of the cache's own mappings (``/proc/self/smaps``) and the RSS after ``del cache``.

The caches go to a temporary folder (``--dir`` to choose where) and are deleted at the end.

    python benchmarks/bench_cache.py                       # 2,000 and 20,000 examples, float16
    python benchmarks/bench_cache.py --stable-malloc       # fixed glibc mmap threshold in the children
    python benchmarks/bench_cache.py --sizes 1000 5000 --dtype float32
    python benchmarks/bench_cache.py --quick               # a smoke run: 256 and 2,048 examples
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tdsteer

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

RSS_TARGET = 1.10  # peak RSS of the largest recording over the smallest
ROW_FIELD_BYTES = 4 * 8  # label, pair, index, length: int64 each
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
QUICK = {"sizes": [256, 2048], "chunk_rows": 1024}  # the grown cache still takes two chunks


# -- the model and the data -----------------------------------------------------------------------
class CheapBlock(nn.Module):
    """An elementwise residual block: no matmul, so the forward costs little next to the cache."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.01 * x.tanh()


class CheapModel(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CheapBlock() for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def labelled_batches(examples: int, batch: int, seq_len: int, hidden: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Labelled batches built one at a time (random, seeded per batch); label 1 rows are shifted."""
    for i, start in enumerate(range(0, examples, batch)):
        size = min(batch, examples - start)
        generator = torch.Generator().manual_seed(seed + i)
        labels = torch.randint(0, 2, (size,), generator=generator)
        inputs = torch.randn(size, seq_len, hidden, generator=generator) + 0.25 * labels[:, None, None]
        yield {"inputs": inputs, "labels": labels}


# -- process memory -------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """Memory lines of ``/proc/self/status`` in KiB (empty where the file does not exist)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in STATUS_FIELDS:
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


class PeakSampler:
    """Reads ``/proc/self/status`` every ``interval`` seconds in a thread; keeps the peak of each field."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        for name, value in proc_status().items():
            self.peak[name] = max(self.peak.get(name, 0), value)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> PeakSampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


def mapped_rss_kib(folder: Path) -> tuple[int, int]:
    """Resident KiB and number of this process's mappings of files under ``folder`` (``/proc/self/smaps``)."""
    prefix = str(folder.resolve()) + os.sep
    total, maps, inside = 0, 0, False
    try:
        with open("/proc/self/smaps") as handle:
            for line in handle:
                head = line.split(maxsplit=5)
                if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    inside = len(head) == 6 and head[5].strip().startswith(prefix)
                    maps += inside
                elif inside and head and head[0] == "Rss:":
                    total += int(head[1])
    except OSError:
        return -1, -1
    return total, maps


# -- children: one recording, or one reopen-and-fit, per fresh process ---------------------------
def child_record(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = CheapModel(args.sites).eval()
    sites = [f"blocks.{i}" for i in range(args.sites)]
    path = Path(args.path)
    batches = labelled_batches(args.examples, args.batch, args.seq_len, args.hidden, args.seed)
    before = proc_status()
    before_peak = peak_rss_bytes() // 1024
    with PeakSampler() as sampler, timed() as clock:
        cache = tdsteer.ActivationCache.record(
            model,
            batches,
            sites,
            path=path,
            read="last",
            dtype=DTYPES[args.dtype],
            num_examples=args.examples if args.preallocate else None,
            chunk_rows=args.chunk_rows,
            progress=False,
        )
    record_s = clock.wall
    at_end = proc_status()
    cache_rss, cache_maps = mapped_rss_kib(path)
    result = {
        "examples": args.examples,
        "preallocated": bool(args.preallocate),
        "rows": len(cache),
        "chunk_rows": [chunk.rows for chunk in cache.chunks],
        "record_s": record_s,
        "ru_maxrss_kib_before": before_peak,
        "status_before_kib": before,
        "status_end_kib": at_end,
        "peak_anon_kib": sampler.peak.get("RssAnon", 0),
        "peak_file_kib": sampler.peak.get("RssFile", 0),
        "samples": sampler.samples,
        "cache_maps": cache_maps,
        "cache_maps_rss_kib": cache_rss,
    }
    del cache
    gc.collect()
    result["status_after_release_kib"] = proc_status()
    result["cache_maps_rss_after_release_kib"] = mapped_rss_kib(path)[0]
    result["ru_maxrss_kib"] = peak_rss_bytes() // 1024  # read last: the peak of the whole child
    return result


def child_fit(args: argparse.Namespace) -> dict[str, Any]:
    before_peak = peak_rss_bytes() // 1024
    before = proc_status()
    with PeakSampler() as sampler:
        with timed() as load:
            cache = tdsteer.ActivationCache.load(args.path)
        with timed() as fit:
            vector = cache.to_vector("mean_diff")
    load_s, fit_s = load.wall, fit.wall
    peak = peak_rss_bytes() // 1024
    cache_rss, cache_maps = mapped_rss_kib(Path(args.path))
    # check one site against a direct float64 mean difference over the whole column
    key = f"blocks.{args.sites - 1}"
    labels = cache.labels
    column = cache[key].double()
    direct = column[labels == 1].mean(0) - column[labels == 0].mean(0)
    error = float((vector[key].double() - direct).abs().max())
    return {
        "rows": len(cache),
        "chunks": len(cache.chunks),
        "load_s": load_s,
        "to_vector_s": fit_s,
        "ru_maxrss_kib_before": before_peak,
        "ru_maxrss_kib": peak,
        "status_before_kib": before,
        "peak_anon_kib": sampler.peak.get("RssAnon", 0),
        "peak_file_kib": sampler.peak.get("RssFile", 0),
        "cache_maps": cache_maps,
        "cache_maps_rss_kib": cache_rss,
        "sites_fitted": len(vector),
        "max_abs_error_vs_direct": error,
        "direction_norm": float(vector[key].double().norm()),
    }


def run_child(args: argparse.Namespace, mode: str, path: Path, examples: int, preallocate: bool) -> dict[str, Any]:
    command = [
        "--child",
        mode,
        "--path",
        str(path),
        "--examples",
        str(examples),
        "--sites",
        str(args.sites),
        "--hidden",
        str(args.hidden),
        "--seq-len",
        str(args.seq_len),
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
        "--chunk-rows",
        str(args.chunk_rows),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ] + (["--preallocate"] if preallocate else [])
    result, wall = run_child_process(
        __file__,
        command,
        what=f"child {mode} ({examples} examples)",
        mmap_threshold=STABLE_MMAP_THRESHOLD if args.stable_malloc else 0,
    )
    result["process_wall_s"] = wall
    return result


# -- disk -----------------------------------------------------------------------------------------
def disk_usage(folder: Path) -> dict[str, int]:
    """Apparent bytes (``st_size``) and allocated bytes (``st_blocks``) of the files under ``folder``."""
    out = {"apparent": 0, "allocated": 0, "data_files": 0, "row_files": 0, "json_files": 0, "files": 0}
    row_names = {f"{name}.bin" for name in ("label", "pair", "index", "length")}
    for file in folder.rglob("*"):
        if not file.is_file():
            continue
        stat = file.stat()
        out["files"] += 1
        out["apparent"] += stat.st_size
        out["allocated"] += stat.st_blocks * 512
        kind = "json_files" if file.suffix == ".json" else "row_files" if file.name in row_names else "data_files"
        out[kind] += stat.st_size
    return out


def disk_report(
    folder: Path, examples: int, allocated_rows: int, sites: int, hidden: int, dtype: str
) -> dict[str, Any]:
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    expected = examples * sites * hidden * element
    usage = disk_usage(folder)
    overhead = usage["apparent"] - expected
    return {
        "expected_data_bytes": expected,
        "bytes_per_element": element,
        "actual_bytes": usage["apparent"],
        "allocated_bytes": usage["allocated"],
        "files": usage["files"],
        "overhead_bytes": overhead,
        "overhead_pct": 100.0 * overhead / expected,
        "row_columns_bytes": usage["row_files"],
        "row_columns_expected_bytes": allocated_rows * ROW_FIELD_BYTES,
        "json_bytes": usage["json_files"],
        "unfilled_rows": allocated_rows - examples,
        "unfilled_rows_bytes": (allocated_rows - examples) * (sites * hidden * element + ROW_FIELD_BYTES),
        "matches_formula": usage["apparent"]
        == allocated_rows * (sites * hidden * element + ROW_FIELD_BYTES) + usage["json_files"],
    }


def evict(folder: Path) -> float:
    """Write the files under ``folder`` back and drop them from the page cache; returns the seconds taken."""
    start = time.perf_counter()
    for file in folder.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return time.perf_counter() - start


# -- printing -------------------------------------------------------------------------------------
def print_recordings(records: list[dict[str, Any]]) -> None:
    header = (
        f"{'examples':>9} {'mode':<12} {'rows':>7} {'chunks':>6} {'record s':>9} {'child s':>8} {'ex/s':>7} "
        f"{'peak RSS':>9} {'before':>8} {'+during':>8} {'anon pk':>8} {'file pk':>8} {'cache maps':>10} "
        f"{'released':>8}"
    )
    print_header(header)
    for r in records:
        mode = "num_examples" if r["preallocated"] else "grown"
        # the child reports KiB; the columns are MiB
        peak, before, during, anon, file, maps, released = (
            mib(kib * 1024, unit=False)
            for kib in (
                r["ru_maxrss_kib"],
                r["ru_maxrss_kib_before"],
                r["ru_maxrss_kib"] - r["ru_maxrss_kib_before"],
                r["peak_anon_kib"],
                r["peak_file_kib"],
                r["cache_maps_rss_kib"],
                r["status_after_release_kib"].get("VmRSS", 0),
            )
        )
        print(
            f"{r['examples']:>9} {mode:<12} {r['rows']:>7} {len(r['chunk_rows']):>6} {r['record_s']:>9.2f} "
            f"{r['process_wall_s']:>8.2f} {r['examples'] / r['record_s']:>7.0f} {peak:>8} {before:>8} {during:>8} "
            f"{anon:>8} {file:>8} {maps:>10} {released:>8}"
        )
    print(
        "(MiB; peak RSS = ru_maxrss of the child; before = ru_maxrss after imports and model, before recording; "
        "anon pk / file pk = peak RssAnon / RssFile sampled every 5 ms; cache maps = resident pages of the "
        "child's mappings of the cache files when record() returns; released = VmRSS after `del cache`)"
    )


def print_disk(name: str, d: dict[str, Any]) -> None:
    print(
        f"  {name}: expected data {d['expected_data_bytes']:,} B, actual {d['actual_bytes']:,} B "
        f"({d['files']} files; {d['allocated_bytes']:,} B allocated on disk)\n"
        f"    overhead {d['overhead_bytes']:,} B = {d['overhead_pct']:.3f}% of the data: row columns "
        f"{d['row_columns_bytes']:,} B (32 B x allocated rows = {d['row_columns_expected_bytes']:,}), JSON "
        f"{d['json_bytes']:,} B, unfilled rows {d['unfilled_rows']:,} ({d['unfilled_rows_bytes']:,} B); "
        f"matches rows x (sites x hidden x {d['bytes_per_element']} + 32) + JSON: {d['matches_formula']}"
    )


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="examples per recording")
    parser.add_argument("--sites", type=int, default=12, help="blocks, all recorded")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq-len", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="cache storage dtype")
    parser.add_argument("--chunk-rows", type=int, default=16384, help="rows per chunk when the cache grows")
    add_common_args(parser, results="cache.json", threads=1, children=True)
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary caches go (default: the tmp dir)")
    parser.add_argument("--no-grown", action="store_true", help="skip the largest size recorded without num_examples")
    parser.add_argument("--no-cold", action="store_true", help="skip evicting the page cache before reopening")
    parser.add_argument("--keep", action="store_true", help="keep the caches instead of deleting them")
    parser.add_argument(
        "--stable-malloc",
        action="store_true",
        help=f"run the children with MALLOC_MMAP_THRESHOLD_={STABLE_MMAP_THRESHOLD} (glibc), so that heap retention "
        "does not blur the anonymous-memory peaks",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when the peak RSS target is missed")
    # internal: one measurement in a fresh process
    parser.add_argument("--child", choices=["record", "fit"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--preallocate", action="store_true", help=argparse.SUPPRESS)
    return parse_with_quick(parser, argv, QUICK)


def needed_bytes(args: argparse.Namespace) -> int:
    element = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    row = args.sites * args.hidden * element + ROW_FIELD_BYTES
    largest = max(args.sizes)
    total = sum(args.sizes) * row
    if not args.no_grown:
        total += math.ceil(largest / args.chunk_rows) * args.chunk_rows * row
    return int(total * 1.1) + 64 * 2**20


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        torch.set_num_threads(args.threads)
        result = child_record(args) if args.child == "record" else child_fit(args)
        emit_result(result)
        return 0

    sizes = sorted(set(args.sizes))
    base = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need, free = needed_bytes(args), shutil.disk_usage(base).free
    print(f"disk: {free / 2**30:.1f} GiB free under {base}, at most {need / 2**30:.2f} GiB needed")
    if free < need:
        print(f"not enough free disk under {base}: choose another folder with --dir", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="tdsteer-bench-cache-", dir=base))
    print(
        f"ActivationCache.record: {args.sites} sites x hidden {args.hidden}, {args.dtype}, read='last', labelled "
        f"batches of {args.batch} x {args.seq_len} tokens, {args.threads} torch thread(s); caches in {root}\n"
    )
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in CHILD_ARGS},
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tdsteer": getattr(tdsteer, "__version__", "?"),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "recordings": [],
        "disk": {},
        "reopen": {},
    }
    try:
        runs = [(n, True) for n in sizes] + ([] if args.no_grown else [(sizes[-1], False)])
        folders: dict[str, Path] = {}
        for examples, preallocate in runs:
            name = f"{examples}-{'preallocated' if preallocate else 'grown'}"
            folder = root / name
            print(f"recording {name} ...", flush=True)
            record = run_child(args, "record", folder, examples, preallocate)
            record["name"] = name
            results["recordings"].append(record)
            allocated = sum(record["chunk_rows"])
            results["disk"][name] = disk_report(folder, examples, allocated, args.sites, args.hidden, args.dtype)
            folders[name] = folder
            if examples != sizes[-1] and not args.keep:
                shutil.rmtree(folder)  # free the disk early; only the largest caches are reopened
        print()
        print_recordings(results["recordings"])
        for r in results["recordings"]:
            files = results["disk"][r["name"]]["allocated_bytes"]
            maps = r["cache_maps_rss_kib"] * 1024
            print(
                f"  {r['name']}: the child's {r['cache_maps']} mappings of the cache files hold "
                f"{mib(maps)} resident when record() returns "
                f"({100 * maps / files:.1f}% of the {mib(files)} allocated on disk); "
                f"RssFile {mib(r['status_end_kib'].get('RssFile', 0) * 1024, unit=False)} -> "
                f"{mib(r['status_after_release_kib'].get('RssFile', 0) * 1024)} after `del cache`"
            )

        smallest, largest = results["recordings"][0], results["recordings"][len(sizes) - 1]
        summary: dict[str, Any] = {}
        print(f"\npeak RSS, {largest['examples']} vs {smallest['examples']} examples (target <= {RSS_TARGET:.2f}x):")
        for r in results["recordings"][len(sizes) - 1 :]:
            mode = "num_examples" if r["preallocated"] else "grown"
            rss = r["ru_maxrss_kib"] / smallest["ru_maxrss_kib"]
            anon = r["peak_anon_kib"] / max(smallest["peak_anon_kib"], 1)
            added = (r["ru_maxrss_kib"] - smallest["ru_maxrss_kib"]) / 1024
            # ru_maxrss without the cache files' pages that the cache's own mappings hold when record() returns
            rest, rest_small = (x["ru_maxrss_kib"] - x["cache_maps_rss_kib"] for x in (r, smallest))
            summary[r["name"]] = {
                "ru_maxrss_ratio": rss,
                "ru_maxrss_added_mib": added,
                "peak_anon_ratio": anon,
                "ru_maxrss_without_cache_maps_ratio": rest / rest_small,
                "cache_maps_added_mib": (r["cache_maps_rss_kib"] - smallest["cache_maps_rss_kib"]) / 1024,
            }
            verdict = "PASS" if rss <= RSS_TARGET else "MISS"
            print(
                f"  {mode:<12} ru_maxrss {smallest['ru_maxrss_kib']:,} -> {r['ru_maxrss_kib']:,} KiB = {rss:.3f}x "
                f"(+{added:.1f} MiB) {verdict}\n"
                f"  {'':<12} of which the cache's mapped file pages: "
                f"+{summary[r['name']]['cache_maps_added_mib']:.1f} MiB; ru_maxrss without them {rest_small:,} -> "
                f"{rest:,} KiB = {rest / rest_small:.3f}x; anonymous peak {smallest['peak_anon_kib']:,} -> "
                f"{r['peak_anon_kib']:,} KiB = {anon:.3f}x"
            )
        if not args.stable_malloc:
            print(
                "  (the anonymous peak moves by tens of MiB from run to run with glibc's dynamic mmap threshold; "
                "--stable-malloc fixes it)"
            )
        wall = largest["record_s"] / smallest["record_s"]
        print(
            f"wall time, {largest['examples']} vs {smallest['examples']} examples: record "
            f"{smallest['record_s']:.2f} s -> {largest['record_s']:.2f} s = {wall:.2f}x for "
            f"{largest['examples'] / smallest['examples']:.0f}x the examples; child process "
            f"{smallest['process_wall_s']:.2f} s -> {largest['process_wall_s']:.2f} s"
        )
        summary["record_time_ratio"] = wall
        results["summary"] = summary

        print("\non disk:")
        for name, d in results["disk"].items():
            print_disk(name, d)

        print("\nreopen + to_vector('mean_diff') (fresh process each):")
        for name, folder in folders.items():
            if not folder.exists():
                continue
            passes = [("cold", True), ("warm", False)] if name.endswith("preallocated") else [("warm", False)]
            for label, cold in passes:
                if cold and args.no_cold:
                    continue
                evict_s = evict(folder) if cold else 0.0
                fit = run_child(args, "fit", folder, 0, False)
                fit["evict_s"] = evict_s
                results["reopen"][f"{name}-{label}"] = fit
                before = fit["status_before_kib"]
                print(
                    f"  {name:<20} {label}: load {fit['load_s'] * 1e3:.1f} ms, to_vector {fit['to_vector_s']:.2f} s "
                    f"over {fit['rows']} rows x {args.sites} sites ({fit['chunks']} chunk(s)); max |vector - direct "
                    f"mean diff| {fit['max_abs_error_vs_direct']:.2e}"
                    + (f"; eviction first (fsync + fadvise) {evict_s:.2f} s" if cold else "")
                    + f"\n    child RSS: peak {mib(fit['ru_maxrss_kib'] * 1024)} (before load "
                    f"{mib(fit['ru_maxrss_kib_before'] * 1024, unit=False)}); anonymous "
                    f"{mib(before.get('RssAnon', 0) * 1024, unit=False)} -> "
                    f"peak {mib(fit['peak_anon_kib'] * 1024, unit=False)}, file-backed "
                    f"{mib(before.get('RssFile', 0) * 1024, unit=False)} -> "
                    f"peak {mib(fit['peak_file_kib'] * 1024, unit=False)}; cache maps resident "
                    f"{mib(fit['cache_maps_rss_kib'] * 1024, unit=False)}"
                )
    finally:
        if args.keep:
            print(f"\ncaches kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    write_results(results, args.out, "cache.json")
    missed = any(s["ru_maxrss_ratio"] > RSS_TARGET for k, s in summary.items() if isinstance(s, dict))
    return 1 if (args.strict and missed) else 0


CHILD_ARGS = {"child", "path", "examples", "preallocate"}

if __name__ == "__main__":
    sys.exit(main())
