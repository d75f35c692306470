"""``tdsteer generate``: text from a Hugging Face model with a saved vector applied, at one or several scales."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

import tdsteer
from tdsteer import UnknownArchitectureError
from tdsteer.cli import (
    CLIError,
    Command,
    add_check_option,
    one_line,
    parse_device,
    parse_positions,
    parse_scales,
    positive_int,
    quote,
    warn,
)
from tdsteer.cli.command import SUMMARIES
from tdsteer.extraction import model_device
from tdsteer.operators import OPERATORS
from tdsteer.vector import is_lm_eval_file
from tdsteer_hf.cli.loading import add_model_options, load_model, load_tokenizer, transformers_console
from tdsteer_hf.model_inputs import position_limit
from tdsteer_hf.sites import describe


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--vector", required=True, help="tdsteer steering-vector file (.safetensors)")
    parser.add_argument(
        "--scale",
        action="append",
        default=None,
        help="multiplier(s): 4, or -4,0,4 for one completion per scale; repeatable (default: 1)",
    )
    parser.add_argument(
        "--operator", choices=sorted(OPERATORS), default="add", help="how the vector acts (default: add)"
    )
    parser.add_argument(
        "--positions",
        default="all",
        help="steered tokens: all, prompt, generated, continuation, K or from:K (default: all)",
    )
    parser.add_argument("--sites", default=None, help="steer only these comma-separated sites of the vector")
    parser.add_argument(
        "--condition",
        default=None,
        help="condition file (tdsteer extract --condition): steer only the prompts that meet it",
    )
    add_check_option(parser)
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", dest="sample", action="store_false", help="greedy decoding (default)")
    sampling.add_argument("--sample", dest="sample", action="store_true", help="sample instead of greedy decoding")
    parser.set_defaults(sample=False)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--compare", action="store_true", help="also print the unsteered completions")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="format the prompts with the tokenizer's chat template (default: no)",
    )
    parser.add_argument("--json", action="store_true", help="print the completions as JSON")


def format_prompts(tokenizer: Any, prompts: list[str], chat_template: bool) -> tuple[list[str], bool]:
    """Prompts as given, or through the chat template; and whether the tokenizer adds special tokens."""
    if not chat_template:
        return prompts, True
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError("--chat-template: the tokenizer has no chat template")
    formatted = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        for prompt in prompts
    ]
    return [str(text) for text in formatted], False


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    add_special_tokens: bool = True,
) -> list[str]:
    """One batched ``model.generate`` call (left-padded), the new text of each row decoded.

    Whatever steering context is open around the call applies to it.
    """
    if getattr(tokenizer, "pad_token_id", None) is None and len(prompts) > 1:
        raise CLIError("the tokenizer has neither a pad nor an eos token, so prompts cannot be batched")
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    device = model_device(model) or torch.device("cpu")  # an offloaded model's execution device
    inputs = {key: encoded[key].to(device) for key in ("input_ids", "attention_mask") if key in encoded}
    length = int(inputs["input_ids"].shape[1])
    limit = position_limit(model)
    too_long = limit is not None and length + max_new_tokens > limit
    beyond = (
        f"the prompt ({length} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's {limit} positions"
    )
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if tokenizer.pad_token_id is not None:
        options["pad_token_id"] = tokenizer.pad_token_id
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with torch.no_grad(), transformers_console(quiet=True):
            output = model.generate(**inputs, **options)  # type: ignore[operator]
    except IndexError:
        if too_long:
            raise CLIError(f"generation failed: {beyond}") from None
        raise
    if too_long:
        warn(f"{beyond}; tokens past the last position may be unreliable")
    return [str(text) for text in tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)]


def site_sizes(model: nn.Module) -> dict[str, int] | None:
    """Channels at each site the adapter knows for ``model``; ``None`` for a model it cannot place."""
    try:
        return describe(model, fallback=False).site_sizes()
    except UnknownArchitectureError:
        return None


def _condition_note(condition: tdsteer.Condition | None, record: dict[str, Any]) -> str:
    """`` (condition met: cosine 0.61 > 0.4)`` after a prompt, when a condition gates the steering."""
    if condition is None or "condition_met" not in record:
        return ""
    side = ">" if condition.above else "<"
    verdict = "condition met" if record["condition_met"] else "condition not met, not steered"
    return f" ({verdict}: cosine {record['condition_score']:.3g}, steered when {side} {condition.threshold:.3g})"


def _run(args: argparse.Namespace) -> int:
    scales = parse_scales(args.scale or ["1"])
    positions = parse_positions(args.positions)
    positive_int("--max-new-tokens", args.max_new_tokens)
    if any(not prompt.strip() for prompt in args.prompt):
        raise CLIError("--prompt is empty; give the text to continue, e.g. --prompt 'I think'")
    parse_device(args.device)
    if args.sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise CLIError("--sample needs --temperature > 0 and 0 < --top-p <= 1")
    vector = tdsteer.as_vector(args.vector)  # before the model: a bad file fails fast
    condition = None if args.condition is None else tdsteer.Condition.load(args.condition)
    if args.sites:
        wanted = [key.strip() for key in args.sites.split(",") if key.strip()]
        try:
            vector = vector.select(wanted)
        except KeyError as error:
            raise CLIError(f"--sites: {one_line(error.args[0] if error.args else error)}") from None
    with transformers_console():
        model = load_model(args.model, dtype=args.dtype, device=args.device, need_generate=True)
        tokenizer = load_tokenizer(args.model)
    if is_lm_eval_file(args.vector):  # lm-eval hookpoints are relative to model.base_model
        vector = tdsteer.as_vector(args.vector, model)
        if args.sites:
            vector = vector.select([key.strip() for key in args.sites.split(",") if key.strip()])
    try:
        vector.validate(model, check=args.check, site_sizes=site_sizes(model))
    except ValueError as error:
        raise CLIError(f"vector {args.vector!r} does not fit the model: {one_line(error)}") from None
    prompts = list(args.prompt)
    texts, special = format_prompts(tokenizer, prompts, args.chat_template)
    rows = [text for text in texts for _ in scales]
    row_scales = torch.tensor([scale for _ in texts for scale in scales], dtype=torch.float32)
    options: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        add_special_tokens=special,
    )
    handle = tdsteer.steer(
        model,
        vector,
        scale=row_scales,
        operator=args.operator,
        positions=positions,
        check="ignore",
        condition=condition,
    )
    try:
        with handle:
            steered = generate_texts(model, tokenizer, rows, **options)
        plain = generate_texts(model, tokenizer, texts, **options) if args.compare else None
    except (ValueError, IndexError) as error:
        raise CLIError(f"generation failed: {one_line(error)}") from None
    met, scores = handle.condition_met, handle.condition_scores
    per_prompt: list[list[dict[str, Any]]] = []
    for p, prompt in enumerate(prompts):
        records = [
            {"prompt": prompt, "scale": scale, "completion": steered[p * len(scales) + s]}
            for s, scale in enumerate(scales)
        ]
        if met is not None and scores is not None:
            for record in records:
                record.update(condition_met=bool(met[p * len(scales)]), condition_score=float(scores[p * len(scales)]))
        if plain is not None:
            records.append({"prompt": prompt, "scale": None, "completion": plain[p]})
        per_prompt.append(records)
    if args.json:
        print(json.dumps([record for records in per_prompt for record in records], ensure_ascii=False, indent=2))
        return 0
    method = vector.metadata.get("method", "?")
    decoding = f"sampling (T={args.temperature:g}, seed {args.seed})" if args.sample else "greedy"
    gated = "" if condition is None else f", only prompts that meet the condition at {condition.site.key}"
    print(
        f"Steering {', '.join(vector.keys())} ({method} vector, operator {args.operator}, positions {positions}"
        f"{gated}); {decoding}, {args.max_new_tokens} new tokens"
    )
    width = max(len(f"{scale:g}") for scale in scales)
    label_width = max(len("unsteered") if plain is not None else 0, width + len("scale "))
    for p, (prompt, records) in enumerate(zip(prompts, per_prompt, strict=True)):
        print(f"prompt {p + 1}: {quote(prompt)}{_condition_note(condition, records[0])}")
        for record in records:
            label = "unsteered" if record["scale"] is None else f"scale {record['scale']:>{width}g}"
            print(f"  {label:<{label_width}} -> {quote(record['completion'])}")
    return 0


COMMAND = Command(
    name="generate",
    help=SUMMARIES["generate"],
    description=(
        "Generate text with a saved steering vector applied. Several scales (--scale -4,0,4) run in one batch, "
        "one row per prompt and scale."
    ),
    add_arguments=_add_arguments,
    run=_run,
    signed_options=("--scale",),
)
