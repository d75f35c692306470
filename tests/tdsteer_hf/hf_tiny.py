"""Test helpers: tiny random Hugging Face models and tiny trained tokenizers; nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

VOCAB = 96
HIDDEN = 32
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    **IDS,
)
MOE: dict[str, Any] = dict(num_experts_per_tok=1, moe_intermediate_size=32)

# model_type -> (config class name, keyword arguments, model class name)
TINY: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, **IDS),
        "GPT2LMHeadModel",
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_layers=2,
            num_heads=2,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64,
            window_size=16,
            **IDS,
        ),
        "GPTNeoForCausalLM",
    ),
    "gptj": (
        "GPTJConfig",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, rotary_dim=8, **IDS),
        "GPTJForCausalLM",
    ),
    "gpt_neox": ("GPTNeoXConfig", LLAMA_LIKE, "GPTNeoXForCausalLM"),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=64,
            max_position_embeddings=64,
            word_embed_proj_dim=HIDDEN,
            **IDS,
        ),
        "OPTForCausalLM",
    ),
    "bloom": (
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=2, **IDS),
        "BloomForCausalLM",
    ),
    "falcon": (
        "FalconConfig",
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, **IDS),
        "FalconForCausalLM",
    ),
    "llama": ("LlamaConfig", LLAMA_LIKE, "LlamaForCausalLM"),
    "mistral": ("MistralConfig", LLAMA_LIKE, "MistralForCausalLM"),
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1), "MixtralForCausalLM"),
    "qwen2": ("Qwen2Config", LLAMA_LIKE, "Qwen2ForCausalLM"),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(LLAMA_LIKE, num_experts=2, shared_expert_intermediate_size=32, **MOE),
        "Qwen2MoeForCausalLM",
    ),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=16), "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(LLAMA_LIKE, num_experts=2, head_dim=16, **MOE), "Qwen3MoeForCausalLM"),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=16), "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=16), "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=16), "Gemma3ForCausalLM"),
    "phi": ("PhiConfig", LLAMA_LIKE, "PhiForCausalLM"),
    "phi3": ("Phi3Config", LLAMA_LIKE, "Phi3ForCausalLM"),
    "olmo": ("OlmoConfig", LLAMA_LIKE, "OlmoForCausalLM"),
    "olmo2": ("Olmo2Config", LLAMA_LIKE, "Olmo2ForCausalLM"),
    "cohere": ("CohereConfig", LLAMA_LIKE, "CohereForCausalLM"),
    "stablelm": ("StableLmConfig", LLAMA_LIKE, "StableLmForCausalLM"),
    "starcoder2": ("Starcoder2Config", LLAMA_LIKE, "Starcoder2ForCausalLM"),
    "granite": ("GraniteConfig", LLAMA_LIKE, "GraniteForCausalLM"),
    "olmoe": ("OlmoeConfig", dict(LLAMA_LIKE, num_experts=2, num_experts_per_tok=1), "OlmoeForCausalLM"),
    "granitemoe": (
        "GraniteMoeConfig",
        dict(LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1),
        "GraniteMoeForCausalLM",
    ),
    "phimoe": ("PhimoeConfig", dict(LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1), "PhimoeForCausalLM"),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            LLAMA_LIKE,
            n_routed_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 mixture of experts
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
        "DeepseekV3ForCausalLM",
    ),
    "smollm3": ("SmolLM3Config", LLAMA_LIKE, "SmolLM3ForCausalLM"),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, **IDS),
        "GPTBigCodeForCausalLM",
    ),
    "codegen": (
        "CodeGenConfig",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, rotary_dim=8, **IDS),
        "CodeGenForCausalLM",
    ),
    "bert": ("BertConfig", LLAMA_LIKE, "BertModel"),
    "roberta": ("RobertaConfig", dict(LLAMA_LIKE, pad_token_id=1, bos_token_id=0), "RobertaModel"),
    "distilbert": (
        "DistilBertConfig",
        dict(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        "DistilBertModel",
    ),
}


def gemma3_config() -> Any:
    """A tiny Gemma 3 vision-language config (one-layer SigLIP tower, two-layer language model)."""
    text = transformers.Gemma3TextConfig(**dict(LLAMA_LIKE, head_dim=16))
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    return transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=1,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
    )


def build(model_type: str, model_class: str | None = None, seed: int = 0) -> nn.Module:
    """Tiny random model of ``model_type`` in eval mode (``gemma3`` gives the vision-language model)."""
    torch.manual_seed(seed)
    if model_type == "gemma3":
        cls = getattr(transformers, model_class or "Gemma3ForConditionalGeneration")
        return cls(gemma3_config()).eval()
    config_name, kwargs, default_class = TINY[model_type]
    config = getattr(transformers, config_name)(**kwargs)
    return getattr(transformers, model_class or default_class)(config).eval()


def padded_prompts(lengths: list[int], *, pad: int = 0, right: bool = False, seed: int = 3) -> dict[str, torch.Tensor]:
    """Random prompts of ``lengths`` real tokens, padded with ``pad`` to the longest (on the left, or the right)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        real = slice(0, length) if right else slice(width - length, width)
        ids[row, real] = torch.randint(4, 90, (length,), generator=generator)
        mask[row, real] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generation_model(model_type: str, *, pad: int = 0) -> nn.Module:
    """:func:`build` in float64, generating a fixed number of new tokens greedily (no eos), ``pad`` as pad id."""
    model = build(model_type).double().eval()
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = None
    model.generation_config.do_sample = False
    return model


def train_tokenizer(texts: list[str], *, kind: str = "wordlevel", **special: Any) -> Any:
    """A fast tokenizer trained on ``texts`` (WordLevel on whitespace and punctuation, or byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            texts,
            trainers.BpeTrainer(
                vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            ),
        )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        **special,
    )
