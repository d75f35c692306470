"""Shared test set-up: the device under test, GPU-only tests, no hub access, a fixed seed."""

from __future__ import annotations

import os
from collections.abc import Iterator

# No test may reach a model hub: models and data come from the test itself or from installed packages.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

DEVICE = os.environ.get("TDSTEER_TEST_DEVICE", "cpu")


def _gpu_skip_reason() -> str | None:
    if not DEVICE.startswith("cuda"):
        return f"needs a CUDA GPU: TDSTEER_TEST_DEVICE is {DEVICE!r}, set it to 'cuda' to run GPU tests"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: TDSTEER_TEST_DEVICE is 'cuda' but torch.cuda.is_available() is False"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device under test: ``TDSTEER_TEST_DEVICE`` (``cpu`` by default, ``cuda`` on a GPU run)."""
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("TDSTEER_TEST_DEVICE is 'cuda' but torch.cuda.is_available() is False")
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny test models run fastest on one thread: on a busy CPU, OpenMP start-up and spinning cost
    more than the matmuls (seen: 100x slower forwards with two threads on two loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def clean_dynamo() -> Iterator[None]:
    """A clean dynamo, guarding on module hooks (the recipe of docs/benchmarks.md, 'Compiled models')."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), torch.no_grad():
        yield
    torch._dynamo.reset()
    counters.clear()  # later tests' contexts would warn about graphs compiled here
