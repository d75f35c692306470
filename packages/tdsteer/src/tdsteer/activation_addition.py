"""``ActivationAddition``: tdhook-style, TensorDict in and out, on the streaming extraction machinery."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tdhook.contexts import HookingContextFactory
from tdhook.hooks import EarlyStoppingException
from tdhook.modules import HookedModule
from tdhook.runtime import BoundHookProgram
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from tdsteer.aggregators import Aggregator
from tdsteer.extraction import Extraction, SiteRecorder
from tdsteer.reading import Reader, Reading, ReadLike
from tdsteer.sites import SiteLike
from tdsteer.vector import SteeringVector


class ActivationAddition(HookingContextFactory):
    """Compute steering vectors from TensorDicts of positive and negative inputs (tdhook 0.3 shape).

    Each call of the hooked module with a TensorDict holding ``positive_key`` and ``negative_key``
    sub-TensorDicts runs both, reads every site at ``read`` through the attention mask (when the
    inputs carry one), folds the readings into streaming aggregators, and returns
    ``{steer_key: {site: vector}}`` for all data seen so far in this context (each context starts
    from no data; :meth:`vector` gives the last one's after it closes). Unlike tdhook's own
    version it does not keep activations, reads positions through masks instead of averaging
    padding, and accepts positive and negative inputs of different lengths.

    Args:
        modules_to_steer: Sites (or module paths) to compute vectors for.
        positive_key: Entry holding the positive inputs.
        negative_key: Entry holding the negative inputs.
        steer_key: Entry the vectors are written under.
        method: Aggregation method (see :func:`tdsteer.extract`).
        read: Read position (see :func:`tdsteer.extract`).
        mask_key: Entry, inside each inputs TensorDict, holding the attention mask.
        method_kwargs: Passed to the aggregator.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tdsteer import ActivationAddition
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> td = TensorDict({"positive": {"input": torch.ones(2, 3)}, "negative": {"input": torch.zeros(2, 3)}}, [2])
        >>> with ActivationAddition(["0"]).prepare(model) as hooked:
        ...     out = hooked(td)
        >>> out["steer", "0"].tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        modules_to_steer: Sequence[SiteLike],
        positive_key: NestedKey = "positive",
        negative_key: NestedKey = "negative",
        steer_key: NestedKey = "steer",
        *,
        method: str | Callable[..., Aggregator] = "mean_diff",
        read: ReadLike | Reader = "last",
        mask_key: NestedKey = "attention_mask",
        **method_kwargs: Any,
    ) -> None:
        super().__init__()
        self.positive_key = positive_key
        self.negative_key = negative_key
        self.steer_key = steer_key
        self.mask_key = mask_key
        self._method = (method, read, method_kwargs)
        self.extraction = Extraction(modules_to_steer, method, read, **method_kwargs)
        self.recorder = SiteRecorder(self.extraction.sites, read, stop_early=True)

    def _prepare_module(
        self,
        module: TensorDictModuleBase,
        in_keys: list[NestedKey],
        out_keys: list[NestedKey],
        extra_relative_path: str,
    ) -> TensorDictModuleBase:
        method, read, method_kwargs = self._method
        # a new context starts from no data (the vector of the previous one stays readable until now)
        self.extraction = Extraction(self.extraction.sites, method, read, **method_kwargs)
        return _ContrastiveRun(module, self)

    def _hook_module(self, module: HookedModule) -> BoundHookProgram:
        return self.recorder._hook_module(module)

    def vector(self, model: Any = None) -> SteeringVector:
        """The vector over all data seen so far in the current (or last) context, with metadata."""
        return self.extraction.to_vector(model)


class _ContrastiveRun(TensorDictModuleBase):
    def __init__(self, module: TensorDictModuleBase, owner: ActivationAddition) -> None:
        super().__init__()
        self.module = module
        self.owner = owner
        self.in_keys: list[Any] = [(owner.positive_key, k) for k in module.in_keys] + [
            (owner.negative_key, k) for k in module.in_keys
        ]
        self.out_keys: list[Any] = [(owner.steer_key, s.key) for s in owner.extraction.sites]

    def _read(self, inputs: TensorDictBase) -> dict[str, Reading]:
        recorder = self.owner.recorder
        mask = inputs.get(self.owner.mask_key, None)
        recorder.readings = {}
        recorder.attention_mask = mask
        try:
            self.module(inputs.clone(recurse=False))
        except EarlyStoppingException:
            pass
        finally:
            recorder.attention_mask = None
        readings, recorder.readings = recorder.readings, {}
        missing = [s.key for s in self.owner.extraction.sites if s.key not in readings]
        if missing:
            raise RuntimeError(f"Sites {missing} were never executed by the forward pass; check the site paths")
        return readings

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        owner = self.owner
        positive, negative = td.get(owner.positive_key), td.get(owner.negative_key)
        pos_read, neg_read = self._read(positive), self._read(negative)
        extraction = owner.extraction
        for site in extraction.sites:
            extraction.aggregators[site.key].update(pos_read[site.key], neg_read[site.key])
        extraction.num_examples += int(positive.batch_size[0]) if positive.batch_size else 1
        vectors = {key: agg.result() for key, agg in extraction.aggregators.items()}
        return TensorDict({owner.steer_key: vectors}, batch_size=[])
