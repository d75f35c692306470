"""Scaling out: data parallelism under ``accelerate launch`` (two CPU processes) and ``parallelize=True``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lm_eval.api.instance import Instance

from tdsteer.cli import main
from tdsteer_eval import SteeredLM

# Failures that say the machine cannot run two gloo processes, not that tdsteer is wrong.
ENVIRONMENT_FAILURES = ("Address already in use", "Connection refused", "No route to host", "connectFullMesh failed")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _sweep_args(tiny_dir: Path, out: Path) -> list[str]:
    argv = ["sweep", "--model", str(tiny_dir / "model"), "--vector", str(tiny_dir / "vector.safetensors")]
    argv += ["--tasks", "tdsteer_caa_ab", "--scales", "0,4", "--positions", "continuation", "--limit", "5"]
    return argv + ["--device", "cpu", "--dtype", "float32", "-o", str(out)]


@pytest.mark.slow
def test_sweep_under_accelerate_launch_with_two_cpu_processes(tiny_dir: Path, tmp_path: Path) -> None:
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    # On CPUs accelerate runs several processes with --multi_gpu plus ACCELERATE_USE_CPU (gloo); --cpu alone
    # launches one process.
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command += ["-m", "tdsteer", *_sweep_args(tiny_dir, tmp_path / "parallel")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    if done.returncode != 0 and any(text in done.stderr for text in ENVIRONMENT_FAILURES):
        pytest.skip(f"accelerate launch cannot run two CPU processes here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("scale 4:") == 1 and done.stdout.count("Wrote ") == 1  # only rank 0 reports
    parallel = json.loads((tmp_path / "parallel" / "results.json").read_text())
    assert main(_sweep_args(tiny_dir, tmp_path / "single")) == 0
    single = json.loads((tmp_path / "single" / "results.json").read_text())

    def rows(data: dict[str, Any]) -> list[tuple[float, int, float]]:
        return sorted((r["scale"], r["doc_id"], round(r["propensity"], 4)) for r in data["items"])

    assert len(parallel["items"]) == 2 * 5  # five documents, split over two processes, gathered once
    assert rows(parallel) == rows(single)


def test_parallelize_places_the_model_with_a_device_map(
    tiny_dir: Path, tmp_path: Path, caa_requests: list[Instance]
) -> None:
    common: dict[str, Any] = {
        "pretrained": str(tiny_dir / "model"),
        "vector": str(tiny_dir / "vector.safetensors"),
        "scale": 4.0,
        "positions": "continuation",
        "device": "cpu",
        "dtype": "float32",
    }
    # no GPU: accelerate's device map offloads the weights (to disk here) and loads each layer as it runs
    spread = SteeredLM(**common, parallelize=True, offload_folder=str(tmp_path / "offload"))
    assert getattr(spread.model, "hf_device_map", None)
    one_device = SteeredLM(**common)
    assert spread.loglikelihood(caa_requests, disable_tqdm=True) == one_device.loglikelihood(
        caa_requests, disable_tqdm=True
    )
