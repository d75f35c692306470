"""tdsteer_hf: Hugging Face transformers adapter for tdsteer.

Turns "layer 6, residual stream" into :class:`tdsteer.Site` records for any registered (or
detectable) transformers architecture, and text data into the contrastive batches that
``tdsteer.extract`` reads.

Examples:
    >>> import tdsteer_hf
    >>> "llama" in tdsteer_hf.supported_model_types()
    True
"""

from tdsteer_hf._version import __version__
from tdsteer_hf.architectures import (
    SITE_KINDS,
    Architecture,
    ModelLayout,
    architecture,
    architecture_for,
    register_architecture,
    resolve,
    supported_model_types,
)
from tdsteer_hf.data import CAA_SEPARATOR, ContrastiveBatches, contrastive_batches, load_caa_json
from tdsteer_hf.sites import describe, num_layers, sites

__all__ = [
    "CAA_SEPARATOR",
    "SITE_KINDS",
    "Architecture",
    "ContrastiveBatches",
    "ModelLayout",
    "__version__",
    "architecture",
    "architecture_for",
    "contrastive_batches",
    "describe",
    "load_caa_json",
    "num_layers",
    "register_architecture",
    "resolve",
    "sites",
    "supported_model_types",
]
