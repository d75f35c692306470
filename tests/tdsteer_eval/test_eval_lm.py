"""SteeredLM: lm-eval's HFLM with tdsteer steering on every forward pass."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

import tdsteer
from tdsteer_eval import SteeredLM

REQUESTS = [
    ("Question: What is two plus two?\nAnswer:", " four"),
    ("The capital of France is", " Paris."),
    ("Monday, Tuesday,", " Wednesday"),
]


def _loglikelihoods(lm: Any) -> list[tuple[float, bool]]:
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=args, idx=i) for i, args in enumerate(REQUESTS)
    ]
    return lm.loglikelihood(requests, disable_tqdm=True)


def _steered(tiny: Any, **kwargs: Any) -> SteeredLM:
    return SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=2, **kwargs)


def test_registered_under_tdsteer() -> None:
    assert get_model("tdsteer") is SteeredLM


def test_scale_zero_is_the_plain_model_and_scale_eight_is_not(tiny: Any) -> None:
    plain = _loglikelihoods(HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=2))
    lm = _steered(tiny, vector=tiny.vector, scale=0.0)
    at_zero = _loglikelihoods(lm)
    assert at_zero == plain  # bit for bit: x + 0 * v is x
    lm.scale = 8.0
    at_eight = _loglikelihoods(lm)
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(at_eight, plain))
    lm.scale = -8.0
    assert _loglikelihoods(lm) != at_eight
    # nothing stays hooked between calls
    assert _loglikelihoods(HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=2)) == plain


def test_vector_from_file_and_site_subset(tiny: Any, tiny_dir: Any) -> None:
    path = tiny_dir / "vector.safetensors"
    from_file = _loglikelihoods(_steered(tiny, vector=str(path), scale=4.0))
    from_object = _loglikelihoods(_steered(tiny, vector=tiny.vector, scale=4.0))
    assert from_file == from_object
    only_first = _steered(tiny, vector=tiny.vector, scale=4.0, sites=["transformer.h.0"])
    assert only_first.vector.keys() == ["transformer.h.0"]
    assert _loglikelihoods(only_first) != from_object


def test_generation_is_steered(tiny: Any) -> None:
    context = torch.tensor([tiny.tokenizer.encode("Question: What is two plus two?\nAnswer:")])  # type: ignore[attr-defined]
    lm = _steered(tiny, vector=tiny.vector * 10.0, scale=0.0)
    plain = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer)
    kwargs: dict[str, Any] = {"max_length": context.shape[1] + 6, "stop": ["\n\n"], "do_sample": False}
    baseline = plain._model_generate(context, **kwargs)
    assert torch.equal(lm._model_generate(context, **kwargs), baseline)
    lm.scale = 5.0
    assert not torch.equal(lm._model_generate(context, **kwargs), baseline)


def test_model_info_records_the_steering(tiny: Any) -> None:
    info = _steered(tiny, vector=tiny.vector, scale=2.0).get_model_info()
    assert info["tdsteer_scale"] == 2.0 and info["tdsteer_sites"] == ["transformer.h.0", "transformer.h.1"]
    assert info["tdsteer_operator"] == "add" and info["tdsteer_vector_method"] == "random"


def test_errors_are_clear(tiny: Any) -> None:
    with pytest.raises(ValueError, match="does not resolve"):
        _steered(tiny, vector={"model.layers.0": torch.ones(32)})
    with pytest.raises(ValueError, match="needs a steering vector"):
        _steered(tiny)
    with pytest.raises(tdsteer.SteeringVectorFileError):
        _steered(tiny, vector="/nonexistent/vector.safetensors")
    with pytest.raises(TypeError, match="vector must be"):
        _steered(tiny, vector=42)
    with pytest.raises(ValueError, match="position"):
        _steered(tiny, vector=tiny.vector, positions="middle")
    lm = _steered(tiny, vector=tiny.vector)
    with pytest.raises(ValueError, match="finite"):
        lm.scale = float("nan")


def test_positions_generated_leaves_scoring_alone_and_steers_generation(tiny: Any) -> None:
    plain = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=2)
    lm = _steered(tiny, vector=tiny.vector * 10.0, scale=5.0, positions="generated")
    with pytest.warns(UserWarning, match="steers nothing in loglikelihood requests"):
        assert _loglikelihoods(lm) == _loglikelihoods(plain)  # a plain forward has no generated tokens
    context = torch.tensor([tiny.tokenizer.encode("Question: What is two plus two?\nAnswer:")])
    kwargs: dict[str, Any] = {"max_length": context.shape[1] + 6, "stop": ["\n\n"], "do_sample": False}
    steered = lm._model_generate(context, **kwargs)
    assert torch.equal(steered[:, : context.shape[1]], context)
    assert not torch.equal(steered, plain._model_generate(context, **kwargs))


def test_one_request_set_opens_one_steering_context(tiny: Any) -> None:
    lm = _steered(tiny, vector=tiny.vector, scale=4.0)
    opened = []
    original = lm.steering

    def counting() -> Any:
        opened.append(1)
        return original()

    lm.steering = counting  # type: ignore[method-assign]
    batched = _loglikelihoods(lm)  # 3 requests in batches of 2: two forward calls
    assert len(opened) == 1
    lm.steering = original  # type: ignore[method-assign]
    assert batched == _loglikelihoods(_steered(tiny, vector=tiny.vector, scale=4.0))
    assert all(not m._forward_hooks for m in tiny.model.modules())


def test_bit_for_bit_with_lm_evals_steered_model(tiny: Any, tiny_dir: Any, tmp_path: Any) -> None:
    """lm-eval's own ``steered`` model and SteeredLM give the same loglikelihoods, to the bit, from the
    same vector: exported to lm-eval's .pt file, or that file read back by SteeredLM."""
    path = str(tiny.vector.to_lm_eval(tmp_path / "steer.pt", scale=3.0, prefix="transformer"))
    common: dict[str, Any] = {
        "pretrained": str(tiny_dir / "model"),
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 2,
    }
    expected = _loglikelihoods(get_model("steered")(steer_path=path, **common))
    assert _loglikelihoods(SteeredLM(**common, vector=tiny.vector, scale=3.0)) == expected
    assert _loglikelihoods(SteeredLM(**common, vector=path)) == expected
    assert expected != _loglikelihoods(HFLM(**common))


def test_clamp_matches_lm_evals_steered_model(tiny: Any, tiny_dir: Any, tmp_path: Any) -> None:
    """lm-eval's clamp sets the projection on the unit direction to its coefficient: tdsteer's clamp
    of the normalised vector at that scale (the same up to rounding: the two compute it differently)."""
    path = str(tiny.vector.to_lm_eval(tmp_path / "clamp.pt", scale=3.0, action="clamp", prefix="transformer"))
    common: dict[str, Any] = {
        "pretrained": str(tiny_dir / "model"),
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 2,
    }
    expected = [ll for ll, _ in _loglikelihoods(get_model("steered")(steer_path=path, **common))]
    ours = SteeredLM(**common, vector=tiny.vector.normalize(), scale=3.0, operator="clamp")
    from_pt = SteeredLM(**common, vector=path, operator="clamp")
    for lm in (ours, from_pt):
        torch.testing.assert_close([ll for ll, _ in _loglikelihoods(lm)], expected, rtol=0, atol=1e-4)


def test_a_model_instance_is_taken_without_lm_evals_warnings(tiny: Any, caplog: pytest.LogCaptureFixture) -> None:
    """HFLM warns twice about a model instance as ``pretrained``: SteeredLM's normal way in."""
    with caplog.at_level("INFO", logger=HFLM.__module__):
        _steered(tiny, vector=tiny.vector, scale=1.0)
        HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=2)  # lm-eval's own, unfiltered
    notes = [r.getMessage() for r in caplog.records if "pretrained" in r.getMessage()]
    assert len(notes) == 2, notes  # only the plain HFLM's two
    assert not logging.getLogger(HFLM.__module__).filters  # the filter does not outlive the constructor


def test_a_second_scale_on_an_lm_eval_file_is_warned_about(tiny: Any, tmp_path: Any) -> None:
    """A .pt file's coefficient is part of its directions: scale=3 on a file exported at 3 steers at 9."""
    path = str(tiny.vector.to_lm_eval(tmp_path / "steer.pt", scale=3.0, prefix="transformer"))
    with pytest.warns(UserWarning, match=r"steering_coefficient 3 is part of the vector, so scale=3 steers at 9"):
        twice = _steered(tiny, vector=path, scale=3.0)
    assert twice.vector.metadata["steering_coefficient"] == 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        once = _steered(tiny, vector=path, scale=1.0)
    assert _loglikelihoods(once) == _loglikelihoods(_steered(tiny, vector=tiny.vector, scale=3.0))


def test_a_model_by_name_runs_on_the_cpu_without_a_device_argument(tiny_dir: Any) -> None:
    """HFLM's default device is cuda even without a GPU; SteeredLM takes cpu there."""
    if torch.cuda.is_available():
        pytest.skip("checks the machines without a GPU")
    lm = SteeredLM(pretrained=str(tiny_dir / "model"), vector=str(tiny_dir / "vector.safetensors"), batch_size=2)
    assert lm.device.type == "cpu" and len(_loglikelihoods(lm)) == len(REQUESTS)
