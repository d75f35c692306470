"""tdsteer-timm: steering sites for timm vision models.

Examples:
    >>> import timm, tdsteer_timm
    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> [s.path for s in tdsteer_timm.sites(model, -1, level="stage")]
    ['layer4']
"""

from tdsteer_timm import families as _families  # noqa: F401  (registers the built-in architectures)
from tdsteer_timm._version import __version__
from tdsteer_timm.arch import ArchInfo, ArchSpec, SiteInfo, describe, register_arch, supported_classes
from tdsteer_timm.data import ImageBatches, image_batches
from tdsteer_timm.sites import num_layers, sites

__all__ = [
    "ArchInfo",
    "ArchSpec",
    "ImageBatches",
    "SiteInfo",
    "__version__",
    "describe",
    "image_batches",
    "num_layers",
    "register_arch",
    "sites",
    "supported_classes",
]
