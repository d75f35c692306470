"""Extraction: stream contrastive batches through a model and aggregate what the sites read."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from tdhook.contexts import HookingContextFactory
from tdhook.hooks import EarlyStoppingException, HookFactory
from tdhook.modules import HookedModule
from tdhook.runtime import BoundHookProgram, HookProgramBuilder, HookSpec
from tensordict import TensorDictBase
from torch import Tensor, nn
from tqdm.auto import tqdm

from tdsteer import distributed as parallel
from tdsteer.aggregators import Aggregator, make_aggregator
from tdsteer.batches import batch_size, digest, to_device
from tdsteer.hooking import resolve
from tdsteer.keys import BatchKeys
from tdsteer.offload import device_map_device, execution_device
from tdsteer.reading import ReadContext, Reader, Reading, ReadLike, as_reader, check_read, describe_read, owned
from tdsteer.sites import Site, SiteLike, as_sites
from tdsteer.vector import SteeringVector, make_metadata


class SiteRecorder(HookingContextFactory):
    """A tdhook context that reads sites during each forward and keeps only what the reader returns.

    A reading that shares memory with the module's output (``read="all"``, a custom reader returning
    a view) is copied (:func:`tdsteer.reading.owned`), so that an in-place change later in the forward
    does not reach it; readings that reduce are kept as they are.

    Between calls, set :attr:`attention_mask` and :attr:`index` for the coming call; after it,
    :attr:`readings` maps each site key to its reading. With ``stop_early`` the forward stops once
    every site was read, so the layers after the last site never run.

    Args:
        sites: Sites to read.
        read: Read position (see :func:`tdsteer.reading.as_reader`).
        stop_early: Stop each forward after the last site was read.
    """

    def __init__(self, sites: Sequence[SiteLike], read: ReadLike | Reader = "last", *, stop_early: bool = True):
        super().__init__()
        self.sites = as_sites(sites)
        check_read(read, self.sites)  # before any forward pass
        self.reader = as_reader(read)
        self.stop_early = stop_early
        self.attention_mask: Tensor | None = None
        self.index: Tensor | None = None
        self.readings: dict[str, Reading] = {}

    def _hook_module(self, module: HookedModule) -> BoundHookProgram:
        with HookProgramBuilder() as program:
            root = program.resolve_path(module.hook_root, "", relative_path=module.relative_path)
            for site in self.sites:
                resolve(root, site)  # refuses a path that does not resolve, or a container never called
                direction = "fwd" if site.io == "output" else "fwd_pre_kwargs"
                hook = HookFactory.make_reading_hook(callback=self._callback(site), direction=direction)
                program.register_path(
                    module.hook_root, hook, HookSpec(site.path, "read", direction), relative_path=module.relative_path
                )
            return program.build()

    def _callback(self, site: Site) -> Callable[..., None]:
        total = len(self.sites)

        def callback(
            module: nn.Module, args: tuple[Any, ...], output: Any = None, kwargs: Any = None, **_: Any
        ) -> None:
            if site.io == "output":
                h = site.select(output)
            else:
                slot = site.slot or 0
                h = args[slot] if len(args) > slot else kwargs[site.kwarg or "hidden_states"]
            if not isinstance(h, Tensor):
                raise TypeError(f"Site {site.key!r} produced a {type(h).__name__}, not a tensor; set Site(slot=...)")
            x = h.detach()
            if site.layout == "NCHW":
                x = x.movedim(1, -1)
            reading = self.reader(x, ReadContext(site, self.attention_mask, self.index))
            self.readings[site.key] = owned(reading, h)  # a view of h could change later in the forward
            if self.stop_early and len(self.readings) == total:
                raise EarlyStoppingException(site.key)

        return callback

    def run(
        self, model: nn.Module, inputs: Any, attention_mask: Tensor | None, index: Tensor | None
    ) -> dict[str, Reading]:
        """Call ``model`` on ``inputs`` (inside an entered context) and return the readings."""
        self.readings = {}
        self.attention_mask, self.index = attention_mask, index
        try:
            call_model(model, inputs)
        except EarlyStoppingException:
            pass
        finally:
            self.attention_mask = self.index = None
        missing = [s.key for s in self.sites if s.key not in self.readings]
        if missing:
            raise RuntimeError(f"Sites {missing} were never executed by the forward pass; check the site paths")
        readings, self.readings = self.readings, {}
        return readings


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping of keyword arguments, ``model(inputs)`` otherwise."""
    if isinstance(inputs, TensorDictBase):
        return model(**dict(inputs.items()))
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def model_device(model: nn.Module) -> torch.device | None:
    """Where to send the model's inputs: the device it runs on.

    For a model accelerate placed or offloaded (``device_map``, ``cpu_offload``, ``dispatch_model``),
    the execution device of its hooks (:func:`tdsteer.offload.execution_device`). Else the device of
    its first parameter; when that one is on ``meta`` (offloaded), the device ``hf_device_map`` runs
    it on, else the device of its first parameter not on ``meta``. ``None`` for a model without
    parameters.

    Raises:
        ValueError: Every parameter is on ``meta`` and nothing says where the model runs.
    """
    placed = execution_device(model)  # accelerate's hooks move the inputs there anyway
    if placed is not None:
        return placed
    first = next(model.parameters(), None)
    if first is None or not first.is_meta:
        return None if first is None else first.device
    placed = device_map_device(model)
    if placed is not None:
        return placed
    for parameter in model.parameters():
        if not parameter.is_meta:
            return parameter.device
    raise ValueError(
        "Every parameter of the model is on the meta device and no accelerate hook or hf_device_map says where "
        "it runs: pass device= (where its inputs go), or load its weights (or dispatch it with accelerate) first"
    )


class Extraction:
    """Streaming extraction state: one aggregator per site, merged across shards.

    Use :func:`extract` for the common case; use this class to fold in several data sources,
    merge shards, or all-reduce across ``torch.distributed`` processes before finishing.

    Args:
        sites: Sites to read.
        method: Aggregation method (``"mean_diff"``, ``"pca_diff"``, ``"pca_center"``, ``"probe"``,
            ``"actadd"`` or a registered name / Aggregator factory).
        read: Read position (``"last"``, ``"mean"``, ``"all"``, ``"index"``, an int, a slice,
            ``"cls"``, ``"patch_mean"``, ``"spatial_mean"`` or a callable).
        keys: Names of the batch entries (:class:`~tdsteer.keys.BatchKeys`).
        method_kwargs: Passed to the aggregator (e.g. ``l2=`` for the probe).

    Examples:
        >>> import torch, tdsteer
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> batch = {"positive": torch.ones(4, 2), "negative": torch.zeros(4, 2)}
        >>> state = tdsteer.Extraction(["0"], method="mean_diff").update(model, [batch], progress=False)
        >>> state.to_vector(model)["0"].shape
        torch.Size([2])
    """

    def __init__(
        self,
        sites: SiteLike | Sequence[SiteLike],
        method: str | Callable[..., Aggregator] = "mean_diff",
        read: ReadLike | Reader = "last",
        *,
        keys: BatchKeys | None = None,
        **method_kwargs: Any,
    ) -> None:
        self.sites = as_sites(sites)
        self.method = method if isinstance(method, str) else getattr(method, "name", repr(method))
        self.read = read
        self.keys = keys or BatchKeys()
        self.aggregators = {s.key: make_aggregator(method, **method_kwargs) for s in self.sites}
        self.num_examples = 0
        self._hasher = hashlib.sha256()
        self._fingerprint: str | None = None

    def update(
        self,
        model: nn.Module,
        batches: Iterable[Mapping[str, Any]],
        *,
        progress: bool = True,
        stop_early: bool = True,
        device: torch.device | str | None = None,
        allow_empty: bool = False,
    ) -> Extraction:
        """Run ``model`` over ``batches`` and fold the readings in.

        Args:
            model: The model; site paths are relative to it.
            batches: Iterable of contrastive batches (see :class:`~tdsteer.keys.BatchKeys`).
            progress: Show a tqdm bar.
            stop_early: Stop each forward after the last site (the rest of the model is not run).
            device: Move batch tensors there first; defaults to the model's device.
            allow_empty: Accept no batches at all (one rank's empty shard of a small dataset).

        Returns:
            ``self``.
        """
        target = torch.device(device) if device is not None else model_device(model)
        recorder = SiteRecorder(self.sites, self.read, stop_early=stop_early)
        if getattr(batches, "fingerprint", None):
            self._fingerprint = str(batches.fingerprint)  # type: ignore[attr-defined]
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        seen = 0
        with torch.no_grad(), recorder.prepare(model):
            for batch in tqdm(
                batches,
                total=total,
                desc=f"extract {self.method if isinstance(self.method, str) else 'custom method'}",
                unit="batch",
                disable=not progress,
            ):
                pos, neg, pos_index, neg_index = self._unpack(batch)
                if self._fingerprint is None:
                    digest(self._hasher, pos)
                    digest(self._hasher, neg)
                pos_mask, neg_mask = self._mask(pos, "positive"), self._mask(neg, "negative")
                pos_read = recorder.run(model, to_device(pos, target), pos_mask, pos_index)
                neg_read = recorder.run(model, to_device(neg, target), neg_mask, neg_index)
                for site in self.sites:
                    self.aggregators[site.key].update(pos_read[site.key], neg_read[site.key])
                self.num_examples += batch_size(pos)
                seen += 1
        if seen == 0 and not allow_empty:
            raise ValueError("No batches to extract from: the data is empty")
        return self

    def _unpack(self, batch: Mapping[str, Any]) -> tuple[Any, Any, Tensor | None, Tensor | None]:
        if not isinstance(batch, (Mapping, TensorDictBase)):
            raise TypeError(
                f"Each batch must be a mapping with {self.keys.positive!r} and {self.keys.negative!r} entries, "
                f"got {type(batch).__name__}"
            )
        missing = [k for k in (self.keys.positive, self.keys.negative) if k not in batch]
        if missing:
            raise KeyError(
                f"Batch is missing {missing}; it has {sorted(map(str, batch.keys()))}. "
                "Rename with keys=BatchKeys().set_keys(positive=..., negative=...)"
            )
        pos, neg = batch[self.keys.positive], batch[self.keys.negative]
        pos_index = batch.get(self.keys.positive_index) if hasattr(batch, "get") else None
        neg_index = batch.get(self.keys.negative_index) if hasattr(batch, "get") else None
        if batch_size(pos) == 0 or batch_size(neg) == 0:
            raise ValueError("A batch has no positive or no negative examples")
        return pos, neg, pos_index, neg_index

    def _mask(self, inputs: Any, side: str) -> Tensor | None:
        if isinstance(inputs, Tensor):
            return None
        mask = inputs.get(self.keys.attention_mask)
        if mask is None:
            return None
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{side} rows {empty} of a batch are all padding: every example needs a real token")
        return mask

    def merge(self, other: Extraction) -> Extraction:
        """Fold in another extraction over the same sites and method (a shard of the data)."""
        if [s.key for s in other.sites] != [s.key for s in self.sites] or other.method != self.method:
            raise ValueError("Can only merge extractions over the same sites with the same method")
        for key, aggregator in self.aggregators.items():
            aggregator.merge(other.aggregators[key])
        self.num_examples += other.num_examples
        self._hasher.update(other.fingerprint.encode())
        return self

    def all_reduce(self, group: Any = None) -> Extraction:
        """Combine the states of every ``torch.distributed`` process (each saw one shard)."""
        for aggregator in self.aggregators.values():
            aggregator.all_reduce(group)
        shards: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(shards, (self.num_examples, self.fingerprint), group=group)
        self.num_examples = sum(n for n, _ in shards)
        self._fingerprint = hashlib.sha256("".join(sorted(f for _, f in shards)).encode()).hexdigest()
        return self

    @property
    def fingerprint(self) -> str:
        """sha256 of the data (the batches' own ``fingerprint`` when they carry one)."""
        return self._fingerprint or self._hasher.hexdigest()

    def to_vector(self, model: nn.Module | None = None, *, model_name: str | None = None) -> SteeringVector:
        """Finish: one direction per site, with metadata."""
        directions = {key: agg.result().cpu() for key, agg in self.aggregators.items()}
        flat = [key for key, direction in directions.items() if not bool(direction.any())]
        if flat:
            warnings.warn(
                f"The {self.method} direction is all zeros at {', '.join(flat)}: the positive and negative examples "
                "read the same there (no contrast). Check that the pairs differ, and that the read position "
                "(read=...) lands where they do.",
                UserWarning,
                stacklevel=3,
            )
        metadata = make_metadata(
            model,
            directions,
            method=self.method,
            read=describe_read(self.read),
            fingerprint=self.fingerprint,
            num_examples=self.num_examples,
            model_name=model_name,
        )
        return SteeringVector(directions, {s.key: s for s in self.sites}, metadata)


def extract(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: SiteLike | Sequence[SiteLike],
    *,
    method: str | Callable[..., Aggregator] = "mean_diff",
    read: ReadLike | Reader = "last",
    keys: BatchKeys | None = None,
    progress: bool = True,
    stop_early: bool = True,
    device: torch.device | str | None = None,
    model_name: str | None = None,
    group: Any = None,
    distributed: bool | None = None,
    **method_kwargs: Any,
) -> SteeringVector:
    """Compute a steering vector from contrastive batches, streaming.

    Args:
        model: The model; site paths are relative to it.
        batches: Iterable of batches ``{"positive": inputs, "negative": inputs}``, each inputs a
            tensor (``model(x)``) or a mapping of keyword arguments (``model(**x)``, its
            ``attention_mask`` used by token reads); optional ``positive_index`` /
            ``negative_index`` ``[B]`` for ``read="index"``. Positive and negative lengths may differ.
        sites: Sites (or module paths) to read.
        method: ``"mean_diff"`` (CAA), ``"pca_diff"``, ``"pca_center"``, ``"probe"``, ``"actadd"``.
        read: ``"last"``, ``"mean"``, ``"all"``, ``"index"``, an int (real-token index, negatives
            from the last real token), a slice, ``"cls"``, ``"patch_mean"``, ``"spatial_mean"``,
            or a callable ``fn(h, ctx)``.
        keys: Names of the batch entries.
        progress: Show a tqdm bar.
        stop_early: Stop each forward after the last site.
        device: Where to move batch tensors (default: the model's device).
        model_name: Name recorded in the metadata (default: ``config.name_or_path``).
        group: ``torch.distributed`` group for ``distributed=True``.
        distributed: All-reduce the state across processes before finishing (each process passes
            its own shard of the data, e.g. :func:`tdsteer.distributed.shard` of the pairs; a shard
            may be empty). ``None`` (default): when a process group of several processes is
            initialised (``torchrun``). Only rank 0 shows a progress bar, and a failure on any rank
            fails every rank with the same :class:`tdsteer.distributed.RankError`.
        method_kwargs: Passed to the aggregator.

    Returns:
        A :class:`~tdsteer.SteeringVector` with one direction per site.

    Examples:
        >>> import torch, tdsteer
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> batch = {"positive": torch.ones(2, 3), "negative": torch.zeros(2, 3)}
        >>> tdsteer.extract(model, [batch], ["0"], progress=False)["0"].tolist()
        [1.0, 1.0, 1.0]
    """
    state = Extraction(sites, method, read, keys=keys, **method_kwargs)
    if distributed is None:
        distributed = parallel.active(group)
    if not distributed:
        state.update(model, batches, progress=progress, stop_early=stop_early, device=device)
        return state.to_vector(model, model_name=model_name)
    failure: BaseException | None = None
    try:
        state.update(
            model,
            batches,
            progress=progress and parallel.is_main(group),
            stop_early=stop_early,
            device=device,
            allow_empty=True,
        )
    except Exception as error:  # noqa: BLE001 - shared with every rank below, then raised on all of them
        failure = error
    parallel.agree(failure, group)
    state.all_reduce(group)
    if state.num_examples == 0:
        raise ValueError("No batches to extract from: every rank's shard of the data is empty")
    return state.to_vector(model, model_name=model_name)
