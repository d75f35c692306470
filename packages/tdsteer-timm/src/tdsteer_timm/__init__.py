"""tdsteer-timm: steering sites for timm vision models, meeting the adapter contract of
:mod:`tdsteer.adapter` (the same names and meanings as ``tdsteer_hf``).

Examples:
    >>> import timm, tdsteer_timm
    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> [s.path for s in tdsteer_timm.sites(model, -1, kind="stage")]
    ['layer4']
    >>> tdsteer_timm.sites(model, 0, kind="stage")[0].path  # timm's forward_intermediates index 0: the stem
    'act1'
"""

from tdsteer_timm import families as _families  # noqa: F401  (registers the built-in architectures)
from tdsteer_timm._version import __version__
from tdsteer_timm.arch import (
    DEFAULT_KIND,
    SITE_KINDS,
    ArchSpec,
    architecture_for,
    register_architecture,
    supported,
)
from tdsteer_timm.data import ImageBatches, contrastive_batches
from tdsteer_timm.description import describe
from tdsteer_timm.sites import num_layers, sites
from tdsteer_timm.vectors import check_vector

__all__ = [
    "DEFAULT_KIND",
    "SITE_KINDS",
    "ArchSpec",
    "ImageBatches",
    "__version__",
    "architecture_for",
    "check_vector",
    "contrastive_batches",
    "describe",
    "num_layers",
    "register_architecture",
    "sites",
    "supported",
]
