"""``tdsteer info --model`` for Hugging Face models: a directory with ``config.json`` or a hub id."""

from __future__ import annotations

from pathlib import Path

from tdsteer.cli import MAYBE, NO, SURE, OpenedModel
from tdsteer_hf.cli.loading import load_structure, transformers_console
from tdsteer_hf.sites import describe


class HuggingFaceSource:
    """Opens Hugging Face checkpoints from their config, without reading the weights where possible."""

    name = "hf"

    def recognizes(self, name: str) -> int:
        """Sure of a directory holding ``config.json``; maybe for anything else that could be a hub id."""
        path = Path(name).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return SURE
        return NO if path.is_file() else MAYBE

    def open(self, name: str) -> OpenedModel:
        """The model's structure and its :func:`tdsteer_hf.describe` record."""
        with transformers_console():
            model, weights_read = load_structure(name)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        return OpenedModel(model, describe(model), weights_read, {"parameters": parameters})


SOURCE = HuggingFaceSource()
