"""Aggregator states all-reduce across torch.distributed processes (gloo, CPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tdsteer
from tdsteer import Extraction, extract

METHODS = ("mean_diff", "pca_diff", "probe", "actadd")


def _batches(method: str) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = (4, 5, 6) if method == "actadd" else (4, 6)
    return [
        {"positive": torch.randn(*shape, generator=generator) + 1, "negative": torch.randn(*shape, generator=generator)}
        for _ in range(6)
    ]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())


def _read(method: str) -> str:
    return "all" if method == "actadd" else "last"


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        for method in METHODS:
            shard = _batches(method)[rank::world]
            vector = extract(model, shard, ["1"], method=method, read=_read(method), progress=False, distributed=True)
            torch.save(
                {"direction": vector["1"], "n": vector.metadata["num_examples"]},
                os.path.join(out_dir, f"{method}-{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _examples(count: int, method: str) -> list[dict[str, torch.Tensor]]:
    """``count`` single-example batches, so that sharding by example is sharding by batch."""
    generator = torch.Generator().manual_seed(7)
    shape = (1, 3 + (count % 2), 6) if method == "actadd" else (1, 6)
    return [
        {"positive": torch.randn(*shape, generator=generator) + 1, "negative": torch.randn(*shape, generator=generator)}
        for _ in range(count)
    ]


COUNTS = (5, 1)  # odd, and fewer examples than ranks


def _sharding_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    with tdsteer.distributed.process_group():
        model = _model()
        for method in METHODS:
            for count in COUNTS:
                if method in ("pca_diff",) and count < 2:
                    continue
                mine = tdsteer.distributed.shard(_examples(count, method))
                # no distributed=True: a process group of two is found and used
                vector = extract(model, mine, ["1"], method=method, read=_read(method), progress=False)
                torch.save(vector["1"], os.path.join(out_dir, f"{method}-{count}-{rank}.pt"))
        bad = [{"positive": torch.ones(1, 6), "negative": torch.ones(1, 5)}] if rank == 1 else _examples(2, "mean_diff")
        try:
            extract(model, bad, ["1"], progress=False)
        except tdsteer.distributed.RankError as error:
            with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as handle:
                handle.write(str(error))


@pytest.mark.slow
def test_sharded_examples_give_the_one_process_vector(tmp_path):
    """Each rank reads a disjoint shard (odd counts, fewer examples than ranks); the result equals one process."""
    mp.spawn(_sharding_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = _model()
    for method in METHODS:
        for count in COUNTS:
            if method in ("pca_diff",) and count < 2:
                continue
            single = extract(model, _examples(count, method), ["1"], method=method, read=_read(method), progress=False)
            for rank in range(2):
                found = torch.load(tmp_path / f"{method}-{count}-{rank}.pt")
                torch.testing.assert_close(found, single["1"], atol=1e-6, rtol=1e-6, msg=f"{method}, {count} examples")
    # a failure on rank 1 fails both ranks with one message that names the rank
    messages = {(tmp_path / f"error-{rank}.txt").read_text() for rank in range(2)}
    assert len(messages) == 1 and next(iter(messages)).startswith("rank 1 of 2 failed")


@pytest.mark.slow
def test_two_process_all_reduce_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = _model()
    for method in METHODS:
        single = extract(model, _batches(method), ["1"], method=method, read=_read(method), progress=False)
        for rank in range(2):
            result = torch.load(tmp_path / f"{method}-{rank}.pt")
            torch.testing.assert_close(result["direction"], single["1"], atol=1e-6, rtol=1e-6, msg=method)
            assert result["n"] == single.metadata["num_examples"] == 24


def test_merge_refuses_other_sites():
    a = Extraction(["0"], "mean_diff")
    b = Extraction(["1"], "mean_diff")
    with pytest.raises(ValueError, match="same sites"):
        a.merge(b)
