"""The layer sweep: one forward pass over the data for every layer, vectors equal to direct extraction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import tdsteer
import tdsteer_hf
from tdsteer_eval import EvalOptions, SteeredLM, layer_sweep, layer_vectors, record_layers, task_manager
from tdsteer_eval.task_data import SHIPPED_TASKS
from tdsteer_hf.pair_files import read_pairs


@pytest.fixture(scope="module")
def batches(tiny: Any) -> Any:
    pairs = read_pairs(SHIPPED_TASKS["tdsteer_caa_ab"][1])
    return tdsteer_hf.contrastive_batches(tiny.tokenizer, pairs, batch_size=3, padding_side="right")


def _count_calls(model: torch.nn.Module) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_one_forward_pass_for_every_layer_and_vectors_equal_direct_extraction(tiny: Any, batches: Any) -> None:
    sites = tdsteer_hf.sites(tiny.model)  # every layer
    calls, handle = _count_calls(tiny.model)
    try:
        cache = record_layers(tiny.model, batches, sites)
    finally:
        handle.remove()
    assert len(calls) == 2 * len(batches)  # positives and negatives of each batch, once, for all layers
    vectors = layer_vectors(cache, sites)
    assert list(vectors) == [site.key for site in sites]
    for site in sites:
        direct = tdsteer.extract(tiny.model, batches, [site], method="mean_diff", read="last", progress=False)
        torch.testing.assert_close(vectors[site.key][site.key], direct[site.key], rtol=1e-6, atol=1e-7)


def test_layer_sweep_writes_a_heatmap_and_the_best_layer(tiny: Any, batches: Any, tmp_path: Path) -> None:
    lm = SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, batch_size=4)
    sites = tdsteer_hf.sites(tiny.model)
    lines: list[str] = []
    data = layer_sweep(
        lm,
        batches,
        sites,
        ["tdsteer_caa_ab"],
        [-8.0, 8.0],
        tmp_path / "layers",
        manager=task_manager(["tdsteer_caa_ab"]),
        options=EvalOptions(limit=2),
        progress=lines.append,
    )
    assert lines[0].startswith("recorded 2 layers in one pass") and len(lines) == 1 + 2 * 2
    layers = data["summary"]["layers"]
    assert list(layers) == [s.key for s in sites]
    best = max(layers, key=lambda key: layers[key]["tdsteer_caa_ab"]["steerability"])
    assert data["summary"]["best_layer"]["layer"] == best
    stored = json.loads((tmp_path / "layers" / "results.json").read_text())
    assert {row["layer"] for row in stored["items"]} == set(layers)
    assert (tmp_path / "layers" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert f"Best layer: **{best}**" in (tmp_path / "layers" / "report.md").read_text()
    assert lm.vector is tiny.vector or lm.vector.keys() == tiny.vector.keys()  # restored
