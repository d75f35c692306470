"""Property tests of the position machinery against a brute-force reference (issue 12).

Random batch sizes, prompt and continuation lengths, left or right padding, policies (all, prompt,
generated, continuation with random per-row starts, from:k), per-position vectors, and random
KV-cache chunkings: a sequence fed in chunks with a cache (whose length is an int, or a tensor as in
a static cache), or without one, inside ``generate`` or in plain forward calls, must steer exactly
the positions the reference says, in eager mode and along the path a compiled graph takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tdsteer

SETTINGS = settings(
    max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


class Cache:
    """A KV cache that only knows its length (an int, or a 0-d tensor as Hugging Face's static cache)."""

    def __init__(self, length: int, as_tensor: bool) -> None:
        self.length = torch.tensor(length) if as_tensor else length

    def get_seq_length(self) -> int | torch.Tensor:
        return self.length


class Probe(nn.Module):
    """One site on an identity: with ``add``, a vector of ones and zero inputs, the output is the selection."""

    def __init__(self) -> None:
        super().__init__()
        self.site = nn.Identity()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Cache | None = None):
        return self.site(x)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, case: Case):
        return feed(self, case)


@dataclass
class Case:
    batch: int
    prompt: int
    total: int
    padding: list[int]  # per-row padding tokens of the prompt
    right: bool  # padding after the real tokens instead of before
    policy: str
    starts: list[int] | None
    chunks: list[int]
    use_cache: bool
    tensor_length: bool
    in_generate: bool
    positional: int  # length of a per-position vector [L, 1], 0 for a [1] vector

    def full_mask(self) -> torch.Tensor:
        mask = torch.ones(self.batch, self.total, dtype=torch.long)
        for row, pad in enumerate(self.padding):
            if self.right:
                mask[row, self.prompt - pad : self.prompt] = 0
            else:
                mask[row, :pad] = 0
        return mask


@st.composite
def cases(draw: st.DrawFn) -> Case:
    batch = draw(st.integers(1, 4))
    prompt = draw(st.integers(1, 7))
    total = prompt + draw(st.integers(0, 6))
    padding = draw(st.lists(st.integers(0, prompt - 1), min_size=batch, max_size=batch))
    policy = draw(st.sampled_from(["all", "prompt", "generated", "continuation", "from"]))
    if policy == "from":
        policy = f"from:{draw(st.integers(0, total + 1))}"
    starts = None
    if policy == "continuation" and draw(st.booleans()):
        starts = draw(st.lists(st.integers(0, total + 1), min_size=batch, max_size=batch))
    chunks: list[int] = []
    while sum(chunks) < total:
        chunks.append(draw(st.integers(1, total - sum(chunks))))
    return Case(
        batch=batch,
        prompt=prompt,
        total=total,
        padding=padding,
        right=draw(st.booleans()),
        policy=policy,
        starts=starts,
        chunks=chunks,
        use_cache=draw(st.booleans()),
        tensor_length=draw(st.booleans()),
        in_generate=draw(st.booleans()),
        positional=draw(st.sampled_from([0, 0, 1, 3, 9])),
    )


def feed(model: Probe, case: Case) -> torch.Tensor:
    """Run the sequence through ``model`` in ``case.chunks``; the steered values ``[B, T]``."""
    mask = case.full_mask()
    outputs, start = [], 0
    for size in case.chunks:
        stop = start + size
        if case.use_cache:
            x = torch.zeros(case.batch, size, 1)
            out = model(x, attention_mask=mask[:, :stop], cache=Cache(start, case.tensor_length))
        else:
            out = model(torch.zeros(case.batch, stop, 1), attention_mask=mask[:, :stop])[:, start:]
        outputs.append(out[..., 0])
        start = stop
    return torch.cat(outputs, dim=1)


def reference(case: Case) -> torch.Tensor:
    """What the policy selects, position by position, from the definitions in docs/concepts.md."""
    lead = [0 if case.right else pad for pad in case.padding]  # leading padding counts real positions
    prompt = case.prompt if case.in_generate else None
    expected = torch.zeros(case.batch, case.total)
    for row in range(case.batch):
        for p in range(case.total):
            real = p - lead[row]
            if case.policy == "all":
                chosen = True
            elif case.policy == "prompt":
                chosen = prompt is None or p < prompt
            elif case.policy == "generated":
                chosen = prompt is not None and p >= prompt
            elif case.policy == "continuation":
                if case.starts is not None:
                    chosen = p >= case.starts[row]
                else:
                    chosen = prompt is not None and p >= prompt - 1
            else:
                chosen = real >= int(case.policy.split(":")[1])
            value = 1.0
            if case.positional:
                value = float(real + 1) if 0 <= real < case.positional else 0.0
            expected[row, p] = value if chosen else 0.0
    return expected


def run(case: Case) -> torch.Tensor:
    model = Probe()
    vector = torch.arange(1.0, case.positional + 1).unsqueeze(-1) if case.positional else torch.ones(1)
    handle = tdsteer.steer(model, {"site": vector}, positions=case.policy)
    with handle:
        if case.starts is not None:
            handle.set(starts=torch.tensor(case.starts))
        if case.in_generate:
            prompt_mask = case.full_mask()[:, : case.prompt]
            return model.generate(torch.zeros(case.batch, case.prompt, dtype=torch.long), prompt_mask, case=case)
        return feed(model, case)


@SETTINGS
@given(cases())
def test_eager_masks_match_the_reference(case: Case) -> None:
    assert torch.equal(run(case), reference(case)), case


@SETTINGS
@given(cases())
def test_the_compiled_path_matches_the_reference(case: Case) -> None:
    # the hooks take the path a torch.compile trace takes (tensors only, no host-side caches), run eagerly
    with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        got = run(case)
    assert torch.equal(got, reference(case)), case


@SETTINGS
@given(cases())
def test_chunking_and_caching_do_not_change_what_is_steered(case: Case) -> None:
    whole = Case(**{**case.__dict__, "chunks": [case.total], "use_cache": False})
    assert torch.equal(run(case), run(whole)), case
