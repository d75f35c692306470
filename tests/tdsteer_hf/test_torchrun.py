"""`tdsteer extract` under torchrun: each rank reads a shard of the pairs, rank 0 writes the one-process vector."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdsteer import SteeringVector
from tdsteer.cli import main
from tdsteer_hf.tiny import save_tiny_gpt2

PAIRS = [
    ("I love this movie", "I hate this movie"),
    ("the food was great", "the food was awful"),
    ("what a happy day", "what a sad day"),
    ("I really like it", "I really dislike it"),
    ("she was glad to see us", "she was sorry to see us"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "tdsteer", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("model"), [t for pair in PAIRS for t in pair], n_positions=16)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mean_diff", "probe"])
def test_two_ranks_give_the_one_process_vector(model_dir: Path, tmp_path: Path, method: str) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{p}\t{n}\n" for p, n in PAIRS))  # 5 pairs: an odd count over 2 ranks
    common = ["extract", "--model", str(model_dir), "--pairs", str(pairs), "--layers", "0,1", "--method", method]
    common += ["--device", "cpu", "--batch-size", "2", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "one.safetensors")]) == 0
    done = _torchrun(*common, "-o", str(tmp_path / "two.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Extracted vector") == 1  # rank 0 alone prints and writes
    one, two = SteeringVector.load(tmp_path / "one.safetensors"), SteeringVector.load(tmp_path / "two.safetensors")
    assert two.metadata["num_examples"] == 5 and two.metadata["ranks"] == 2
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_a_failing_rank_fails_every_rank_with_one_message(model_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    long = "I love this movie " * 8
    pairs.write_text(f"{PAIRS[0][0]}\t{PAIRS[0][1]}\n{long}\t{long}\n")  # rank 1's shard is too long
    done = _torchrun("extract", "--model", str(model_dir), "--pairs", str(pairs), "--device", "cpu", "-o", "x.st")
    assert done.returncode != 0
    # torchrun stops the other rank once one exits with an error, so one or both lines show, all the same
    errors = [line for line in done.stderr.splitlines() if "tdsteer: error:" in line]
    assert 1 <= len(errors) <= 2 and len({line.split("tdsteer: error:", 1)[1] for line in errors}) == 1, errors
    assert "rank 1 of 2 failed" in errors[0] and "at most 16 positions" in errors[0]
    # torchrun prints its own ChildFailedError traceback; no frame of tdsteer's may show
    assert not re.search(r'File "[^"]*tdsteer[^"]*\.py"', done.stderr), done.stderr[-3000:]
