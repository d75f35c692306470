"""Contrastive image batches in the format of :func:`tdsteer.extract`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


def _as_images(images: Tensor | Sequence[Tensor], which: str) -> Tensor:
    if isinstance(images, Tensor):
        stacked = images
    else:
        items = list(images)
        if not items or not all(isinstance(item, Tensor) for item in items):
            raise TypeError(
                f"{which}_images must be a tensor [N, C, H, W] or a non-empty sequence of [C, H, W] tensors"
            )
        try:
            stacked = torch.stack(items)
        except RuntimeError as error:
            raise ValueError(f"{which}_images: the images have different shapes ({error}); resize them first") from None
    if stacked.dim() != 4:
        raise ValueError(f"{which}_images must have shape [N, C, H, W], got {tuple(stacked.shape)}")
    if stacked.shape[0] == 0:
        raise ValueError(f"{which}_images is empty")
    return stacked


class ImageBatches:
    """Re-iterable contrastive batches ``{"positive": Tensor[B, C, H, W], "negative": Tensor[B, C, H, W]}``.

    Built by :func:`contrastive_batches`; ``len()`` is the number of batches.
    """

    def __init__(self, positive: Tensor, negative: Tensor, batch_size: int) -> None:
        self.positive = positive
        self.negative = negative
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.positive.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for start in range(0, self.positive.shape[0], self.batch_size):
            stop = start + self.batch_size
            yield {"positive": self.positive[start:stop], "negative": self.negative[start:stop]}

    def __repr__(self) -> str:
        return (
            f"ImageBatches(pairs={self.positive.shape[0]}, image={tuple(self.positive.shape[1:])}, "
            f"batch_size={self.batch_size}, batches={len(self)})"
        )


def contrastive_batches(
    positive_images: Tensor | Sequence[Tensor],
    negative_images: Tensor | Sequence[Tensor],
    *,
    batch_size: int = 16,
) -> ImageBatches:
    """Pair positive and negative images into batches for :func:`tdsteer.extract`.

    Args:
        positive_images: Tensor ``[N, C, H, W]`` (already preprocessed for the model, e.g. with
            ``timm.data.create_transform``) or a sequence of ``[C, H, W]`` tensors.
        negative_images: The contrasting images, same count and shape as ``positive_images``.
        batch_size: Pairs per batch (keyword-only; 16, as in ``tdsteer_hf.contrastive_batches`` and
            ``tdsteer extract-images --batch-size``); the last batch may be smaller.
            (:func:`tdsteer.extract` moves each batch to the model's device.)

    Returns:
        A re-iterable :class:`ImageBatches` yielding ``{"positive": ..., "negative": ...}`` dicts.

    Raises:
        ValueError: Shapes or counts differ, or ``batch_size`` is not positive.

    Examples:
        >>> import torch
        >>> batches = contrastive_batches(torch.zeros(5, 3, 32, 32), torch.ones(5, 3, 32, 32), batch_size=2)
        >>> len(batches), [b["positive"].shape[0] for b in batches]
        (3, [2, 2, 1])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    positive = _as_images(positive_images, "positive")
    negative = _as_images(negative_images, "negative")
    if positive.shape[0] != negative.shape[0]:
        raise ValueError(
            f"contrastive_batches pairs images: got {positive.shape[0]} positive and {negative.shape[0]} negative images; "
            "pass the same number of each"
        )
    if positive.shape[1:] != negative.shape[1:]:
        raise ValueError(
            f"positive images have shape {tuple(positive.shape[1:])} but negative images {tuple(negative.shape[1:])}; "
            "preprocess both with the same transform"
        )
    return ImageBatches(positive, negative, batch_size)
