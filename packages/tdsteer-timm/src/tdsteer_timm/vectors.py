"""Checking a steering vector against a timm model before the first forward."""

from __future__ import annotations

from torch import nn

from tdsteer import SteeringVector, as_vector
from tdsteer.checks import Check, as_check, report
from tdsteer.model_facts import model_name_of
from tdsteer.vector import VectorSource
from tdsteer_timm.description import describe_model


def check_vector(vector: VectorSource, model: nn.Module, *, check: Check = "warn") -> SteeringVector:
    """Check that ``vector`` fits ``model`` before steering it: sizes, layouts and the model it came from.

    On top of :meth:`tdsteer.SteeringVector.validate` with this adapter's channels per site
    (``describe(model).site_sizes()``), every site the model describes must have the layout and the
    prefix-token count that the vector recorded (a vector whose sites were built by hand or by another
    version could add along the wrong axis), and a vector made for another timm architecture
    (``metadata["model_name"]`` against the model's ``pretrained_cfg["architecture"]``) warns,
    errors or passes per ``check``.

    Args:
        vector: A :class:`tdsteer.SteeringVector`, the path of a tdsteer ``.safetensors`` file, or
            ``{site path: tensor}``.
        model: The timm model about to be steered.
        check: ``"warn"`` (default), ``"error"`` or ``"ignore"`` for a different model type or architecture.

    Returns:
        The vector, loaded if a path was given.

    Raises:
        ValueError: A site does not resolve, a size or a layout differs, or (``check="error"``) the
            vector was made for another architecture.

    Examples:
        >>> import timm, torch, tdsteer
        >>> model = timm.create_model("resnet10t", pretrained=False)
        >>> site = tdsteer.Site("layer4", layout="NCHW")
        >>> check_vector(tdsteer.SteeringVector({"layer4": torch.ones(512)}, {"layer4": site}), model).keys()
        ['layer4']
        >>> check_vector(tdsteer.SteeringVector({"layer4": torch.ones(384)}, {"layer4": site}), model)
        Traceback (most recent call last):
        ...
        ValueError: This steering vector has hidden size 384 at site 'layer4' but the model's hidden size there is 512: the vector was made for another model
    """
    as_check(check)
    found = as_vector(vector)
    description = describe_model(model, True).description
    found.validate(model, check=check, site_sizes=description.site_sizes())
    known = {info.site.key: info.site for info in description.sites}
    for key, site in found.sites.items():
        expected = known.get(key)
        if expected is None or (expected.layout, expected.prefix_tokens) == (site.layout, site.prefix_tokens):
            continue
        raise ValueError(
            f"Site {key!r}: the vector records layout {site.layout} with {site.prefix_tokens} prefix tokens, but "
            f"{type(model).__name__} has {expected.layout} with {expected.prefix_tokens} there; extract the vector "
            "again from this model, or build its sites with tdsteer_timm.sites(model, ...)"
        )
    recorded, actual = found.metadata.get("model_name"), model_name_of(model)
    if isinstance(recorded, str) and actual and recorded.removeprefix("timm/").split(".")[0] != actual:
        report(
            check,
            f"This steering vector was made for timm architecture {recorded!r} but the model is {actual!r}; "
            "pass check='ignore' if that is intended",
            stacklevel=3,
        )
    return found
