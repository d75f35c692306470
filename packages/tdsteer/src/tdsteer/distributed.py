"""Data parallelism across ``torch.distributed`` processes: ``torchrun`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``).

Each rank reads a disjoint shard of the data (:func:`shard`), the aggregator states are all-reduced
once at the end, and rank 0 writes the result. A failure on one rank is shared with every rank
(:func:`agree`), so all ranks fail with the same message instead of the others waiting forever.

Examples:
    A script run with ``torchrun --nproc-per-node 2 script.py``::

        with tdsteer.distributed.process_group():
            pairs = tdsteer.distributed.shard(all_pairs)        # this rank's share
            vector = tdsteer.extract(model, batches_of(pairs), sites)   # all-reduced across ranks
            if tdsteer.distributed.is_main():
                vector.save("v.safetensors")
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class RankError(ValueError):
    """A rank failed; every rank raises this with the same message, naming the rank that failed."""


def active(group: Any = None) -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_size(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group.

    Examples:
        >>> rank_and_size()
        (0, 1)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main(group: Any = None) -> bool:
    """Whether this is rank 0 (always true outside a process group): the rank that writes and prints."""
    return rank_and_size(group)[0] == 0


def launched() -> bool:
    """Whether a launcher started several processes (``WORLD_SIZE`` > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when GPUs are visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def process_group(backend: str | None = None, *, timeout_s: float = 1800.0) -> Iterator[bool]:
    """Join the process group a launcher describes, for the ``with`` block; leave it afterwards.

    Does nothing when no launcher started several processes, or when a group is already initialised
    (then the caller owns it).

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default: ``nccl`` when GPUs are visible, else ``gloo``.
        timeout_s: How long a collective waits for the other ranks.

    Yields:
        Whether several processes take part.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield active()
        return
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        dist.destroy_process_group()


def leave_process_group(*, wait: bool) -> None:
    """Leave the default process group that a library (accelerate, lm-eval) joined for this process
    and left open; nothing when there is none.

    Without it, each rank tears its communication threads down at interpreter exit, where one rank
    can abort ("terminate called without an active exception") while another still talks to it.

    Args:
        wait: Meet every rank at a barrier first (when this rank finished its work normally).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def shard(items: Sequence[T], group: Any = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from index ``rank`` (all of them alone).

    Shards are disjoint and cover every item, whatever the count (a rank may get none).

    Examples:
        >>> shard(["a", "b", "c"])
        ['a', 'b', 'c']
    """
    rank, size = rank_and_size(group)
    return list(items[rank::size])


def gather(value: T, group: Any = None) -> list[T]:
    """``value`` of every rank, in rank order (``[value]`` outside a group of several processes).

    A collective: call it on every rank at the same point. ``value`` must be picklable.

    Examples:
        >>> gather(3)
        [3]
    """
    if not active(group):
        return [value]
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def agree(
    error: BaseException | None,
    group: Any = None,
    *,
    keep: Mapping[type[BaseException], type[RankError]] | None = None,
) -> None:
    """Share whether any rank failed: if one did, every rank raises :class:`RankError` with its message.

    Call it on every rank at the same point (it is a collective), with the exception this rank caught
    or ``None``. Outside a group of several processes, ``error`` itself is raised.

    Args:
        error: The exception this rank caught, or ``None``.
        group: The ``torch.distributed`` group (default: the whole world).
        keep: Kinds of failure that every rank reports as such: when the first failing rank's
            exception is an instance of a key, every rank raises the mapped subclass of
            :class:`RankError` (which may also derive from the key, so that callers catch it either
            way) instead of :class:`RankError` itself.

    Raises:
        RankError: Some rank failed (the first one is named: ``rank 1 of 2 failed: ...``).

    Examples:
        >>> agree(None)
    """
    if not active(group):
        if error is not None:
            raise error
        return
    kinds = list(keep or {})
    mine = None
    if error is not None:
        kind = next((i for i, cls in enumerate(kinds) if isinstance(error, cls)), None)
        mine = (" ".join(str(error).split()) or type(error).__name__, kind)
    messages = gather(mine, group)
    failed = [(rank, sent) for rank, sent in enumerate(messages) if sent is not None]
    if failed:
        rank, (message, kind) = failed[0]
        raised = RankError if kind is None or keep is None else keep[kinds[kind]]
        raise raised(f"rank {rank} of {len(messages)} failed: {message}") from error
