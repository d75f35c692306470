"""Every architecture in the table, on a tiny random model: sites resolve, read [B, T, H], and steer."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import transformers
from hf_tiny import HIDDEN, TINY, build
from torch import nn

import tdsteer
import tdsteer_hf
from tdsteer import Site
from tdsteer_hf import architectures

BATCH, TOKENS = 2, 5
ALL_TYPES = sorted([*TINY, "gemma3"])

# Path of block 1's output (resid_post) for each model type, as written by hand.
EXPECTED_BLOCK = {
    **{t: "model.layers.1" for t in architectures._LLAMA_LIKE},
    "gemma2": "model.layers.1",
    "gemma3_text": "model.layers.1",
    "olmo2": "model.layers.1",
    "gemma3": "model.language_model.layers.1",
    "gpt2": "transformer.h.1",
    "gpt_neo": "transformer.h.1",
    "gptj": "transformer.h.1",
    "gpt_bigcode": "transformer.h.1",
    "codegen": "transformer.h.1",
    "granitemoe": "model.layers.1",
    "bloom": "transformer.h.1",
    "falcon": "transformer.h.1",
    "gpt_neox": "gpt_neox.layers.1",
    "opt": "model.decoder.layers.1",
    "bert": "encoder.layer.1",
    "roberta": "encoder.layer.1",
    "distilbert": "transformer.layer.1",
}


def test_every_registered_type_is_tested() -> None:
    assert set(tdsteer_hf.supported()) == set(ALL_TYPES)
    assert set(EXPECTED_BLOCK) == set(ALL_TYPES)


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 90, (BATCH, TOKENS), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@contextmanager
def hooked(model: nn.Module, site: Site, seen: list[torch.Tensor], add: torch.Tensor | None = None) -> Iterator[None]:
    """Plain torch hooks: record the site's activation, and add ``add`` to it when given."""
    module = site.module(model)
    if site.io == "input":

        def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            slot = site.slot or 0
            x = args[slot] if len(args) > slot else kwargs[site.kwarg or "hidden_states"]
            seen.append(x)
            if add is None:
                return None
            if len(args) > slot:
                return args[:slot] + (x + add,) + args[slot + 1 :], kwargs
            return args, {**kwargs, site.kwarg or "hidden_states": x + add}

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(_: nn.Module, __: Any, output: Any) -> Any:
            x = site.select(output)
            seen.append(x)
            return None if add is None else site.replace(output, x + add)

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_sites_read_and_steer(model_type: str) -> None:
    model = build(model_type)
    inputs = _inputs()
    reference = _output(model, inputs)
    info = tdsteer_hf.describe(model)
    assert info.num_layers() == 2 == tdsteer_hf.num_layers(model)
    assert info.hidden_size == HIDDEN
    assert (info.source, info.guessed, info.architecture) == ("registry", False, model_type)
    assert tdsteer_hf.sites(model, -1)[0].path == EXPECTED_BLOCK[model_type]
    module_names = dict(model.named_modules())
    generator = torch.Generator().manual_seed(2)
    for kind in tdsteer_hf.SITE_KINDS:
        if model_type == "opt" and kind == "mlp_out":
            with pytest.raises(ValueError, match=r"no 'mlp_out' sites \(OPT has no MLP module.*use one of.*attn_out"):
                tdsteer_hf.sites(model, 0, kind=kind)
            continue
        chosen = tdsteer_hf.sites(model, [0, -1], kind=kind)
        assert [s.path.startswith(EXPECTED_BLOCK[model_type][:-1]) for s in chosen] == [True, True]
        for site in chosen:
            assert site.path in module_names, f"{site.path} is not a module of {type(model).__name__}"
            assert site.io == ("input" if kind == "resid_pre" else "output")
            seen: list[torch.Tensor] = []
            with hooked(model, site, seen):
                _output(model, inputs)
            assert len(seen) == 1, f"{site} fired {len(seen)} times"
            assert isinstance(seen[0], torch.Tensor)
            assert tuple(seen[0].shape) == (BATCH, TOKENS, HIDDEN), f"{model_type} {kind} {site.path}"
            vector = torch.randn(HIDDEN, generator=generator)
            with tdsteer.steer(model, {site: vector}, scale=10.0):
                steered = _output(model, inputs)
            assert not torch.allclose(steered, reference, atol=1e-4), f"steering {kind} at {site.path} did nothing"
            # tdsteer reads the site (input or output, slot, keyword) exactly as a plain hook does.
            with hooked(model, site, [], add=10.0 * vector):
                by_hand = _output(model, inputs)
            torch.testing.assert_close(steered, by_hand)


BARE = [
    ("gpt2", "GPT2Model", "h.1"),
    ("llama", "LlamaModel", "layers.1"),
    ("opt", "OPTModel", "decoder.layers.1"),
    ("gpt_neox", "GPTNeoXModel", "layers.1"),
    ("bert", "BertForSequenceClassification", "bert.encoder.layer.1"),
    ("gemma3", "Gemma3Model", "language_model.layers.1"),
    ("gemma3_text", "Gemma3TextModel", "layers.1"),
]


@pytest.mark.parametrize(("model_type", "model_class", "path"), BARE)
def test_bare_and_other_head_models(model_type: str, model_class: str, path: str) -> None:
    model = build(model_type, model_class)
    site = tdsteer_hf.sites(model, -1)[0]
    assert site.path == path
    seen: list[torch.Tensor] = []
    with hooked(model, site, seen), torch.no_grad():
        model(input_ids=torch.randint(4, 90, (BATCH, TOKENS)))
    assert tuple(seen[0].shape) == (BATCH, TOKENS, HIDDEN)


def test_layers_follow_take_indices() -> None:
    model = build("llama")
    assert [s.path for s in tdsteer_hf.sites(model)] == ["model.layers.0", "model.layers.1"]
    assert [s.path for s in tdsteer_hf.sites(model, [-1, 0])] == ["model.layers.1", "model.layers.0"]
    assert [s.path for s in tdsteer_hf.sites(model, slice(1, None))] == ["model.layers.1"]
    assert [s.path for s in tdsteer_hf.sites(model, range(2), kind="attn_out")] == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    ]


@pytest.mark.parametrize("bad", [2, -3, [0, 5]])
def test_layer_out_of_range_names_the_range(bad: Any) -> None:
    model = build("gpt2")
    with pytest.raises(IndexError, match=r"2 layers.*0\.\.1 or -2\.\.-1"):
        tdsteer_hf.sites(model, bad)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="resid_pre, resid_post, attn_out, mlp_out"):
        tdsteer_hf.sites(build("gpt2"), 0, kind="resid_mid")


def test_tuple_output_slots_recorded() -> None:
    # Blocks that return tuples carry slot 0; blocks that return tensors carry none.
    assert tdsteer_hf.sites(build("falcon"), 0)[0].slot == 0
    assert tdsteer_hf.sites(build("gpt2"), 0)[0].slot is None
    resid_pre = tdsteer_hf.sites(build("gpt2"), 0, kind="resid_pre")[0]
    assert (resid_pre.io, resid_pre.slot, resid_pre.kwarg) == ("input", 0, "hidden_states")


# --- fallbacks and errors ---------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, tdsteer_hf.Architecture]:
    """A private copy of the table, so tests can add and remove records."""
    table = dict(architectures._REGISTRY)
    monkeypatch.setattr(architectures, "_REGISTRY", table)
    return table


def test_no_split_modules_fallback(registry: dict[str, Any]) -> None:
    del registry["llama"]
    model = build("llama")
    with pytest.warns(UserWarning, match=r"not a registered architecture.*'model.layers'.*_no_split_modules"):
        chosen = tdsteer_hf.sites(model, [0, -1])
    assert [s.path for s in chosen] == ["model.layers.0", "model.layers.1"]
    with pytest.warns(UserWarning):
        info = tdsteer_hf.describe(model)
    assert (info.source, info.guessed) == ("no_split_modules", True)
    with pytest.raises(tdsteer.UnknownArchitectureError, match=r"fallback=False.*Supported: .*gpt2"):
        tdsteer_hf.sites(model, fallback=False)
    assert tdsteer_hf.sites(model, 0, kind="resid_pre")[0].io == "input"
    with (
        pytest.raises(ValueError, match=r"'attn_out'.*not registered.*register_architecture"),
        pytest.warns(UserWarning),
    ):
        tdsteer_hf.sites(model, 0, kind="attn_out")


def test_no_split_modules_prefers_the_language_model(registry: dict[str, Any]) -> None:
    del registry["gemma3"], registry["gemma3_text"]
    model = build("gemma3")
    with pytest.warns(UserWarning, match=r"'model.language_model.layers' \(of \[.*vision_tower"):
        site = tdsteer_hf.sites(model, -1)[0]
    assert site.path == "model.language_model.layers.1"


def test_nested_registered_language_model(registry: dict[str, Any]) -> None:
    # Without a "gemma3" record, the registered "gemma3_text" sub-model supplies the layout.
    del registry["gemma3"]
    model = build("gemma3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = tdsteer_hf.describe(model)
    assert (info.source, info.guessed) == ("nested", False)
    assert info.of_kind("mlp_out")[1].path == "model.language_model.layers.1.post_feedforward_layernorm"


def test_llava_resolves_its_language_model() -> None:
    text = transformers.LlamaConfig(**TINY["llama"][1])
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=95)
    )
    assert "llava" not in tdsteer_hf.supported()
    assert [s.path for s in tdsteer_hf.sites(model, -1, kind="mlp_out")] == ["model.language_model.layers.1.mlp"]


class Block(nn.Module):
    def __init__(self, width: int = 8, experts: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.experts = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.proj(hidden) + sum((e(hidden) for e in self.experts), torch.zeros_like(hidden))


class Toy(nn.Module):
    def __init__(self, experts: int = 0) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.stack = nn.ModuleList(Block(experts=experts) for _ in range(3))
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.stack:
            h = block(h)
        return h


def test_guess_warns_and_finds_the_blocks() -> None:
    with pytest.warns(UserWarning, match=r"guessed.*'stack'.*blocks_path="):
        chosen = tdsteer_hf.sites(Toy(), -1, kind="resid_pre")
    assert chosen[0].path == "stack.2"
    assert chosen[0].kwarg == "hidden"


def test_guess_skips_expert_lists() -> None:
    # Eight experts per block outnumber the three blocks, but the block list holds more parameters.
    with pytest.warns(UserWarning, match="guessed"):
        assert tdsteer_hf.num_layers(Toy(experts=8)) == 3


def test_blocks_path_override() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = tdsteer_hf.sites(Toy(), [0, 1], blocks_path="stack")
        assert [s.path for s in chosen] == ["stack.0", "stack.1"]
        assert tdsteer_hf.describe(Toy(), blocks_path="stack").source == "blocks_path"
    # On a registered model the override keeps the record's sub-layers.
    model = build("gpt2")
    assert tdsteer_hf.sites(model, 0, kind="mlp_out", blocks_path="transformer.h")[0].path == "transformer.h.0.mlp"


@pytest.mark.parametrize("path", ["stack.0", "nope", "embed"])
def test_bad_blocks_path(path: str) -> None:
    with pytest.raises(ValueError, match=rf"blocks_path='{path}'.*ModuleList"):
        tdsteer_hf.sites(Toy(), blocks_path=path)


def test_unknown_model_error_lists_types_and_override() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with pytest.raises(ValueError) as error:
        tdsteer_hf.sites(model)
    message = str(error.value)
    for needed in ("llama", "gpt2", "qwen3_moe", "bert", "blocks_path=", "register_architecture"):
        assert needed in message


def test_register_architecture(registry: dict[str, Any]) -> None:
    model = Toy()
    model.config = transformers.PretrainedConfig()  # type: ignore[assignment]
    model.config.model_type = "toy"
    record = tdsteer_hf.register_architecture("toy", blocks="stack", attn="proj", attn_slot=None, mlp=None)
    assert tdsteer_hf.architecture("toy") is record and "toy" in tdsteer_hf.supported()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tdsteer_hf.sites(model, 1, kind="attn_out")[0].path == "stack.1.proj"
    with pytest.raises(ValueError, match="no 'mlp_out' sites \\(model type 'toy' has no module for it\\)"):
        tdsteer_hf.sites(model, 1, kind="mlp_out")
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        tdsteer_hf.register_architecture("toy", blocks="stack")
    tdsteer_hf.register_architecture(tdsteer_hf.Architecture("toy", "stack", mlp="proj"), overwrite=True)
    assert tdsteer_hf.sites(model, 1, kind="mlp_out")[0].path == "stack.1.proj"


def test_register_architecture_names_the_bad_spec(registry: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"register_architecture\('x', spec\): spec must be an Architecture.*got int"):
        tdsteer_hf.register_architecture("x", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int"):
        tdsteer_hf.register_architecture(3)  # type: ignore[arg-type]
    assert "x" not in tdsteer_hf.supported()


@pytest.mark.parametrize("call", [tdsteer_hf.sites, tdsteer_hf.describe, tdsteer_hf.num_layers, tdsteer_hf.resolve])
def test_a_model_name_instead_of_a_model(call: Any) -> None:
    """The same TypeError as tdsteer_timm's ("expects a torch.nn.Module, got str"), not an AttributeError."""
    with pytest.raises(TypeError, match=r"tdsteer_hf expects a torch.nn.Module, got str; load the model first"):
        call("gpt2")
    with pytest.raises(TypeError, match=r"tdsteer_hf expects a torch.nn.Module, got NoneType$"):
        call(None)


def test_record_pointing_nowhere(registry: dict[str, Any]) -> None:
    tdsteer_hf.register_architecture("gpt2", blocks="blocks", overwrite=True)
    with pytest.raises(ValueError, match=r"'gpt2' record places the blocks at 'blocks'.*blocks_path="):
        tdsteer_hf.sites(build("gpt2"))


class Wrapper(nn.Module):
    """A wrapper (PEFT-style) that exposes the inner model's config."""

    def __init__(self, *inner: nn.Module) -> None:
        super().__init__()
        self.inner = nn.ModuleList(inner)
        self.config = inner[0].config

    def forward(self, **kwargs: Any) -> Any:
        return self.inner[0](**kwargs)


def test_wrapped_model_found_by_path_suffix() -> None:
    model = Wrapper(build("gpt2"))
    chosen = tdsteer_hf.sites(model, -1, kind="attn_out")
    assert [s.path for s in chosen] == ["inner.0.transformer.h.1.attn"]
    seen: list[torch.Tensor] = []
    with hooked(model, chosen[0], seen), torch.no_grad():
        model(input_ids=torch.randint(4, 90, (BATCH, TOKENS)))
    assert tuple(seen[0].shape) == (BATCH, TOKENS, HIDDEN)


def test_two_matching_block_lists_are_ambiguous() -> None:
    with pytest.raises(ValueError, match=r"several block lists matching 'h'.*inner\.0\.transformer\.h.*blocks_path="):
        tdsteer_hf.sites(Wrapper(build("gpt2"), build("gpt2")))


def test_architecture_decorator_registers_a_record_that_sites_use() -> None:
    from tdsteer_hf.architectures import _REGISTRY

    @tdsteer_hf.architecture_for("gpt2_renamed_for_test")
    def _record() -> tdsteer_hf.Architecture:
        return tdsteer_hf.Architecture("gpt2_renamed_for_test", blocks="h", attn="attn", mlp="mlp")

    try:
        model = build("gpt2")
        model.config.model_type = "gpt2_renamed_for_test"
        assert [s.path for s in tdsteer_hf.sites(model, layers=-1, kind="mlp_out")] == ["transformer.h.1.mlp"]
        with pytest.raises(ValueError, match="must decorate"):
            tdsteer_hf.architecture_for("other")(_record)
    finally:
        _REGISTRY.pop("gpt2_renamed_for_test", None)
