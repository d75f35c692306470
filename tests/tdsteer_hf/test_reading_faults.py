"""Readings are what the modules really output: never a view that a later in-place operation changes,
never padding, and a container site is refused with the block to read instead."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from hf_tiny import IDS, LLAMA_LIKE, VOCAB
from torch import Tensor, nn

import tdsteer
import tdsteer_hf
from tdsteer import ActivationAddition, Site
from tdsteer.cache import ActivationCache


@pytest.fixture(scope="module")
def falcon() -> nn.Module:
    """Falcon's decoder layer does ``mlp_output += attention_output`` after its MLP (whose output is
    the ``mlp_out`` site) returned: the MLP's output tensor changes later in the same forward."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, initializer_range=0.2, **IDS
    )
    return transformers.FalconForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE)).eval()


def _text(rows: int, length: int, seed: int, *, pad: bool) -> dict[str, Tensor]:
    """Token ids with left padding of 0, 1 or 2 tokens per row (when ``pad``)."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        for row in range(rows):
            mask[row, : row % 3] = 0
    return {"input_ids": ids.masked_fill(mask == 0, IDS["pad_token_id"]), "attention_mask": mask}


def _batches(*, pad: bool, rows: int = 4, length: int = 7) -> list[dict[str, Any]]:
    return [
        {"positive": _text(rows, length, 1, pad=pad), "negative": _text(rows, length, 2, pad=pad)},
        {"positive": _text(rows, length, 3, pad=pad), "negative": _text(rows, length, 4, pad=pad)},
    ]


def _outputs(model: nn.Module, site: Site, inputs: dict[str, Tensor]) -> Tensor:
    """What ``site``'s module really output on ``inputs``: cloned in a hook, before anything else ran."""
    seen: list[Tensor] = []
    handle = site.module(model).register_forward_hook(lambda m, a, o: seen.append(site.select(o).detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    (output,) = seen
    return output


def _rows(model: nn.Module, site: Site, batches: list[dict[str, Any]], side: str) -> tuple[Tensor, Tensor]:
    """Every batch's real outputs at ``site`` on one side: values ``[N, L, C]`` and mask ``[N, L]``."""
    values = torch.cat([_outputs(model, site, batch[side]) for batch in batches])
    mask = torch.cat([batch[side]["attention_mask"] for batch in batches]).bool()
    return values, mask


def _mlp_then_block(model: nn.Module) -> list[Site]:
    """The MLP output of layer 1 (changed in place after its hook), then a later site (the forward
    goes on past the in-place change before extraction stops)."""
    sites = tdsteer_hf.sites(model, [1], kind="mlp_out") + tdsteer_hf.sites(model, [2])
    assert sites[0].path == "transformer.h.1.mlp"
    return sites


def _assert_changed_in_place(model: nn.Module, site: Site) -> None:
    """The hazard is real in this model: what a hook kept of the output without a copy is not what
    the module returned."""
    kept: list[Tensor] = []
    handle = site.module(model).register_forward_hook(lambda m, a, o: kept.append(o.detach()))
    inputs = _text(2, 5, 1, pad=False)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert not torch.allclose(kept[0], _outputs(model, site, inputs), atol=1e-3)


@pytest.mark.parametrize("pad", [False, True], ids=["full", "left-padded"])
def test_read_all_mean_diff_is_the_mean_over_the_real_tokens_the_module_output(falcon, pad):
    sites = _mlp_then_block(falcon)
    _assert_changed_in_place(falcon, sites[0])
    batches = _batches(pad=pad)
    vector = tdsteer.extract(falcon, batches, sites, read="all", progress=False)
    for site in sites:
        pos, pos_mask = _rows(falcon, site, batches, "positive")
        neg, neg_mask = _rows(falcon, site, batches, "negative")
        expected = pos[pos_mask].double().mean(0) - neg[neg_mask].double().mean(0)
        torch.testing.assert_close(vector[site.key].double(), expected, atol=1e-6, rtol=1e-5)


def test_actadd_is_the_per_position_difference_of_what_the_module_output(falcon):
    sites = _mlp_then_block(falcon)
    batches = _batches(pad=False)[:1]
    vector = tdsteer.extract(falcon, batches, sites, method="actadd", read="all", progress=False)
    for site in sites:
        pos, _ = _rows(falcon, site, batches, "positive")
        neg, _ = _rows(falcon, site, batches, "negative")
        expected = (pos.double() - neg.double()).mean(0)  # [L, C], every token real
        torch.testing.assert_close(vector[site.key].double(), expected, atol=1e-6, rtol=1e-5)


def _last_view(h: Tensor, ctx: tdsteer.ReadContext) -> Tensor:
    """A custom reader returning a view of the activation (basic indexing does not copy)."""
    return h[:, -1]


def test_a_custom_reader_returning_a_view_reads_what_the_module_output(falcon):
    sites = _mlp_then_block(falcon)
    batches = _batches(pad=False)
    vector = tdsteer.extract(falcon, batches, sites, read=_last_view, progress=False)
    for site in sites:
        pos, _ = _rows(falcon, site, batches, "positive")
        neg, _ = _rows(falcon, site, batches, "negative")
        expected = pos[:, -1].double().mean(0) - neg[:, -1].double().mean(0)
        torch.testing.assert_close(vector[site.key].double(), expected, atol=1e-6, rtol=1e-5)


class _Logits(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def test_activation_addition_reads_what_the_module_output(falcon):
    """The tdhook-style factory shares extraction's recorder, and so its copy."""
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule

    sites = _mlp_then_block(falcon)
    batch = _batches(pad=True)[0]
    td = TensorDict({side: batch[side] for side in ("positive", "negative")}, batch_size=[4])
    module = TensorDictModule(_Logits(falcon), in_keys=["input_ids", "attention_mask"], out_keys=["logits"])
    wrapped = [dataclasses.replace(site, path=f"module.lm.{site.path}") for site in sites]
    with ActivationAddition(wrapped, read="all").prepare(module) as hooked:
        out = hooked(td)
    site, key = sites[0], wrapped[0].key
    pos, pos_mask = _rows(falcon, site, [batch], "positive")
    neg, neg_mask = _rows(falcon, site, [batch], "negative")
    expected = pos[pos_mask].double().mean(0) - neg[neg_mask].double().mean(0)
    torch.testing.assert_close(out["steer", key].double(), expected, atol=1e-6, rtol=1e-5)


def test_cache_rows_are_what_the_module_output_with_a_view_returning_reader(falcon):
    """The activation cache records through the same recorder: its rows are the module's real output
    (on the CPU in float32 a row is not copied when it is stored, so a view would be kept as is)."""
    sites = _mlp_then_block(falcon)
    batches = _batches(pad=False)
    cache = ActivationCache.record(falcon, batches, sites, read=_last_view, progress=False)
    site = sites[0]
    pos, _ = _rows(falcon, site, batches, "positive")
    neg, _ = _rows(falcon, site, batches, "negative")
    expected = torch.stack([pos[:, -1], neg[:, -1]], 1).reshape(-1, pos.shape[-1])  # pairs interleaved
    torch.testing.assert_close(cache[site.key].float(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("read", ["patch_mean", "spatial_mean"])
def test_image_means_on_padded_text_never_average_the_padding(llama, read):
    """A text model's sites have no prefix tokens: these reads are the mean over the real tokens."""
    site = tdsteer_hf.sites(llama, [1])[0]
    batches = _batches(pad=True)
    vector = tdsteer.extract(llama, batches, [site], read=read, progress=False)
    pos, pos_mask = _rows(llama, site, batches, "positive")
    neg, neg_mask = _rows(llama, site, batches, "negative")

    def mean(values: Tensor, mask: Tensor) -> Tensor:
        weights = mask.double().unsqueeze(-1)
        return ((values.double() * weights).sum(1) / weights.sum(1)).mean(0)

    torch.testing.assert_close(vector[site.key].double(), mean(pos, pos_mask) - mean(neg, neg_mask), atol=1e-6, rtol=0)
    by_mean = tdsteer.extract(llama, batches, [site], read="mean", progress=False)
    torch.testing.assert_close(vector[site.key], by_mean[site.key], atol=1e-6, rtol=0)


def test_condition_fit_with_patch_mean_on_padded_text_is_the_mean_read(llama):
    site = tdsteer_hf.sites(llama, [1])[0]
    batches = _batches(pad=True)
    by_patch = tdsteer.Condition.fit(llama, batches, [site], read="patch_mean", progress=False)
    by_mean = tdsteer.Condition.fit(llama, batches, [site], read="mean", progress=False)
    torch.testing.assert_close(by_patch.direction, by_mean.direction, atol=1e-6, rtol=0)
    assert by_patch.threshold == pytest.approx(by_mean.threshold, abs=1e-5)


CONTAINER_ENTRY_POINTS: dict[str, Callable[[nn.Module, list[dict[str, Any]], list[str]], object]] = {
    "extract": lambda m, b, s: tdsteer.extract(m, b, s, progress=False),
    "Extraction.update": lambda m, b, s: tdsteer.Extraction(s).update(m, b, progress=False),
    "ActivationCache.record": lambda m, b, s: ActivationCache.record(m, b, s, progress=False),
}


@pytest.mark.parametrize("entry", list(CONTAINER_ENTRY_POINTS))
def test_a_container_site_is_refused_naming_a_block_to_read(llama, entry):
    """``model.layers`` is a ModuleList the model never calls: refused before any forward, naming it
    and a block, as steering does (not 'never executed' after a whole pass)."""
    calls: list[int] = []
    handle = llama.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"'model\.layers' is a ModuleList.*'model\.layers\.0'") as error:
            CONTAINER_ENTRY_POINTS[entry](llama, _batches(pad=False), ["model.layers"])
    finally:
        handle.remove()
    assert "never calls" in str(error.value)
    assert calls == []
    with pytest.raises(ValueError, match=r"'model\.layers' is a ModuleList"):  # the same words as steering's
        with tdsteer.steer(llama, {"model.layers": torch.zeros(LLAMA_LIKE["hidden_size"])}):
            pass
