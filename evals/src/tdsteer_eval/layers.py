"""Which layer steers best: one vector per layer from one pass over the data, each swept over scales.

Every layer's activations on the contrastive pairs are recorded once into a
:class:`tdsteer.ActivationCache` (one forward pass over the data, whatever the number of layers); a
vector per layer is fitted from the cache without the model (:func:`layer_vectors`), and each is
evaluated at every scale (:func:`tdsteer_eval.run_sweep`). The report shows mean propensity as a
layer x scale heatmap, the steerability of each layer, and the best layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from torch import nn

from tdsteer import ActivationCache, SteeringVector
from tdsteer import distributed as parallel
from tdsteer.sites import SiteLike, as_site
from tdsteer_eval.results import CACHE_FOLDER, check_output
from tdsteer_eval.runner import EvalOptions, run_sweep


def record_layers(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: Sequence[SiteLike],
    *,
    read: str = "last",
    path: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> ActivationCache:
    """Record what every site reads on the contrastive batches, in one pass over the data.

    Args:
        model: The model.
        batches: Contrastive batches (``tdsteer_hf.contrastive_batches``); re-iterable to resume.
        sites: The sites of every layer to compare.
        read: The read position (``"last"``, ``"answer"``, ``"mean"``...).
        path: A folder to keep the cache in (a recording there resumes); ``None``: in memory. Under
            a launcher (``accelerate launch``, ``torchrun``) each rank records its share of the
            batches into that folder, and every rank reads back all of them.
        progress: Show a progress bar.

    Returns:
        The cache: one row per example and a column per site.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        >>> cache = record_layers(model, [{"positive": torch.randn(4, 3), "negative": torch.randn(4, 3)}], ["0", "1"])
        >>> sorted(layer_vectors(cache, ["0", "1"])["1"].directions)
        ['1']
    """
    if not parallel.active():
        return ActivationCache.record(model, batches, list(sites), read=read, path=path, progress=progress)
    if path is None:  # in memory under a launcher: every rank records every batch for itself
        return ActivationCache.record(model, batches, list(sites), read=read, progress=progress, distributed=False)
    # one folder for all ranks: each records its share of the batches, read back as one cache
    mine = parallel.shard(list(batches))
    return ActivationCache.record(
        model, mine, list(sites), read=read, path=path, progress=progress and parallel.is_main()
    )


def layer_vectors(
    cache: ActivationCache, sites: Sequence[SiteLike], method: str = "mean_diff", **method_kwargs: Any
) -> dict[str, SteeringVector]:
    """One steering vector per site, fitted from the cache alone (no model run).

    Args:
        cache: What :func:`record_layers` recorded.
        sites: The recorded sites to fit a vector at.
        method: ``"mean_diff"``, ``"pca_diff"``, ``"pca_center"``, ``"probe"``...
        **method_kwargs: Passed to the method.

    Returns:
        Site key -> a one-site vector, in the order of ``sites``.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        >>> batches = [{"positive": torch.randn(4, 3) + 1, "negative": torch.randn(4, 3)}]
        >>> cache = record_layers(model, batches, ["0", "1"])
        >>> list(layer_vectors(cache, ["0", "1"]))
        ['0', '1']
    """
    return {as_site(site).key: cache.to_vector(method, sites=[site], **method_kwargs) for site in sites}


def layer_sweep(
    lm: Any,
    batches: Iterable[Mapping[str, Any]],
    sites: Sequence[SiteLike],
    tasks: Sequence[str],
    scales: Sequence[float],
    output: str | os.PathLike[str],
    *,
    manager: TaskManager,
    method: str = "mean_diff",
    read: str = "last",
    options: EvalOptions | None = None,
    provenance: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Record the layers once, fit a vector per layer, and sweep each over ``scales``.

    Args:
        lm: A :class:`~tdsteer_eval.SteeredLM` of the model (its vector is replaced per layer and
            restored).
        batches: Contrastive batches of the model's tokenizer.
        sites: One site per layer to compare.
        tasks: lm-eval tasks (pairwise tasks give the steerability).
        scales: The scales.
        output: The results folder; the activation cache is kept in its ``activations/`` folder,
            so that a rerun resumes the recording and the sweep.
        manager: A task manager that knows ``tasks``.
        method: How each layer's vector is fitted.
        read: The read position of the recording.
        options: How lm-eval runs.
        provenance: Entries added to the recorded provenance (the data file...).
        progress: Called with one line per finished run.

    Returns:
        What ``results.json`` holds; ``summary["best_layer"]`` is the layer with the highest
        steerability.

    Examples:
        >>> batches = tdsteer_hf.contrastive_batches(lm.tokenizer, "refusal_ab.json")  # doctest: +SKIP
        >>> sites = tdsteer_hf.sites(lm.model)  # every layer  # doctest: +SKIP
        >>> data = layer_sweep(lm, batches, sites, ["tdsteer_caa_ab"], [-4, 0, 4], "runs/layers",
        ...                    manager=task_manager(["tdsteer_caa_ab"]))  # doctest: +SKIP
        >>> data["summary"]["best_layer"]  # doctest: +SKIP
        {'layer': 'model.layers.13', 'steerability': 0.42}
    """
    folder = check_output(output)
    cache = record_layers(lm.model, batches, sites, read=read, path=folder / CACHE_FOLDER)
    vectors = layer_vectors(cache, sites, method)
    recorded: dict[str, Any] = {
        "vector": {"method": method, "read": read, "data_fingerprint": getattr(batches, "fingerprint", None)},
        "sites": list(vectors),
        "layers": list(vectors),
        **(provenance or {}),
    }
    if progress is not None:
        progress(f"recorded {len(vectors)} layers in one pass over the data; fitted one {method} vector per layer")
    return run_sweep(
        lm,
        tasks,
        scales,
        Path(output),
        manager=manager,
        options=options,
        layers=vectors,
        provenance=recorded,
        progress=progress,
    )
