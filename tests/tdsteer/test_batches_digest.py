"""``tdsteer.batches.digest``: the data fingerprint of extraction, stored in vector files, must not change."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from tensordict import TensorDictBase

from tdsteer.batches import digest


def _before(hasher: Any, value: Any) -> None:
    """``digest`` as it was before it hashed tensors in place (a copy of their bytes through numpy's
    ``tobytes``): the reference the digests must still equal."""
    if isinstance(value, torch.Tensor):
        hasher.update(str(tuple(value.shape)).encode())
        hasher.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, (Mapping, TensorDictBase)):
        for key in sorted(value.keys()):
            hasher.update(str(key).encode())
            _before(hasher, value[key])


def _hex(function: Any, value: Any) -> str:
    hasher = hashlib.sha256()
    function(hasher, value)
    return hasher.hexdigest()


CASES: dict[str, Any] = {
    "float32": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "float16": (torch.arange(10, dtype=torch.float32).reshape(2, 5) / 3).half(),
    "float64": torch.arange(4, dtype=torch.float64) / 3,
    "int64": torch.arange(12).reshape(3, 4),
    "int32 transposed": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
    "strided": (torch.arange(10, dtype=torch.float32) / 9)[::3],
    "bool": torch.tensor([[True, False, True]]),
    "empty": torch.zeros(0, 3),
    "scalar": torch.tensor(2.5),
    "mapping": {"input_ids": torch.arange(6).reshape(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)},
}
# Digests the implementation before this one gave: fingerprints stored in vector files must stay valid.
RECORDED = {
    "float32": "f35cb17e14f9b1e254fe42c0df41a843ec7233d80cc486536e3466d296922db7",
    "float16": "9c0b331f354054fa93bc48d395b8ae73ac40ad74709ea734d61992d41957c13e",
    "int32 transposed": "9815124ad2675eb2c1b9e99d3dbd9d4b2b54f61cb0dc2554e19df47af9d2840d",
    "bool": "e213755736c1c399dae878d336f12c731e6fde77b8ba0e4aae7b484af6b08337",
    "mapping": "45a70da3c714abd9f4edb1ed4ea4dc9f334221d026c88d6bb466c07668d22a85",
}


@pytest.mark.parametrize("name", list(CASES))
def test_digest_equals_the_one_before_for_every_dtype_numpy_has(name: str) -> None:
    assert _hex(digest, CASES[name]) == _hex(_before, CASES[name])


def test_recorded_digests_are_unchanged() -> None:
    for name, expected in RECORDED.items():
        assert _hex(digest, CASES[name]) == expected, name


def test_bfloat16_hashes_its_raw_bits() -> None:
    """numpy has no bfloat16 (the implementation before refused it): its bytes are its 16-bit patterns."""
    value = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7).bfloat16()
    assert _hex(digest, value) == _hex(_before, value.view(torch.int16))
    assert _hex(digest, value) != _hex(digest, value.half())


def test_a_contiguous_cpu_tensor_is_hashed_without_a_copy() -> None:
    value = torch.ones(4 * 2**20)  # 16 MiB
    tracemalloc.start()
    try:
        digest(hashlib.sha256(), value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB allocated to hash a 16 MiB tensor"
