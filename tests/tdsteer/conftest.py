"""Fixtures of the core tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters
from toy_models import ToyCNN, ToyLM


@pytest.fixture
def toy_lm() -> ToyLM:
    torch.manual_seed(0)
    return ToyLM().eval()


@pytest.fixture
def toy_cnn() -> ToyCNN:
    torch.manual_seed(0)
    return ToyCNN().eval()


@pytest.fixture
def clean_dynamo() -> Iterator[None]:
    """A clean dynamo, guarding on module hooks (the recipe of docs/benchmarks.md, 'Compiled models')."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), torch.no_grad():
        yield
    torch._dynamo.reset()
    counters.clear()  # later tests' contexts would warn about graphs compiled here
