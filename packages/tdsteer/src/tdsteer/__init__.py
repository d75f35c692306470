"""tdsteer: activation steering for PyTorch models on tdhook and tensordict.

The public names below are imported on first use, so ``import tdsteer`` (and the ``tdsteer``
command's start) does not pay for torch, tensordict and tdhook until something needs them.
"""

from typing import TYPE_CHECKING

from tdsteer._version import __version__

if TYPE_CHECKING:
    from tdsteer import distributed
    from tdsteer.activation_addition import ActivationAddition
    from tdsteer.adapter import Adapter, ModelDescription, SiteInfo
    from tdsteer.aggregators import (
        ActAdd,
        Aggregator,
        LinearProbe,
        MeanDiff,
        PCACenter,
        PCADiff,
        make_aggregator,
        register_method,
    )
    from tdsteer.cache import ActivationCache, ActivationCacheError
    from tdsteer.conditions import Condition
    from tdsteer.errors import SteeringVectorFileError, UnknownArchitectureError
    from tdsteer.extraction import Extraction, SiteRecorder, extract
    from tdsteer.handle import SteeringHandle, steer
    from tdsteer.indices import parse_indices, take_indices
    from tdsteer.keys import BatchKeys
    from tdsteer.operators import Ablate, Add, AddNorm, Clamp, Custom, Operator, register_operator
    from tdsteer.positions import PositionPolicy
    from tdsteer.reading import ReadContext, TokenReading, register_reader
    from tdsteer.sites import Site, as_site, as_sites
    from tdsteer.steering import SteeringVectors
    from tdsteer.vector import SteeringVector, as_vector
else:
    from tdsteer._lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = [
    "Adapter",
    "distributed",
    "ModelDescription",
    "SiteInfo",
    "UnknownArchitectureError",
    "as_vector",
    "parse_indices",
    "Ablate",
    "ActAdd",
    "ActivationCache",
    "ActivationCacheError",
    "ActivationAddition",
    "Condition",
    "Aggregator",
    "BatchKeys",
    "Extraction",
    "LinearProbe",
    "MeanDiff",
    "PCACenter",
    "PCADiff",
    "ReadContext",
    "SiteRecorder",
    "TokenReading",
    "extract",
    "make_aggregator",
    "register_method",
    "register_reader",
    "Add",
    "AddNorm",
    "Clamp",
    "Custom",
    "Operator",
    "PositionPolicy",
    "Site",
    "SteeringVector",
    "SteeringVectorFileError",
    "SteeringHandle",
    "SteeringVectors",
    "__version__",
    "as_site",
    "as_sites",
    "register_operator",
    "steer",
    "take_indices",
]
