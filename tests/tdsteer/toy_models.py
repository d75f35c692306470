"""Tiny torch models for the core tests: no transformers, no timm."""

from __future__ import annotations

import torch
from torch import nn


class ToyCache:
    """A KV-cache stand-in: it only knows how many tokens it has seen."""

    def __init__(self) -> None:
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (x + torch.tanh(self.mlp(x)), None)


class ToyLM(nn.Module):
    """Embedding, residual blocks returning tuples, a head; causal mean-pool mixing so that
    earlier tokens influence later ones (as attention does), with a toy KV cache."""

    def __init__(self, vocab: int = 32, hidden: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: ToyCache | None = None,
        history: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x)[0]
            if history is not None:
                # keep per-layer states of earlier tokens, as a KV cache would
                if len(history) <= i:
                    history.append(x)
                else:
                    history[i] = torch.cat([history[i], x], dim=1)
                full = history[i]
            else:
                full = x
            causal = full.cumsum(1) / torch.arange(1, full.shape[1] + 1, device=full.device).view(1, -1, 1)
            x = x + 0.1 * causal[:, -x.shape[1] :]
        return self.head(x)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 4,
        use_cache: bool = True,
    ) -> torch.Tensor:
        ids = input_ids
        cache = ToyCache() if use_cache else None
        history: list[torch.Tensor] | None = [] if use_cache else None
        step_input = ids
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(input_ids=step_input, cache=cache, history=history)
                assert cache is not None
                cache.length += step_input.shape[1]
            else:
                logits = self(input_ids=ids)
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            step_input = token
        return ids


class ToyCNN(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def block_output(model: ToyLM, ids: torch.Tensor, layer: int = 0, **kwargs: object) -> torch.Tensor:
    """The hidden states block ``layer`` of ``model`` returns when it runs on ``ids``."""
    seen = {}
    handle = model.blocks[layer].register_forward_hook(lambda m, a, out: seen.__setitem__("h", out[0]))
    try:
        model(ids, **kwargs)
    finally:
        handle.remove()
    return seen["h"]


def no_hooks(model: nn.Module) -> bool:
    """No forward hook or pre-hook on any module, and no ``generate`` wrapper left on any."""
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and "generate" not in m.__dict__ for m in model.modules()
    )
