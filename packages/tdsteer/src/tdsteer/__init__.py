"""tdsteer: activation steering for PyTorch models on tdhook and tensordict."""

from tdsteer._version import __version__
from tdsteer.indices import take_indices
from tdsteer.operators import Ablate, Add, AddNorm, Clamp, Custom, Operator, register_operator
from tdsteer.positions import PositionPolicy
from tdsteer.sites import Site, as_site, as_sites
from tdsteer.steering import SteeringVectors, steer
from tdsteer.vector import SteeringVector, SteeringVectorFileError

__all__ = [
    "Ablate",
    "Add",
    "AddNorm",
    "Clamp",
    "Custom",
    "Operator",
    "PositionPolicy",
    "Site",
    "SteeringVector",
    "SteeringVectorFileError",
    "SteeringVectors",
    "__version__",
    "as_site",
    "as_sites",
    "register_operator",
    "steer",
    "take_indices",
]
