"""Steering compiled Hugging Face models (issue 13): ``torch.compile(model)`` and ``generate`` with a static
cache and a compiled forward give the tokens and logits of eager steering, with no graph break, and
``handle.set`` does not recompile. Skipped without transformers.

The static-cache recipe is transformers 5's own: ``generate(..., cache_implementation="static",
compile_config=CompileConfig(...))`` compiles the model's ``__call__`` for the decoding steps (on a
GPU by default; ``_compile_all_devices`` makes it do so on the CPU too).
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import tdsteer

transformers = pytest.importorskip("transformers")

BACKEND = "inductor" if shutil.which("g++") or shutil.which("c++") or shutil.which("gcc") else "aot_eager"
NEW_TOKENS = 5


pytestmark = pytest.mark.usefixtures("clean_dynamo")


def tiny(kind: str) -> Any:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def vector(model: Any) -> dict[str, torch.Tensor]:
    path = "transformer.h.0" if hasattr(model, "transformer") else "model.layers.0"
    return {path: torch.randn(32, generator=torch.Generator().manual_seed(3)) * 2}


def generate(model: Any, backend: str | None) -> Any:
    extra: dict[str, Any] = {}
    if backend is not None:
        config = transformers.CompileConfig(backend=backend, mode=None, fullgraph=True)
        config._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": config}
    return model.generate(
        **inputs(),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **extra,
    )


def same(got: Any, want: Any) -> None:
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["all", "from:4", "continuation"])
def test_compiled_forward_matches_eager_and_set_does_not_recompile(positions: str) -> None:
    model = tiny("gpt2")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    handle = tdsteer.steer(model, vector(model), scale=2.0, positions=positions)
    with handle:
        handle.set(starts=torch.tensor([5, 2]))
        torch.testing.assert_close(compiled(**inputs()).logits, model(**inputs()).logits, rtol=1e-5, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        handle.set(scale=-1.5, starts=torch.tensor([4, 6]), vector={k: -v for k, v in vector(model).items()})
        torch.testing.assert_close(compiled(**inputs()).logits, model(**inputs()).logits, rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs
    assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize(
    ("kind", "positions", "backend"),
    [
        ("gpt2", "all", BACKEND),
        ("gpt2", "generated", "aot_eager"),
        ("gpt2", "continuation", "aot_eager"),
        ("llama", "from:6", "aot_eager"),
    ],
)
def test_static_cache_compiled_generate_matches_eager(kind: str, positions: str, backend: str) -> None:
    model = tiny(kind)
    plain = generate(model, None)
    handle = tdsteer.steer(model, vector(model), scale=4.0, positions=positions)
    with handle:
        eager = generate(model, None)
        same(generate(model, backend), eager)
        graphs = counters["stats"]["unique_graphs"]
        handle.set(scale=-4.0)
        eager = generate(model, None)
        same(generate(model, backend), eager)
        assert counters["stats"]["unique_graphs"] == graphs, "handle.set(scale=...) recompiled"
    assert not torch.equal(torch.stack(eager.logits), torch.stack(plain.logits))
    assert dict(counters["graph_break"]) == {}
    same(generate(model, backend), plain)  # closed: the compiled decoding is plain again


def condition_for(model: Any) -> tdsteer.Condition:
    """A condition at layer 0 that one row of :func:`inputs` meets and the other does not (a threshold between them)."""
    path = "transformer.h.0" if hasattr(model, "transformer") else "model.layers.0"
    direction = torch.randn(32, generator=torch.Generator().manual_seed(5))
    condition = tdsteer.Condition({path: direction}, threshold=0.0, read="last")
    with torch.no_grad():
        hidden = model(**inputs(), output_hidden_states=True).hidden_states[1][:, -1]
    scores = condition.score(hidden.unsqueeze(1), None)
    return tdsteer.Condition({path: direction}, threshold=float(scores.mean()), read="last")


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_conditional_steering_in_compiled_generate(positions: str) -> None:
    """The condition is decided in the prompt pass, and the compiled decoding steps steer only the rows
    that met it: the tokens and logits of eager conditional steering; a new scale recompiles nothing."""
    model = tiny("gpt2")
    condition = condition_for(model)  # after it, transformers' own recording hooks are on the model
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    plain = generate(model, None)
    handle = tdsteer.steer(model, vector(model), scale=6.0, positions=positions, condition=condition)
    with handle:
        eager = generate(model, None)
        met = handle.condition_met
        same(generate(model, "aot_eager"), eager)
        assert torch.equal(handle.condition_met, met)
        graphs = counters["stats"]["unique_graphs"]
        handle.set(scale=-6.0)
        eager = generate(model, None)
        same(generate(model, "aot_eager"), eager)
        assert counters["stats"]["unique_graphs"] == graphs, "handle.set(scale=...) recompiled"
    assert met is not None and sorted(met.tolist()) == [False, True]
    steered, unsteered = int(met.int().argmax()), int(met.int().argmin())
    logits, plain_logits = torch.stack(eager.logits), torch.stack(plain.logits)
    assert not torch.allclose(logits[:, steered], plain_logits[:, steered])
    torch.testing.assert_close(logits[:, unsteered], plain_logits[:, unsteered], rtol=1e-5, atol=1e-5)
    assert dict(counters["graph_break"]) == {}
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before


def test_conditional_steering_in_a_compiled_model() -> None:
    """``torch.compile(model)`` decides the condition inside the graph: eager results per row, for
    inputs that meet it in other rows, without recompiling."""
    model = tiny("llama")
    condition = condition_for(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    flipped = {key: value.flip(0) for key, value in inputs().items()}
    handle = tdsteer.steer(model, vector(model), scale=6.0, condition=condition)
    with handle:
        for batch in (inputs(), flipped, inputs()):
            want, met = model(**batch).logits, handle.condition_met
            torch.testing.assert_close(compiled(**batch).logits, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(handle.condition_met, met)
        assert counters["stats"]["unique_graphs"] == 1
    assert met is not None and sorted(met.tolist()) == [False, True]
    assert dict(counters["graph_break"]) == {}
