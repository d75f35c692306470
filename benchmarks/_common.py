"""Helpers shared by the benchmark scripts in this folder (not a benchmark: ``nox -s bench`` skips ``_*.py``).

The scripts import it as ``_common``: see the comment above that import in each of them. torch is
imported only where a helper needs it, so that a parent process that only launches children stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

RESULTS = Path(__file__).resolve().parent / "results"
RESULT_MARK = "BENCH_RESULT "  # starts the line on which a child prints its result as JSON
# glibc's MALLOC_MMAP_THRESHOLD_ for the children (bytes): a fixed threshold keeps glibc from raising it
# as large blocks are freed, after which freed tensors stay in the heap and the peak RSS wanders.
STABLE_MMAP_THRESHOLD = 128 * 1024


# -- arguments ------------------------------------------------------------------------------------


def add_common_args(
    parser: argparse.ArgumentParser, *, results: str, threads: int | None = None, children: bool = False
) -> None:
    """Add ``--threads``, ``--seed`` and ``--out``, which every script takes (``nox -s bench -- ARGS``
    passes ``ARGS`` to all of them).

    Args:
        results: The file name under ``benchmarks/results/`` that ``--out`` defaults to, for the help.
        threads: The default of ``--threads`` (``None``: torch's).
        children: Whether the threads are those of the child processes.
    """
    where = " in each child" if children else ""
    default = "torch's" if threads is None else str(threads)
    parser.add_argument(
        "--threads", type=int, default=threads, help=f"torch intra-op threads{where} (default: {default})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default benchmarks/results/{results})")


def parse_with_quick(
    parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """Add ``--quick`` and parse ``argv``: with ``--quick``, ``quick`` replaces the defaults (options
    given on the command line still win)."""
    shown = " ".join(
        f"--{name.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for name, value in quick.items()
    )
    parser.add_argument(
        "--quick",
        "--smoke",
        dest="quick",
        action="store_true",
        help=f"a smoke run with small sizes, checks without timing verdicts (what CI runs): {shown}",
    )
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


# -- timing ---------------------------------------------------------------------------------------


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on CPU."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


@dataclass
class Stopwatch:
    """Seconds a :func:`timed` block took: wall-clock and this process's CPU time (all threads)."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timed(device: torch.device | None = None) -> Iterator[Stopwatch]:
    """Time the block; on CUDA the device is synchronised before and after, so its queued work counts.

    The :class:`Stopwatch` it yields holds the times once the block has ended.
    """
    clock = Stopwatch()
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    yield clock
    synchronize(device)
    clock.wall, clock.cpu = time.perf_counter() - start, time.process_time() - start_cpu


# -- memory ---------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def mib(n_bytes: float | None, *, unit: bool = True) -> str:
    """``n_bytes`` as ``"X.Y MiB"``, or ``"X.Y"`` with ``unit=False`` (a table cell under a MiB header);
    ``"-"`` for ``None``."""
    if n_bytes is None:
        return "-"
    return f"{n_bytes / 2**20:.1f}{' MiB' if unit else ''}"


# -- tables and results ---------------------------------------------------------------------------


def print_header(header: str, *, indent: int = 0, extend: int = 0) -> None:
    """Print a table's header line and a rule of dashes under it that starts ``indent`` characters in
    and ends ``extend`` characters past the header."""
    print(header)
    print(" " * indent + "-" * (len(header) - indent + extend))


def write_results(results: dict[str, Any], out: Path | None, name: str) -> Path:
    """Write ``results`` as JSON to ``out``, or to ``benchmarks/results/<name>``, and say where."""
    path = out or RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


# -- child processes ------------------------------------------------------------------------------


def emit_result(result: dict[str, Any]) -> None:
    """In a child: print ``result`` for :func:`run_child_process` to read."""
    print(RESULT_MARK + json.dumps(result))


def run_child_process(
    script: str | Path, args: list[str], *, what: str, mmap_threshold: int = 0
) -> tuple[dict[str, Any], float]:
    """Run ``script`` with ``args`` in a fresh Python process, so that its peak memory is its own.

    Args:
        script: The script to run (``__file__`` of the caller).
        args: Its command-line arguments.
        what: What the child does, for the error messages (``"child record (2000 examples)"``).
        mmap_threshold: ``MALLOC_MMAP_THRESHOLD_`` for the child in bytes; 0 leaves glibc's adaptive default.

    Returns:
        What the child passed to :func:`emit_result`, and the wall-clock seconds of the process.

    Raises:
        SystemExit: When the child fails or prints no result (its output goes to stderr).
    """
    command = [sys.executable, str(Path(script).resolve()), *args]
    env = dict(os.environ)
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with timed() as clock:
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{what} failed with exit code {done.returncode}")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :]), clock.wall
    raise SystemExit(f"{what} printed no result:\n{done.stdout}{done.stderr}")
