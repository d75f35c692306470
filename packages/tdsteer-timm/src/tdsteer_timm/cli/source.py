"""``tdsteer info --model NAME`` for timm model names (``resnet50``, ``timm/vit_base_patch16_224.augreg_in21k``)."""

from __future__ import annotations

import difflib

import timm

from tdsteer.cli import NO, SURE, OpenedModel
from tdsteer_timm.cli.models import create, is_timm_model, parameter_count
from tdsteer_timm.description import describe


class TimmSource:
    """Opens timm models by name: built offline with random weights (their structure is what ``info`` shows)."""

    name = "timm"

    def recognizes(self, name: str) -> int:
        """:data:`tdsteer.cli.SURE` for a name in timm's registry (``timm.list_models()``), else ``NO``.

        Examples:
            >>> SOURCE.recognizes("resnet18") == SURE, SOURCE.recognizes("gpt2") == NO
            (True, True)
        """
        return SURE if is_timm_model(name) else NO

    def close_names(self, name: str) -> list[str]:
        """timm model names close to ``name`` (a typo), closest first.

        Examples:
            >>> SOURCE.close_names("resnt18")[0]
            'resnet18'
        """
        return difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.85)

    def open(self, name: str) -> OpenedModel:
        """Build the model on the CPU with ``pretrained=False`` and describe it."""
        model = create(name)
        return OpenedModel(model, describe(model), weights_read=False, facts={"parameters": parameter_count(model)})


SOURCE = TimmSource()
