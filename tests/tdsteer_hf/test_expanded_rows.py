"""Steering ``generate`` calls that run the model on more rows than they were given prompts.

Beam search (``num_beams``), ``num_return_sequences`` and sampled beams call the model with ``B * n``
rows, each prompt's rows next to each other. Position policies that count from each row's first real
token (``"from:k"``, per-position ``[L, C]`` vectors), per-row starts and conditions must follow
each expanded row back to its prompt. Each steered generation is compared, token for token, with a
reference made by a plain ``register_forward_hook`` that reads each row's real positions from the
call's own 2-D attention mask; with and without the KV cache, on two left-padded prompts of
different lengths, for GPT-2 and Llama.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hf_tiny import generation_model, padded_prompts
from torch import Tensor, nn

import tdsteer
import tdsteer_hf
from tdsteer.positions import PositionTracker

MODELS = ["gpt2", "llama"]
MODES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False),  # no expansion: checks the reference against the plain path
    "beams": dict(num_beams=2, do_sample=False),
    "sampled": dict(do_sample=True, num_return_sequences=2),
    "sampled_beams": dict(num_beams=2, do_sample=True, num_return_sequences=2),
}
CACHES = [True, False]
LENGTHS = [7, 4]  # real prompt tokens per row, left-padded to the longest
PAD = 0
NEW_TOKENS = 5
SCALE = 6.0
K = 3  # from:K
POSITIONS = 6  # rows of the per-position vector: the prompt's first tokens, and the shorter prompt's first new ones

# (real positions [R, L] from the first real token, absolute positions [L]) -> what the reference adds: [R, L, C]
Addition = Callable[[Tensor, Tensor], Tensor]


def prompts() -> dict[str, Tensor]:
    return padded_prompts(LENGTHS, pad=PAD)


def model_for(model_type: str) -> nn.Module:
    return generation_model(model_type, pad=PAD)  # always NEW_TOKENS new tokens


def site_of(model: nn.Module) -> tdsteer.Site:
    return tdsteer_hf.sites(model, 0)[0]  # the first block's output


def generate(model: nn.Module, mode: str, use_cache: bool) -> Tensor:
    """The new tokens, ``[rows, NEW_TOKENS]``; sampling seeded the same way for every run."""
    torch.manual_seed(1234)
    with torch.no_grad():
        out = model.generate(
            **prompts(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=use_cache, **MODES[mode]
        )
    return out[:, max(LENGTHS) :]


@contextmanager
def reference(model: nn.Module, path: str, addition: Addition) -> Iterator[None]:
    """Add ``addition(real, absolute)`` to the output of module ``path`` with plain PyTorch hooks.

    Each row's real positions come from the attention mask the model is called with (Hugging Face
    passes the whole sequence's 2-D mask, one row per expanded row): a padding token is at ``-1``.
    """
    masks: list[Tensor] = []

    def observe(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs["attention_mask"]
        assert mask.ndim == 2
        masks.append(mask)

    def add(module: nn.Module, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        mask = masks[-1]
        rows, length = h.shape[:2]
        assert mask.shape[0] == rows
        real = (mask.cumsum(-1) - 1)[:, -length:]
        absolute = torch.arange(mask.shape[1])[-length:]
        new = h + addition(real, absolute).to(h.dtype)
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


def vector(shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def case(policy: str, hidden: int) -> tuple[dict[str, Any], Tensor, Addition]:
    """The ``tdsteer.steer`` keyword arguments, the vector and the reference's addition of ``policy``."""
    if policy == "per_position":  # ActAdd: row real position p gets v[p] for p < L
        table = vector((POSITIONS, hidden))

        def positional(real: Tensor, absolute: Tensor) -> Tensor:
            inside = ((real >= 0) & (real < POSITIONS)).unsqueeze(-1).to(table.dtype)
            return table[real.clamp(0, POSITIONS - 1)] * SCALE * inside

        return {}, table, positional
    v = vector((hidden,))
    if policy == "from":
        return {"positions": f"from:{K}"}, v, lambda real, absolute: (real >= K).unsqueeze(-1) * (SCALE * v)
    if policy == "generated":
        width = max(LENGTHS)
        return (
            {"positions": "generated"},
            v,
            lambda real, absolute: (absolute >= width).expand_as(real).unsqueeze(-1) * (SCALE * v),
        )
    assert policy == "all"
    return {"positions": "all"}, v, lambda real, absolute: torch.ones_like(real).unsqueeze(-1) * (SCALE * v)


def describe(got: Tensor, want: Tensor) -> str:
    rows = (got != want).any(-1).nonzero().flatten().tolist()
    return f"rows {rows} differ:\n{got.tolist()}\nvs the reference\n{want.tolist()}"


@pytest.mark.parametrize("use_cache", CACHES, ids=["cache", "no_cache"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("policy", ["from", "per_position", "generated", "all"])
@pytest.mark.parametrize("model_type", MODELS)
def test_expanded_rows_are_steered_like_their_prompt(model_type: str, policy: str, mode: str, use_cache: bool) -> None:
    model = model_for(model_type)
    site = site_of(model)
    kwargs, v, addition = case(policy, tdsteer_hf.describe(model).hidden_size)
    plain = generate(model, mode, use_cache)
    with reference(model, site.path, addition):
        want = generate(model, mode, use_cache)
    with tdsteer.steer(model, {site: v}, scale=SCALE, **kwargs):
        got = generate(model, mode, use_cache)
    assert torch.equal(got, want), f"{model_type}, {policy}, {mode}, use_cache={use_cache}: {describe(got, want)}"
    assert not torch.equal(want, plain), "the steering changed no token: the comparison checks nothing"


@pytest.mark.parametrize("use_cache", CACHES, ids=["cache", "no_cache"])
@pytest.mark.parametrize("mode", ["beams", "sampled"])
@pytest.mark.parametrize("repeated", [False, True], ids=["per_prompt", "per_row"])
def test_continuation_starts_under_expanded_rows(mode: str, use_cache: bool, repeated: bool) -> None:
    """Starts set for the prompts are repeated for each prompt's rows; starts set for every expanded
    row are taken as they are."""
    model = model_for("llama")
    site = site_of(model)
    v = vector((tdsteer_hf.describe(model).hidden_size,))
    starts = torch.tensor([5, 4])  # absolute positions in the padded prompt (width 7)
    rows_per_prompt = 2
    expanded = starts.repeat_interleave(rows_per_prompt)

    def addition(real: Tensor, absolute: Tensor) -> Tensor:
        return (absolute.unsqueeze(0) >= expanded.unsqueeze(-1)).unsqueeze(-1) * (SCALE * v)

    with reference(model, site.path, addition):
        want = generate(model, mode, use_cache)
    handle = tdsteer.steer(model, {site: v}, scale=SCALE, positions="continuation")
    with handle:
        handle.set(starts=expanded if repeated else starts)
        got = generate(model, mode, use_cache)
    assert torch.equal(got, want), describe(got, want)


@pytest.mark.parametrize("use_cache", CACHES, ids=["cache", "no_cache"])
@pytest.mark.parametrize("mode", ["beams", "sampled"])
def test_condition_under_expanded_rows(mode: str, use_cache: bool) -> None:
    """A condition met by one prompt steers all of that prompt's rows, and none of the other's."""
    model = model_for("gpt2")
    site = site_of(model)
    hidden = tdsteer_hf.describe(model).hidden_size
    v = vector((hidden,))
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    probe = tdsteer.steer(model, {site: v}, scale=0.0, condition=tdsteer.Condition({site: direction}, 0.0))
    with probe:
        generate(model, "greedy", use_cache)
    scores = probe.condition_scores
    assert scores is not None and scores.shape == (2,) and scores[0] != scores[1]
    condition = tdsteer.Condition({site: direction}, float(scores.mean()))
    met = scores > scores.mean()
    steered_rows = met.repeat_interleave(2)

    later = "transformer.h.1"  # after the condition site, so the prompt pass is steered too

    def addition(real: Tensor, absolute: Tensor) -> Tensor:
        return steered_rows.view(-1, 1, 1) * torch.ones_like(real).unsqueeze(-1) * (SCALE * v)

    with reference(model, later, addition):
        want = generate(model, mode, use_cache)
    handle = tdsteer.steer(model, {later: v}, scale=SCALE, condition=condition)
    with handle:
        got = generate(model, mode, use_cache)
    assert handle.condition_met is not None and torch.equal(handle.condition_met, steered_rows)
    assert torch.equal(got, want), describe(got, want)


def test_each_prompts_padding_is_repeated_for_its_rows_and_other_row_counts_are_refused() -> None:
    tracker = PositionTracker()
    cpu = torch.device("cpu")
    prompt = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1], [1] * 4])}
    with tracker.generation((), prompt):
        tracker.observe_call({"input_ids": torch.zeros(4, 4, dtype=torch.long)})
        assert tracker.real_positions(4, cpu).tolist() == [[-2, -1, 0, 1]] * 2 + [[0, 1, 2, 3]] * 2
        tracker.observe_call({"input_ids": torch.zeros(3, 4, dtype=torch.long)})
        with pytest.raises(ValueError, match="2 prompt rows but the model is called with 3 rows"):
            tracker.real_positions(4, cpu)
