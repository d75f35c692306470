"""Aggregator states all-reduce across torch.distributed processes (gloo, CPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
