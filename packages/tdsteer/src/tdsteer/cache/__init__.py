"""``ActivationCache``: what sites read over a whole dataset, recorded once, in memory or on disk.

A cache holds one row per example and site: the reading at the chosen read position (the same
readers as extraction), stored as float32, bfloat16 or float16. A contrastive batch of ``B`` pairs
adds ``2B`` rows, the positive then the negative of each pair (labels 1 and 0, the same ``pair``
id); a labelled batch (``{"inputs": ..., "labels": [B]}``) adds ``B`` rows with class labels.

On disk the rows live in chunk folders of raw column files, preallocated when the number of
examples is known and grown a chunk at a time when not, each column with a CRC-32 checked when the
cache is read. ``progress.json`` is replaced atomically after every checkpoint and claims only
rows already on disk, so a recording killed at any point resumes where it stopped, and a write is
never half-visible. A resume is checked by example (the same data in the same order, at any batch
size, and the same model weights) or refused; one process at a time records into a folder.
Fitting (``to_vector``) streams over the rows with the same aggregators as extraction,
accumulating in float64.

Modules: :mod:`~tdsteer.cache.files` (the header, progress and lock files),
:mod:`~tdsteer.cache.storage` (chunks, columns, checksums, disk space),
:mod:`~tdsteer.cache.fingerprint` (the data order and the weights a resume is checked against),
:mod:`~tdsteer.cache.recording` (running a model and appending its readings),
:mod:`~tdsteer.cache.manifest` and :mod:`~tdsteer.cache.ranks` (one cache recorded by several
``torch.distributed`` ranks, one cache folder per rank under a manifest, read as one) and
:mod:`~tdsteer.cache.reading` (the :class:`ActivationCache` read API and fitting).
"""

from tdsteer.cache.files import DTYPES, FORMAT, FORMAT_VERSION, ROW_FIELDS
from tdsteer.cache.reading import ActivationCache, auroc
from tdsteer.errors import ActivationCacheError

__all__ = ["DTYPES", "FORMAT", "FORMAT_VERSION", "ROW_FIELDS", "ActivationCache", "ActivationCacheError", "auroc"]
