"""tdsteer_hf: Hugging Face transformers adapter for tdsteer.

Turns "layer 6, residual stream" into :class:`tdsteer.Site` records for any registered (or
detectable) transformers architecture, and text data into the contrastive batches that
``tdsteer.extract`` reads. It meets the adapter contract of :mod:`tdsteer.adapter`, with the same
names and meanings as ``tdsteer_timm``.

Examples:
    >>> import tdsteer, tdsteer_hf
    >>> "llama" in tdsteer_hf.supported()
    True
    >>> isinstance(tdsteer_hf, tdsteer.Adapter)
    True
"""

from tdsteer_hf._version import __version__
from tdsteer_hf.architectures import (
    DEFAULT_KIND,
    SITE_KINDS,
    Architecture,
    architecture,
    architecture_for,
    register_architecture,
    supported,
)
from tdsteer_hf.data import CAA_SEPARATOR, ContrastiveBatches, contrastive_batches, load_caa_json
from tdsteer_hf.model_inputs import TextTooLongError
from tdsteer_hf.pair_files import read_pairs
from tdsteer_hf.resolution import ModelLayout, resolve
from tdsteer_hf.sites import describe, num_layers, sites

__all__ = [
    "CAA_SEPARATOR",
    "DEFAULT_KIND",
    "SITE_KINDS",
    "Architecture",
    "ContrastiveBatches",
    "ModelLayout",
    "TextTooLongError",
    "__version__",
    "architecture",
    "architecture_for",
    "contrastive_batches",
    "describe",
    "load_caa_json",
    "num_layers",
    "read_pairs",
    "register_architecture",
    "resolve",
    "sites",
    "supported",
]
