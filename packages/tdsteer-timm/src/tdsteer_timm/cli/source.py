"""``tdsteer info --model NAME`` for timm model names (``resnet50``, ``timm/vit_base_patch16_224.augreg_in21k``)."""

from __future__ import annotations

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

    def open(self, name: str) -> OpenedModel:
        """Build the model on the CPU with ``pretrained=False`` and describe it."""
        model = create(name)
        return OpenedModel(model, describe(model), weights_read=False, facts={"parameters": parameter_count(model)})


SOURCE = TimmSource()
