"""The ``tdsteer`` command, run in-process on a tiny local GPT-2: extract, generate, info, demo, and errors.

Every user error ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_tiny import HIDDEN, train_tokenizer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from tdsteer import SteeringVector, take_indices
from tdsteer.cli import CLIError, main, parse_layers, parse_scales
from tdsteer_hf.tiny import tiny_gpt2

PAIRS = [
    ("I love this movie", "I hate this movie"),
    ("the weather is nice today", "the weather is awful today"),
    ("this book is great", "this book is awful"),
    ("I really like it", "I really dislike it"),
    ("what a happy day", "what a sad day"),
    ("the food was wonderful", "the food was terrible"),
]
PROMPT = "I think this movie is"
CAA = [
    {
        "question": "Is the movie good ? Choices : (A) yes (B) no",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    },
    {
        "question": "Is the food awful ? Choices : (A) yes (B) no",
        "answer_matching_behavior": "(B)",
        "answer_not_matching_behavior": "(A)",
    },
]
CORPUS = [text for pair in PAIRS for text in pair] + [PROMPT, "Choices ( A ) yes ( B ) no ?"]
NEW_TOKENS = 8


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    """``main(argv)`` with its exit status, stdout and stderr."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(result: tuple[int, str, str], *words: str) -> None:
    """Exit status 2 and one line on stderr naming the problem, without a traceback."""
    status, _, err = result
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdsteer: error: "), err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 (2 layers, hidden 32) and a word-level tokenizer saved side by side."""
    tokenizer = train_tokenizer(CORPUS)
    model = tiny_gpt2(tokenizer, n_layer=2, n_embd=HIDDEN, n_head=2, n_positions=64, initializer_range=0.1, seed=0)
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pairs_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    path.write_text("positive\tnegative\n" + "".join(f"{p}\t{n}\n" for p, n in PAIRS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vector_file(model_dir: Path, pairs_tsv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vectors") / "liking.safetensors"
    argv = ["extract", "--model", str(model_dir), "--pairs", str(pairs_tsv), "--layers", "0,1", "-o", str(path)]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    return path


def greedy(model_dir: Path, prompt: str) -> str:
    """Plain greedy continuation of ``prompt``, decoded as the command decodes it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


# --- extract and generate -----------------------------------------------------------------------------


def test_extract_saves_vector_with_metadata(
    model_dir: Path, pairs_tsv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "v.safetensors"
    status, out, err = run(
        capsys, "extract", "--model", model_dir, "--pairs", pairs_tsv, "--layers", "0,1", "-o", output, "--no-progress"
    )
    assert status == 0, err
    assert out.count("\n") == 1 and "mean_diff" in out and f"{len(PAIRS)} examples" in out and str(output) in out
    vector = SteeringVector.load(output)
    assert vector.keys() == ["transformer.h.0", "transformer.h.1"]
    assert all(direction.shape == (HIDDEN,) for direction in vector.directions.values())
    meta = vector.metadata
    assert (meta["method"], meta["model_type"], meta["model_name"]) == ("mean_diff", "gpt2", str(model_dir))
    assert (meta["num_examples"], meta["read"], meta["site_kind"], meta["layers"]) == (
        len(PAIRS),
        "last",
        "resid_post",
        [0, 1],
    )


def test_generate_scales_in_one_batch(model_dir: Path, vector_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", model_dir, "--vector", vector_file, "--scale", "-8,0,8", "--prompt", PROMPT]
    status, out, err = run(capsys, *argv, "--max-new-tokens", NEW_TOKENS, "--json")
    assert status == 0, err
    records = json.loads(out)
    assert [r["scale"] for r in records] == [-8.0, 0.0, 8.0]
    completions = {r["scale"]: r["completion"] for r in records}
    assert completions[0.0] == greedy(model_dir, PROMPT)  # add at scale 0 is the unsteered model
    assert completions[-8.0] != completions[0.0] or completions[8.0] != completions[0.0]

    status, out, err = run(capsys, *argv, "--max-new-tokens", NEW_TOKENS, "--compare")
    assert status == 0, err
    lines = [line.strip() for line in out.splitlines() if "->" in line]
    assert [line.split("->")[0].split() for line in lines] == [
        ["scale", "-8"],
        ["scale", "0"],
        ["scale", "8"],
        ["unsteered"],
    ]
    texts = [line.split("->", 1)[1].strip() for line in lines]
    assert texts[1] == texts[3] == json.dumps(completions[0.0], ensure_ascii=False)


def test_generate_left_pads_prompts_of_different_lengths(
    model_dir: Path, vector_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = ["I love", PROMPT]
    argv = ["generate", "--model", model_dir, "--vector", vector_file, "--scale", "0", "--max-new-tokens", NEW_TOKENS]
    status, out, err = run(capsys, *argv, "--prompt", prompts[0], "--prompt", prompts[1], "--json", "--positions", "2")
    assert status == 0, err
    assert [r["completion"] for r in json.loads(out)] == [greedy(model_dir, p) for p in prompts]


@pytest.mark.parametrize(
    ("name", "content", "extra", "keys"),
    [
        ("caa.json", json.dumps(CAA), ["--read", "answer", "--layers", "-1"], ["transformer.h.1"]),
        ("caa.jsonl", "\n".join(map(json.dumps, CAA)), ["--read", "answer", "--layers", "all"], None),
        (
            "pairs.jsonl",
            "\n".join(json.dumps({"positive": p, "negative": n}) for p, n in PAIRS),
            ["--read", "mean", "--layers", "0:2", "--kind", "mlp_out"],
            ["transformer.h.0.mlp", "transformer.h.1.mlp"],
        ),
        (
            "triples.json",
            json.dumps(
                [
                    {"prompt": "the food was", "positive": " wonderful", "negative": " terrible"},
                    {"prompt": "this book is", "positive": " great", "negative": " awful"},
                ]
            ),
            ["--read", "answer", "--method", "pca_center"],
            ["transformer.h.1"],
        ),
        (
            "three.tsv",
            "I love\tthis movie\tthis book\n",
            ["--layers=-2", "--kind", "resid_pre"],
            ["transformer.h.0:input"],
        ),
    ],
    ids=["caa-json", "caa-jsonl", "pairs-jsonl", "triples-json", "triples-tsv"],
)
def test_extract_reads_every_data_format(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str,
    extra: list[str],
    keys: list[str] | None,
) -> None:
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    output = tmp_path / "v.safetensors"
    status, _, err = run(capsys, "extract", "--model", model_dir, "--pairs", data, "-o", output, *extra)
    assert status == 0, err
    vector = SteeringVector.load(output)
    assert vector.keys() == (keys or ["transformer.h.0", "transformer.h.1"])


def test_parse_layers_and_scales() -> None:
    def layers(text: str, count: int) -> list[int]:
        return take_indices(count, parse_layers(text))

    assert layers("6,7", 12) == [6, 7]
    assert layers("-1", 12) == [11]
    assert layers("all", 3) == [0, 1, 2]
    assert layers("2:5", 12) == [2, 3, 4]
    assert layers("-2:,0", 4) == [2, 3, 0]
    assert parse_layers(None) is None  # not given: the command picks its default
    with pytest.raises(IndexError, match="out of range"):
        layers("12", 12)
    with pytest.raises(IndexError, match="out of range"):
        layers("0:20", 12)
    with pytest.raises(IndexError, match="selects no layer"):
        layers("5:5", 12)
    with pytest.raises(CLIError, match="not an index"):
        parse_layers("six")
    assert parse_scales(["-4,0,4", "2"]) == [-4.0, 0.0, 4.0, 2.0]
    with pytest.raises(CLIError, match="not a number"):
        parse_scales(["four"])
    with pytest.raises(CLIError, match="'1,,2' has an empty item"):
        parse_scales(["1,,2"])  # the 1 and the 2 would be read, the number between them lost


# --- info and demo ------------------------------------------------------------------------------------


def test_info_model(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "info", "--model", model_dir)
    assert status == 0, err
    assert "architecture: gpt2" in out and "hidden_size:  32" in out and "adapter tdsteer_hf" in out
    assert "resid_post  2 layers, 0..1: transformer.h.0 .. transformer.h.1" in out
    assert "transformer.h.1.attn" in out and "transformer.h.1.mlp" in out
    status, out, err = run(capsys, "info", "--model", model_dir, "--json")
    assert status == 0, err
    model = json.loads(out)["model"]
    assert (model["model_class"], model["hidden_size"]) == ("GPT2LMHeadModel", HIDDEN)
    assert model["kinds"]["resid_post"] == {"count": 2, "first": "transformer.h.0", "last": "transformer.h.1"}


def test_info_vector(model_dir: Path, vector_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "info", "--vector", vector_file)
    assert status == 0, err
    assert "transformer.h.0: shape (32,) float32, norm" in out and "transformer.h.1:" in out
    assert "method: mean_diff" in out and "model_type: gpt2" in out
    status, out, err = run(capsys, "info", "--vector", vector_file, "--model", model_dir, "--json")
    assert status == 0, err
    record = json.loads(out)
    assert record["fits"] is True
    norm = SteeringVector.load(vector_file)["transformer.h.0"].norm().item()
    assert record["vector"]["sites"][0]["norm"] == pytest.approx(norm)


def test_console_script_module(model_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tdsteer", "info", "--model", str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "architecture: gpt2" in done.stdout


# --- errors: one line on stderr, exit status 2 --------------------------------------------------------


class FlatConfig(PretrainedConfig):
    model_type = "tdsteer_cli_flat"

    def __init__(self, width: int = 4, **kwargs: Any) -> None:
        self.width = width
        super().__init__(**kwargs)


class FlatModel(PreTrainedModel):
    """A model with no list of blocks: tdsteer_hf cannot place any site in it."""

    config_class = FlatConfig

    def __init__(self, config: FlatConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(inputs_embeds)


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    AutoConfig.register(FlatConfig.model_type, FlatConfig, exist_ok=True)
    AutoModel.register(FlatConfig, FlatModel, exist_ok=True)
    directory = tmp_path_factory.mktemp("flat")
    FlatModel(FlatConfig()).save_pretrained(directory)
    return directory


def test_usage(model_dir: Path, pairs_tsv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0 and all(command in out for command in ("extract", "generate", "info", "demo"))
    status, _, err = run(capsys, "extract", "--model", model_dir, "--pairs", pairs_tsv)
    assert status == 2 and "-o/--output" in err  # argparse's usage error


def test_error_missing_model(tmp_path: Path, pairs_tsv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    assert_user_error(run(capsys, "info", "--model", missing), "does not exist", str(missing))
    out = tmp_path / "v.safetensors"
    assert_user_error(
        run(capsys, "extract", "--model", missing, "--pairs", pairs_tsv, "-o", out), "does not exist", str(missing)
    )


def test_error_unknown_architecture(
    flat_dir: Path, pairs_tsv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_user_error(run(capsys, "info", "--model", flat_dir), "does not know the architecture", "tdsteer_cli_flat")
    out = tmp_path / "v.safetensors"
    result = run(capsys, "extract", "--model", flat_dir, "--pairs", pairs_tsv, "-o", out)
    assert_user_error(result, "does not know the architecture", "blocks_path")


def test_error_layer_out_of_range(
    model_dir: Path, pairs_tsv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    result = run(capsys, "extract", "--model", model_dir, "--pairs", pairs_tsv, "--layers", "0,5", "-o", out)
    assert_user_error(result, "layer index 5 is out of range", "2 layers")
    assert not out.exists()


def test_vector_of_another_model_type(
    model_dir: Path, vector_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vector = SteeringVector.load(vector_file)
    vector.metadata["model_type"] = "llama"
    other = vector.save(tmp_path / "llama.safetensors")
    argv = ["generate", "--model", model_dir, "--vector", other, "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert_user_error(run(capsys, *argv, "--check", "error"), "model type 'llama'", "'gpt2'")
    status, out, err = run(capsys, *argv)  # default --check warn: steer anyway, say so once
    assert status == 0 and "scale 1 ->" in out
    assert err.count("warning") == 1 and "model type 'llama'" in err
    status, _, err = run(capsys, *argv, "--check", "ignore")
    assert status == 0 and err == ""


def test_error_hidden_size_mismatch(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wide = SteeringVector({"transformer.h.0": torch.randn(64)}, metadata={"model_type": "gpt2"})
    path = wide.save(tmp_path / "wide.safetensors")
    argv = ["generate", "--model", model_dir, "--vector", path, "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert_user_error(run(capsys, *argv), "hidden size 64", "is 32", "transformer.h.0")
    status, out, err = run(capsys, "info", "--model", model_dir, "--vector", path)
    assert status == 0 and "fits the model: no" in out and "hidden size 64" in out
    # A site the adapter does not know (GPT-2's MLP input projection, 128 channels): the core refuses it
    # on the first steered call, and the command reports that in one line too.
    inner = SteeringVector({"transformer.h.0.mlp.c_fc": torch.randn(HIDDEN)}, metadata={"model_type": "gpt2"})
    path = inner.save(tmp_path / "inner.safetensors")
    argv = ["generate", "--model", model_dir, "--vector", path, "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert_user_error(run(capsys, *argv), "generation failed", "hidden size 32", "128 channels")


def test_error_bad_vector_file(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    argv = ["--model", model_dir, "--prompt", PROMPT]
    assert_user_error(run(capsys, "generate", "--vector", corrupted, *argv), "corrupted.safetensors", "not a readable")
    assert_user_error(run(capsys, "info", "--vector", corrupted), "truncated or corrupted")
    missing = tmp_path / "missing.safetensors"
    assert_user_error(run(capsys, "generate", "--vector", missing, *argv), "No steering-vector file")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"transformer.h.0": torch.zeros(HIDDEN)}, str(plain))
    assert_user_error(run(capsys, "info", "--vector", plain), "without tdsteer metadata")


@pytest.mark.parametrize(("name", "content"), [("empty.tsv", ""), ("blank.jsonl", "\n\n"), ("none.json", "[]")])
def test_error_empty_pairs(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str
) -> None:
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    result = run(capsys, "extract", "--model", model_dir, "--pairs", data, "-o", tmp_path / "v.safetensors")
    assert_user_error(result, "no contrastive examples", name)


def test_error_malformed_pairs(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "four.tsv"
    data.write_text("a\tb\tc\td\n", encoding="utf-8")
    out = tmp_path / "v.safetensors"
    assert_user_error(run(capsys, "extract", "--model", model_dir, "--pairs", data, "-o", out), "line 1", "4 tab")
    data = tmp_path / "pairs.tsv"
    data.write_text("I love\tI hate\n", encoding="utf-8")
    result = run(capsys, "extract", "--model", model_dir, "--pairs", data, "-o", out, "--read", "answer")
    assert_user_error(result, "read='answer'", "pairs")


def test_caa_items_are_read_at_the_answer_letter_by_default(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CAA item ends in "(A)": its last token is the parenthesis; the default read is the answer letter."""
    items = [
        {"question": f"{p} ? (A) yes (B) no", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}
        for p, _ in PAIRS
    ]
    data = tmp_path / "caa.json"
    data.write_text(json.dumps(items), encoding="utf-8")
    vectors = {}
    for read in (None, "answer", "last"):
        output = tmp_path / f"{read}.safetensors"
        extra = [] if read is None else ["--read", read]
        status, _, err = run(
            capsys, "extract", "--model", model_dir, "--pairs", data, "--layers", "0", "-o", output, *extra
        )
        assert status == 0, err
        vectors[read] = SteeringVector.load(output)
    assert vectors[None].metadata["read"] == "answer"
    assert torch.equal(vectors[None]["transformer.h.0"], vectors["answer"]["transformer.h.0"])
    assert not torch.equal(vectors[None]["transformer.h.0"], vectors["last"]["transformer.h.0"])
    assert_user_error(
        run(
            capsys,
            "extract",
            "--model",
            model_dir,
            "--pairs",
            data,
            "--held-out",
            "0.2",
            "-o",
            tmp_path / "x.safetensors",
        ),
        "--held-out",
        "--condition",
    )


def test_a_model_name_that_is_neither_a_folder_nor_reachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped name is no local folder; as a hub id it cannot be fetched (here: offline)."""

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("tdsteer_hf.cli.loading.AutoConfig.from_pretrained", offline)
    assert_user_error(run(capsys, "info", "--model", "gtp2"), "'gtp2': it is not a local folder", "hub id")


def test_extract_option_mistakes_are_named_in_the_command_lines_words(
    model_dir: Path, pairs_tsv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["extract", "--model", model_dir, "--pairs", pairs_tsv, "--layers", "0", "-o", tmp_path / "v.safetensors"]
    assert_user_error(run(capsys, *base, "--method", "single_pair"), "--method single_pair", "add --read all")
    assert_user_error(run(capsys, *base, "--chat-template"), "has no chat template; drop --chat-template")
    assert not (tmp_path / "v.safetensors").exists()
