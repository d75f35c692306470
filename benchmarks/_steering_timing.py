"""Timing and tables of bench_steering.py: interleaved rounds, medians and ratios, verdicts against targets.

Not a benchmark (``nox -s bench`` skips ``_*.py``); bench_steering.py imports it as ``_steering_timing``.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from _common import print_header, timed

FORWARD_TARGET = 1.02
EXTRACT_TARGET = 1.05
COMPILED_TARGET = 1.01  # compiled steered generation vs compiled plain

ContextFactory = Callable[[], AbstractContextManager[Any]]


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


# -- report ---------------------------------------------------------------------------------------


def target_for(section: str, name: str) -> float | None:
    if section == "compiled" and name.startswith("compiled tdsteer"):
        return COMPILED_TARGET
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
