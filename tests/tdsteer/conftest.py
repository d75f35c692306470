"""Fixtures of the core tests."""

from __future__ import annotations

import pytest
import torch
from toy_models import ToyCNN, ToyLM


@pytest.fixture
def toy_lm() -> ToyLM:
    torch.manual_seed(0)
    return ToyLM().eval()


@pytest.fixture
def toy_cnn() -> ToyCNN:
    torch.manual_seed(0)
    return ToyCNN().eval()
