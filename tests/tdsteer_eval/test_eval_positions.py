"""Response-only steering in lm-eval requests: positions="continuation" and "assistant"."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

import tdsteer
from tdsteer_eval import SteeredLM
from tdsteer_eval.lm import check_positions

SCALE = 6.0


@contextmanager
def plain_hooks(model: Any, vector: tdsteer.SteeringVector, scale: float, first: int) -> Iterator[None]:
    """A bare forward hook per site that adds ``scale * v`` at absolute positions ``>= first``; a call
    of one token (a KV-cached generation step) is past the prompt and steered whole."""

    def make(delta: torch.Tensor) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            if h.shape[1] == 1:
                h += delta
            else:
                h[:, first:] += delta
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    handles = [
        model.get_submodule(key).register_forward_hook(make(direction * scale))
        for key, direction in vector.directions.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_loglikelihood(lm: HFLM, context: str, continuation: str, vector: Any, first_of: Any) -> float:
    """What lm-eval scores for one request, the model steered by plain hooks from ``first_of(row, n)`` on."""
    context_enc, continuation_enc = lm._encode_pair(context, continuation)
    row = (context_enc + continuation_enc)[-(lm.max_length + 1) :][:-1]
    first = first_of(row, len(continuation_enc))
    with plain_hooks(lm.model, vector, SCALE, first), torch.no_grad():
        logits = lm.model(torch.tensor([row])).logits
    picked = F.log_softmax(logits, dim=-1)[0, len(row) - len(continuation_enc) :]
    return float(picked.gather(-1, torch.tensor(continuation_enc).unsqueeze(-1)).sum())


def _scores(lm: Any, requests: list[Instance]) -> list[float]:
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def test_continuation_equals_a_plain_hook_at_exactly_those_positions(tiny: Any, caa_requests: list[Instance]) -> None:
    vector = tiny.vector * 3.0
    plain = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=1)
    expected = [
        reference_loglikelihood(plain, *request.args, vector, lambda row, n: len(row) - n) for request in caa_requests
    ]
    one_by_one = SteeredLM(
        pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=vector, scale=SCALE, positions="continuation"
    )
    assert _scores(one_by_one, caa_requests) == expected  # bit for bit
    batched = SteeredLM(
        pretrained=tiny.model,
        tokenizer=tiny.tokenizer,
        vector=vector,
        scale=SCALE,
        positions="continuation",
        batch_size=3,
    )
    torch.testing.assert_close(_scores(batched, caa_requests), expected, rtol=0, atol=1e-4)
    everywhere = SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=vector, scale=SCALE)
    # a random tiny model reads little of its context: the difference is small, but far above rounding
    assert max(abs(a - b) for a, b in zip(_scores(everywhere, caa_requests), expected)) > 1e-5
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny.model.modules())


def test_continuation_in_generation_steers_the_last_prompt_token_and_the_new_ones(tiny: Any) -> None:
    vector = tiny.vector * 3.0
    context = torch.tensor([tiny.tokenizer.encode("Question: What is two plus two?\nAnswer:")])
    kwargs: dict[str, Any] = {"max_length": context.shape[1] + 6, "stop": ["\n\n"], "do_sample": False}
    plain = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer)
    with plain_hooks(tiny.model, vector, SCALE, context.shape[1] - 1):
        expected = plain._model_generate(context, **kwargs)
    lm = SteeredLM(
        pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=vector, scale=SCALE, positions="continuation"
    )
    assert torch.equal(lm._model_generate(context, **kwargs), expected)
    assert not torch.equal(plain._model_generate(context, **kwargs), expected)


def test_assistant_steers_from_the_end_of_the_user_turn(tiny: Any) -> None:
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <|assistant|>"
        "{% endif %}"
    )
    turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is two plus two?"}], tokenize=False, add_generation_prompt=True
    )
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(turn + " The answer is", " four"), idx=0),
        Instance(request_type="loglikelihood", doc={}, arguments=(turn + " (", "A)"), idx=1),
    ]
    marker_end = len(tokenizer(turn)["input_ids"]) - 1  # the last token of " <|assistant|>"
    plain = HFLM(pretrained=tiny.model, tokenizer=tokenizer, batch_size=1)
    vector = tiny.vector * 3.0
    expected = [reference_loglikelihood(plain, *r.args, vector, lambda row, n: marker_end) for r in requests]
    lm = SteeredLM(pretrained=tiny.model, tokenizer=tokenizer, vector=vector, scale=SCALE, positions="assistant")
    assert _scores(lm, requests) == expected
    continuation = SteeredLM(
        pretrained=tiny.model, tokenizer=tokenizer, vector=vector, scale=SCALE, positions="continuation"
    )
    assert _scores(continuation, requests) != expected  # the prefill after the marker is steered too
    # without the marker in the text: steered from the continuation, with a warning
    bare = [Instance(request_type="loglikelihood", doc={}, arguments=("What is two plus two?", " four"), idx=0)]
    with pytest.warns(UserWarning, match="no assistant-turn marker"):
        assert _scores(lm, bare) == _scores(continuation, bare)
    with pytest.raises(ValueError, match="chat template"):
        SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=vector, positions="assistant")


def test_a_policy_that_steers_nothing_in_a_request_type_warns(tiny: Any, caa_requests: list[Instance]) -> None:
    lm = SteeredLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, vector=tiny.vector, positions="generated")
    with pytest.warns(UserWarning, match="'generated' steers nothing in loglikelihood requests"):
        lm.loglikelihood(caa_requests[:2], disable_tqdm=True)


@pytest.mark.parametrize("starts", [None, [3, 5, 7]], ids=["generate-default", "row-starts"])
def test_kv_cache_does_not_change_continuation_steering(tiny: Any, starts: list[int] | None) -> None:
    """Left-padded prompts of different lengths: use_cache True and False give the same tokens and logits."""
    model = copy.deepcopy(tiny.model).double()
    texts = ["Question: What is two plus two?\nAnswer:", "Bees make", "The capital of France is"]
    rows = [tiny.tokenizer.encode(text) for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for number, row in enumerate(rows):
        ids[number, width - len(row) :] = torch.tensor(row)
        mask[number, width - len(row) :] = 1
    vector = {k: v.double() * 3 for k, v in tiny.vector.directions.items()}

    def generate(use_cache: bool) -> Any:
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )

    handle = tdsteer.steer(model, vector, scale=SCALE, positions="continuation")
    with handle:
        handle.set(starts=None if starts is None else torch.tensor([width - len(r) + 1 for r in rows]))
        cached, fresh = generate(True), generate(False)
    assert torch.equal(cached.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(fresh.logits), rtol=1e-7, atol=1e-9)
    plain = generate(True)
    assert not torch.allclose(torch.stack(cached.logits), torch.stack(plain.logits))


@pytest.mark.parametrize("policy", ["patches", "prefix"])
def test_image_policies_are_refused_before_the_model_loads(tiny: Any, tmp_path: Any, policy: str) -> None:
    """``patches`` / ``prefix`` select by a vision transformer's prefix tokens: for a language model
    they are refused, in Python and in lm-eval's ``model_args``, before the model is read."""
    missing = tmp_path / "no-model-here"  # loading it would fail with another error
    with pytest.raises(ValueError) as raised:
        SteeredLM(pretrained=str(missing), vector=tiny.vector, positions=policy)
    message = str(raised.value)
    assert f"positions={policy!r}" in message and "image models" in message and "language model" in message
    for name in ("all", "prompt", "generated", "continuation", "assistant", "from:K"):
        assert name in message
    assert "patches" not in message.split("use one of")[1] and "prefix" not in message.split("use one of")[1]
    vector = tmp_path / "vector.safetensors"
    tiny.vector.save(vector)
    with pytest.raises(ValueError, match=f"positions={policy!r} is a policy of image models"):
        get_model("tdsteer").create_from_arg_string(f"pretrained={missing},vector={vector},positions={policy}")


def test_unknown_policy_lists_the_token_policies_only(tiny: Any) -> None:
    with pytest.raises(ValueError, match="Unknown position policy 'middle'") as raised:
        SteeredLM(pretrained="unused", vector=tiny.vector, positions="middle")
    assert "assistant" in str(raised.value) and "patches" not in str(raised.value)
    assert check_positions("from:2") == "from:2" and check_positions("assistant") == "continuation"
