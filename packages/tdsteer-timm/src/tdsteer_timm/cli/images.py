"""Images from folders, as contrastive batches for :func:`tdsteer.extract`, read a batch at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from tdsteer.cli import CLIError

#: File suffixes read as images (what PIL opens without plugins).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")

Transform = Callable[[Any], Tensor]


def image_files(folder: str, option: str) -> list[Path]:
    """The image files in ``folder`` and its subfolders, sorted by path.

    Raises:
        CLIError: The folder is missing or holds no image.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CLIError(f"{option} {folder}: no such folder")
    files = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CLIError(f"{option} {folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path, transform: Transform) -> Tensor:
    """One image as the model's input ``[C, H, W]``.

    Raises:
        CLIError: PIL cannot read the file.
    """
    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as error:
        raise CLIError(f"cannot read the image {path}: {error}") from None


def _split(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """``items`` in ``parts`` consecutive runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0)
        runs.append(list(items[start:stop]))
        start = stop
    return runs


class FolderBatches:
    """Re-iterable batches ``{"positive": Tensor[B, C, H, W], "negative": Tensor[B', C, H, W]}``.

    Both sides are cut into the same number of batches of at most ``batch_size`` images; with as many
    positive as negative images, batch ``i`` pairs the same positions of the two sorted lists.
    """

    def __init__(self, positive: Sequence[Path], negative: Sequence[Path], transform: Transform, batch_size: int):
        self.count = max(len(positive), len(negative))
        parts = -(-self.count // batch_size)
        self.positive = _split(positive, parts)
        self.negative = _split(negative, parts)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positive)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for positive, negative in zip(self.positive, self.negative):
            yield {
                "positive": torch.stack([load_image(path, self.transform) for path in positive]),
                "negative": torch.stack([load_image(path, self.transform) for path in negative]),
            }


def folder_batches(
    positive: Sequence[Path], negative: Sequence[Path], transform: Transform, batch_size: int, *, paired: bool
) -> FolderBatches:
    """Batches of the images of two folders.

    Args:
        positive: Image files showing the concept.
        negative: Image files without it.
        transform: PIL image -> ``[C, H, W]`` tensor (timm's eval transform).
        batch_size: Most images of one side in a batch.
        paired: The method pairs one positive with one negative image (``pca_diff``): the counts must match.

    Raises:
        CLIError: The counts differ for a paired method, or so much that a batch would lack one side.
    """
    if paired and len(positive) != len(negative):
        raise CLIError(
            f"this method pairs images, but --positive has {len(positive)} and --negative {len(negative)}; "
            "give as many of each, or use --method mean_diff"
        )
    parts = -(-max(len(positive), len(negative)) // batch_size)
    fewer = min(len(positive), len(negative))
    if fewer < parts:
        side = "--positive" if len(positive) < len(negative) else "--negative"
        raise CLIError(
            f"{side} has {fewer} images against {max(len(positive), len(negative))}: with --batch-size {batch_size} "
            f"every one of the {parts} batches needs one of each; add images or raise --batch-size"
        )
    return FolderBatches(positive, negative, transform, batch_size)
