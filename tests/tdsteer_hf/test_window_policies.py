"""Position windows: ``positions="generated:a:b"`` and ``positions="prompt:a:b"``.

Each steered ``generate`` is compared, token for token, with a reference made by a plain
``register_forward_hook`` that adds ``scale * v`` exactly at the window's positions, computed per row
from the 2-D attention mask the model is called with: with and without the KV cache, on two
left-padded prompts of different lengths, greedy and with beams / ``num_return_sequences``, for
GPT-2 and Llama. A plain forward call steers its own tokens as the prompt (``prompt:-1:`` is each
row's last real token) and no generated token. Bad specs are refused with the accepted forms; the
hooks are gone after the context; a compiled forward and a compiled static-cache ``generate`` give
eager's results, and a new window of the same kind does not recompile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hf_tiny import generation_model, padded_prompts
from torch import Tensor, nn
from torch._dynamo.utils import counters

import tdsteer
import tdsteer_hf

MODELS = ["gpt2", "llama"]
MODES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=2, do_sample=False),
    "sampled": dict(do_sample=True, num_return_sequences=2),
}
WINDOWS = ["generated:0:3", "generated:2:4", "generated:1:", "prompt:-1:", "prompt:-3:-1", "prompt:1:3", "prompt::"]
LENGTHS = [7, 4]  # real prompt tokens per row, left-padded to the longest
WIDTH = max(LENGTHS)
PAD = 0
NEW_TOKENS = 6
SCALE = 8.0


def prompts(lengths: list[int] = LENGTHS, right: bool = False) -> dict[str, Tensor]:
    return padded_prompts(lengths, pad=PAD, right=right)


def model_for(model_type: str) -> nn.Module:
    return generation_model(model_type, pad=PAD)  # always NEW_TOKENS new tokens


def path_of(model: nn.Module) -> str:
    return tdsteer_hf.sites(model, 0)[0].path  # the first block's output


def vector(model: nn.Module) -> Tensor:
    hidden = tdsteer_hf.describe(model).hidden_size
    return torch.randn(hidden, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def generate(model: nn.Module, mode: str, use_cache: bool) -> tuple[Tensor, Tensor]:
    """The new tokens ``[rows, NEW_TOKENS]`` and their logits ``[NEW_TOKENS, rows, vocab]``; sampling
    seeded the same way for every run."""
    torch.manual_seed(1234)
    with torch.no_grad():
        out = model.generate(
            **prompts(),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            use_cache=use_cache,
            return_dict_in_generate=True,
            output_logits=True,
            **MODES[mode],
        )
    return out.sequences[:, WIDTH:], torch.stack(out.logits)


def window_positions(spec: str, mask: Tensor, prompt_width: int | None) -> Tensor:
    """Where ``spec`` steers, ``[R, T]`` over the whole sequence of a call whose 2-D mask is ``mask``:
    written out independently of tdsteer, from the mask alone."""
    kind, first, end = spec.split(":")
    start = int(first) if first else None
    stop = int(end) if end else None
    rows, total = mask.shape
    selected = torch.zeros(rows, total, dtype=torch.bool)
    if kind == "generated":
        if prompt_width is not None:
            for g in range(*slice(start, stop).indices(max(total - prompt_width, 0))):
                selected[:, prompt_width + g] = True
        return selected
    for row in range(rows):
        prompt = mask[row, :prompt_width] if prompt_width is not None else mask[row]
        real = prompt.nonzero().flatten().tolist()  # the row's real prompt tokens, in order
        for index in real[slice(start, stop)]:
            selected[row, index] = True
    return selected


@contextmanager
def reference(model: nn.Module, path: str, spec: str, delta: Tensor, prompt_width: int | None) -> Iterator[None]:
    """Add ``delta`` at ``spec``'s positions of module ``path``'s output with plain PyTorch hooks."""
    masks: list[Tensor] = []

    def observe(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = torch.ones(ids.shape[:2], dtype=torch.long)
        assert mask.ndim == 2
        masks.append(mask)

    def add(module: nn.Module, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        mask = masks[-1]
        length = h.shape[1]
        assert mask.shape[0] == h.shape[0]
        where = window_positions(spec, mask, prompt_width)[:, -length:]
        new = h + where.unsqueeze(-1).to(h.dtype) * delta.to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [
        model.register_forward_pre_hook(observe, with_kwargs=True),
        model.get_submodule(path).register_forward_hook(add),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hooks(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("spec", WINDOWS)
def test_greedy_generate_matches_the_reference_with_and_without_the_cache(model_type: str, spec: str) -> None:
    model = model_for(model_type)
    path, v = path_of(model), vector(model)
    before = hooks(model)
    _, plain = generate(model, "greedy", True)
    got, logits = {}, {}
    for use_cache in (True, False):
        with tdsteer.steer(model, {path: v}, scale=SCALE, positions=spec):
            got[use_cache], logits[use_cache] = generate(model, "greedy", use_cache)
        with reference(model, path, spec, SCALE * v, WIDTH):
            want, want_logits = generate(model, "greedy", use_cache)
        assert torch.equal(got[use_cache], want), (spec, use_cache, got[use_cache].tolist(), want.tolist())
        torch.testing.assert_close(logits[use_cache], want_logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[True], got[False]), spec
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(logits[True], plain), f"{spec} changed nothing"
    assert hooks(model) == before
    assert "generate" not in model.__dict__


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("mode", ["beams", "sampled"])
@pytest.mark.parametrize("spec", ["generated:1:4", "prompt:-2:", "prompt:0:2"])
def test_expanded_rows_match_the_reference(model_type: str, mode: str, spec: str) -> None:
    """Beams and ``num_return_sequences`` call the model with several rows per prompt."""
    model = model_for(model_type)
    path, v = path_of(model), vector(model)
    for use_cache in (True, False):
        with tdsteer.steer(model, {path: v}, scale=SCALE, positions=spec):
            got, logits = generate(model, mode, use_cache)
        with reference(model, path, spec, SCALE * v, WIDTH):
            want, want_logits = generate(model, mode, use_cache)
        assert torch.equal(got, want), (spec, mode, use_cache)
        torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)


def block_output(model: nn.Module, spec: str, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """How steering with ``spec`` changes the first block's output in a plain forward call, checked
    against the reference; and ``scale * v``."""
    path, v = path_of(model), vector(model)

    def output() -> Tensor:
        seen: list[Tensor] = []
        handle = model.get_submodule(path).register_forward_hook(
            lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )  # registered last: it records what the other hooks made
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            handle.remove()
        return seen[0]

    plain = output()
    with tdsteer.steer(model, {path: v}, scale=SCALE, positions=spec):
        steered = output()
    with reference(model, path, spec, SCALE * v, None):
        want = output()
    torch.testing.assert_close(steered, want, rtol=0, atol=1e-12)
    return steered - plain, SCALE * v


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("right", [False, True], ids=["left_padded", "right_padded"])
def test_prompt_last_token_in_a_forward_call(model_type: str, right: bool) -> None:
    """``prompt:-1:`` steers only each row's last real token, wherever the padding is."""
    model = model_for(model_type)
    batch = prompts(right=right)
    change, delta = block_output(model, "prompt:-1:", batch)
    for row, length in enumerate(LENGTHS):
        last = length - 1 if right else WIDTH - 1
        torch.testing.assert_close(change[row, last], delta, rtol=0, atol=1e-12)
        others = [p for p in range(WIDTH) if p != last]
        assert torch.all(change[row, others] == 0), row


@pytest.mark.parametrize("spec", ["prompt:1:3", "prompt:-3:-1", "prompt:2:", "generated:0:8"])
def test_windows_in_a_forward_call(spec: str) -> None:
    """A plain forward call is all prompt: its windows count within each row's real tokens; a
    generated window steers nothing."""
    model = model_for("llama")
    change, _ = block_output(model, spec, prompts())
    if spec.startswith("generated"):
        assert torch.all(change == 0)
    else:
        assert torch.any(change != 0)


def test_a_cached_forward_call_steers_the_last_token_of_the_sequence_so_far() -> None:
    """Outside ``generate`` the prompt is the sequence up to the call's last token: a call on the last
    token with a cache of the others steers what a full call steers."""
    model = model_for("gpt2")
    path, v = path_of(model), vector(model)
    batch = prompts()
    with torch.no_grad():
        past = model(**{k: t[:, :-1] for k, t in batch.items()}, use_cache=True).past_key_values
        with tdsteer.steer(model, {path: v}, scale=SCALE, positions="prompt:-1:"):
            full = model(**batch).logits[:, -1]
            last = model(
                input_ids=batch["input_ids"][:, -1:], attention_mask=batch["attention_mask"], past_key_values=past
            )
        plain = model(**batch).logits[:, -1]
    torch.testing.assert_close(last.logits[:, -1], full, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(full, plain)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("generated:5:2", "selects no token"),
        ("prompt:3:3", "selects no token"),
        ("prompt:-1:-2", "selects no token"),
        ("generated:-2:", "must be >= 0"),
        ("prompt:x", "Unknown position policy"),
        ("prompt:1", "Unknown position policy"),
        ("generated:1:2:3", "Unknown position policy"),
    ],
)
def test_bad_windows_are_refused_with_the_accepted_forms(spec: str, why: str) -> None:
    model = model_for("gpt2")
    before = hooks(model)
    with pytest.raises(ValueError, match=why) as raised:
        tdsteer.steer(model, {path_of(model): vector(model)}, positions=spec)
    assert "prompt:A:B" in str(raised.value) and "generated:A:B" in str(raised.value)
    assert hooks(model) == before


def test_spec_round_trips() -> None:
    for spec in ("generated:0:8", "generated:2:", "prompt:-1:", "prompt:1:-1"):
        assert tdsteer.positions.as_policy(spec).spec == spec
    assert tdsteer.positions.as_policy("prompt::").spec == "prompt:0:"


@pytest.mark.usefixtures("clean_dynamo")
def test_compiled_forward_matches_eager_and_a_new_window_does_not_recompile() -> None:
    model = model_for("gpt2").float()
    path = path_of(model)
    batch = prompts()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    handle = tdsteer.steer(model, {path: vector(model).float()}, scale=SCALE, positions="prompt:-1:")
    with handle:
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        for spec in ("prompt:-3:-1", "prompt:1:3", "prompt:2:"):
            handle.set(positions=spec)
            torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs, "a new prompt window recompiled"
    assert dict(counters["graph_break"]) == {}


@pytest.mark.usefixtures("clean_dynamo")
def test_static_cache_compiled_generate_matches_eager_and_a_new_window_does_not_recompile() -> None:
    import transformers

    model = model_for("gpt2").float()
    path = path_of(model)
    config = transformers.CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
    config._compile_all_devices = True

    def run(compiled: bool) -> Tensor:
        extra: dict[str, Any] = {"cache_implementation": "static", "compile_config": config} if compiled else {}
        out = model.generate(
            **prompts(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **extra
        )
        return out[:, WIDTH:]

    handle = tdsteer.steer(model, {path: vector(model).float()}, scale=SCALE, positions="generated:1:3")
    with handle:
        assert torch.equal(run(True), run(False))
        graphs = counters["stats"]["unique_graphs"]
        handle.set(positions="generated:0:2")
        assert torch.equal(run(True), run(False))
        assert counters["stats"]["unique_graphs"] == graphs, "a new generated window recompiled"
    assert dict(counters["graph_break"]) == {}
