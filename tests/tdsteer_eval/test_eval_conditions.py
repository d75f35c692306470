"""Conditional steering in lm-eval: a condition read on each request's context gates the steering."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import tdsteer
from tdsteer_eval import SteeredLM

SCALE = 6.0


def _scores(lm: Any, requests: list[Instance]) -> list[float]:
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def _context_condition(tiny: Any, requests: list[Instance]) -> tuple[tdsteer.Condition, list[bool]]:
    """A condition on the last context token at block 0 that some requests' contexts meet, and which."""
    plain = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer)
    readings = []
    seen: dict[str, torch.Tensor] = {}
    block = tiny.model.get_submodule("transformer.h.0")
    handle = block.register_forward_hook(lambda module, args, output: seen.__setitem__("h", output))
    try:  # (output_hidden_states would leave transformers' own recording hooks on the shared model)
        for request in requests:
            context_enc, _ = plain._encode_pair(*request.args)
            with torch.no_grad():
                tiny.model(torch.tensor([context_enc]))
            hidden = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
            readings.append(hidden[0, -1])
    finally:
        handle.remove()
    stacked = torch.stack(readings)
    direction = stacked[0] - stacked.mean(0)
    scores = F.cosine_similarity(stacked, direction.unsqueeze(0), dim=-1)
    distinct = scores.unique()  # sorted; the threshold halfway between two of them, far from every score
    threshold = float(distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2
    met = [bool(score > threshold) for score in scores]
    assert any(met) and not all(met)
    return tdsteer.Condition({"transformer.h.0": direction}, threshold, read="last"), met


@pytest.mark.parametrize("batch_size", [1, 3])
def test_only_requests_whose_context_meets_the_condition_are_steered(
    tiny: Any, caa_requests: list[Instance], batch_size: int
) -> None:
    condition, met = _context_condition(tiny, caa_requests)
    common: dict[str, Any] = {"pretrained": tiny.model, "tokenizer": tiny.tokenizer, "batch_size": batch_size}
    plain = _scores(HFLM(**common), caa_requests)
    everyone = _scores(SteeredLM(**common, vector=tiny.vector, scale=SCALE), caa_requests)
    gated_lm = SteeredLM(**common, vector=tiny.vector, scale=SCALE, condition=condition)
    gated = _scores(gated_lm, caa_requests)
    for index, meets in enumerate(met):
        want = everyone[index] if meets else plain[index]
        assert gated[index] == pytest.approx(want, abs=1e-4), (index, meets)
    assert max(abs(e - p) for e, p, m in zip(everyone, plain, met, strict=True) if m) > 1e-3
    assert gated_lm.get_model_info()["tdsteer_condition"].startswith("Condition('transformer.h.0'")


def test_a_condition_file_in_model_args(tiny: Any, tmp_path: Any, caa_requests: list[Instance]) -> None:
    condition, met = _context_condition(tiny, caa_requests)
    path = condition.save(tmp_path / "condition.safetensors")
    lm = SteeredLM(
        pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, scale=SCALE, condition=str(path)
    )
    assert lm.get_model_info()["tdsteer_condition"] == str(path)
    direct = SteeredLM(
        pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, scale=SCALE, condition=condition
    )
    assert _scores(lm, caa_requests) == _scores(direct, caa_requests)
    with pytest.raises(ValueError, match="without a condition"):
        vector_file = tiny.vector.save(tmp_path / "vector.safetensors")
        SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, condition=str(vector_file))
