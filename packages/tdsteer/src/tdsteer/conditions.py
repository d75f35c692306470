"""Conditional steering (CAST, Lee et al. 2024): steer only the rows whose prompt matches a condition.

A :class:`Condition` holds one site, a direction there and a threshold. While a steering context
with a condition is open, the first call of each sequence (the prompt pass of ``generate``, or a
plain call that starts at position 0) reads the condition site for every row (the mean over its real
tokens, or its last real token; with per-row starts, ``handle.set(starts=...)``, only the tokens up
to each row's start: a scored request's context), scores the reading by its cosine similarity with
the direction, and decides that row's gate: steered when the score is above the threshold (below,
with ``above=False``). The calls that continue a sequence (decoding steps, with or without a KV
cache) keep the gate. Each row has its own gate, so one batch mixes steered and unsteered rows, and
nothing is read back to the host (:mod:`tdsteer.gating` holds that run-time side).

In the call that reads the prompt, sites that run before the condition site are not steered (the
gate is not decided yet); steer sites after it, or use ``positions="generated"``, which leaves the
prompt alone, for the same result with and without a KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tdsteer.aggregators import Aggregator
from tdsteer.extraction import extract
from tdsteer.keys import BatchKeys
from tdsteer.reading import READERS, ReadContext, Reading, TokenReading, check_read
from tdsteer.sites import SiteLike, as_site
from tdsteer.vector import SteeringVector

#: The metadata entry of a condition file that holds its rule.
CONDITION_KEY = "condition"
CPU = torch.device("cpu")


class Condition:
    """When to steer: rows whose prompt reading at ``site`` has a cosine similarity with a direction
    above (or below) a threshold.

    Args:
        vector: The condition direction: a :class:`~tdsteer.SteeringVector` or ``{site: tensor}``
            with exactly one site (``vector.select([site])`` picks one), a ``[C]`` direction there.
        threshold: The cosine similarity (``-1`` to ``1``) that separates the rows.
        above: Steer the rows scoring above ``threshold`` (``False``: below it).
        read: How a prompt is read at the site: ``"mean"`` (over the real tokens), ``"last"`` (the
            last real token) or another one-row-per-example reader (:mod:`tdsteer.reading`).

    Raises:
        ValueError: Not exactly one site, a direction that is not ``[C]``, zero or not finite, a
            threshold that is not finite, or a read that gives no single row per example.

    Examples:
        >>> import torch
        >>> condition = Condition({"0": torch.tensor([1.0, 0.0])}, threshold=0.5)
        >>> condition.score(torch.tensor([[[3.0, 1.0]], [[0.0, 2.0]]]), None)
        tensor([0.9487, 0.0000])
        >>> condition.met(condition.score(torch.tensor([[[3.0, 1.0]], [[0.0, 2.0]]]), None)).tolist()
        [True, False]
    """

    def __init__(
        self,
        vector: SteeringVector | Mapping[Any, Tensor],
        threshold: float,
        *,
        above: bool = True,
        read: str = "mean",
    ) -> None:
        metadata: dict[str, Any] = {}
        if isinstance(vector, SteeringVector):
            items = [(vector.sites[key], tensor) for key, tensor in vector.directions.items()]
            metadata = {k: v for k, v in vector.metadata.items() if k != CONDITION_KEY}
        elif isinstance(vector, Mapping):
            items = [(as_site(key), tensor) for key, tensor in vector.items()]
        else:
            raise TypeError(f"vector must be a SteeringVector or {{site: tensor}}, got {type(vector).__name__}")
        if len(items) != 1:
            keys = [site.key for site, _ in items]
            raise ValueError(
                f"A Condition reads one site, got {len(items)} ({keys}); pick one with vector.select([site])"
            )
        site, direction = items[0]
        if site.io != "output":
            raise ValueError(
                f"A condition reads a module's output, but site {site.key!r} is a module's input; use the output "
                "site of the module before it (tdsteer_hf.sites(..., kind='resid_post'))"
            )
        if not isinstance(direction, Tensor) or direction.ndim != 1:
            raise ValueError(f"The condition direction at {site.key!r} must be a [C] tensor, got {direction!r:.60}")
        if not bool(torch.isfinite(direction).all()) or not bool(direction.abs().sum() > 0):
            raise ValueError(f"The condition direction at {site.key!r} is zero or not finite")
        threshold = float(threshold)
        if not torch.isfinite(torch.tensor(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold}")
        if read not in READERS or read in ("all", "index", "answer"):
            one_row = sorted(set(READERS) - {"all", "index", "answer"})
            raise ValueError(f"read={read!r} for a Condition: use one of {', '.join(one_row)}")
        check_read(read, [site])
        self.site = site
        self.direction = direction.detach()
        self.threshold = threshold
        self.above = above
        self.read = read
        #: Balanced accuracy on the data :meth:`fit` chose the threshold on (``None`` otherwise).
        self.accuracy: float | None = None
        #: Where the direction came from (a :class:`~tdsteer.SteeringVector`'s metadata: model, data...).
        self.metadata = metadata
        #: :meth:`fit` with several sites: the balanced accuracy at each.
        self.accuracies: dict[str, float] = {}
        self._unit: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        side = ">" if self.above else "<"
        return f"Condition({self.site.key!r}, cosine {side} {self.threshold:.4g}, read={self.read!r})"

    def __invert__(self) -> Condition:
        """The converse (``~condition``): met by the rows this one does not meet (the same direction,
        threshold and read, the other side; a later change of this one's threshold does not follow);
        with nested contexts, "if c then v1 else v2".

        Examples:
            >>> import torch
            >>> c = Condition({"h.0": torch.ones(2)}, threshold=0.2)
            >>> ~c
            Condition('h.0', cosine < 0.2, read='mean')
            >>> bool((c.met(torch.tensor([0.5, 0.1])) ^ (~c).met(torch.tensor([0.5, 0.1]))).all())
            True
        """
        converse = Condition({self.site.key: self.direction}, self.threshold, above=not self.above, read=self.read)
        converse.site, converse.metadata = self.site, dict(self.metadata)
        return converse

    def to_vector(self) -> SteeringVector:
        """The direction as a one-site :class:`~tdsteer.SteeringVector` whose metadata holds the
        threshold, the side and the read under ``"condition"``."""
        rule = {"threshold": self.threshold, "above": self.above, "read": self.read, "accuracy": self.accuracy}
        return SteeringVector(
            {self.site.key: self.direction},
            sites={self.site.key: self.site},
            metadata={**self.metadata, CONDITION_KEY: rule},
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the condition to a safetensors file (a steering-vector file, :meth:`to_vector`).

        Examples:
            >>> import tempfile, torch
            >>> condition = Condition({"blocks.2": torch.ones(4)}, threshold=0.25, read="last")
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     Condition.load(condition.save(f"{folder}/c.safetensors"))
            Condition('blocks.2', cosine > 0.25, read='last')
        """
        return self.to_vector().save(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Condition:
        """Read a condition that :meth:`save` wrote.

        Raises:
            SteeringVectorFileError: No such file, or a damaged one.
            ValueError: A steering-vector file that holds no condition.
        """
        vector = SteeringVector.load(path, device=device)
        rule = vector.metadata.get(CONDITION_KEY)
        if not isinstance(rule, dict) or not isinstance(rule.get("threshold"), (int, float)):
            raise ValueError(
                f"{str(path)!r} is a steering-vector file without a condition (no 'condition' threshold in its "
                "metadata): fit one with `tdsteer extract --condition` or Condition.fit(...).save(path), or build "
                "one from a direction: tdsteer.Condition(vector, threshold)"
            )
        condition = cls(vector, rule["threshold"], above=bool(rule.get("above", True)), read=str(rule.get("read")))
        accuracy = rule.get("accuracy")
        condition.accuracy = float(accuracy) if isinstance(accuracy, (int, float)) else None
        return condition

    def score(self, h: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Each row's cosine similarity ``[B]`` (float32) with the direction.

        Args:
            h: The site's activation, channel-last (``[B, L, C]`` for tokens).
            attention_mask: ``[B, L]`` real tokens, or ``None`` (all real).
        """
        channels = self.direction.shape[0]
        if h.shape[-1] != channels:
            raise ValueError(
                f"The condition at site {self.site.key!r} has hidden size {channels}, but the activation has "
                f"{h.shape[-1]} channels (shape {tuple(h.shape)}): it was made for another model or another site"
            )
        reading = READERS[self.read](h, ReadContext(self.site, attention_mask))
        if isinstance(reading, TokenReading):  # a registered reader that keeps every token
            raise ValueError(f"read={self.read!r} gives every token; a Condition needs one row per example")
        return cosine(reading, self._unit_on(reading.device))

    def met(self, scores: Tensor) -> Tensor:
        """Which rows the scores select: ``[B]`` bool."""
        return scores > self.threshold if self.above else scores < self.threshold

    def _unit_on(self, device: torch.device) -> Tensor:
        unit = self._unit.get(device)
        if unit is None:
            direction = self.direction.to(device, torch.float32)
            unit = self._unit[device] = direction / direction.norm()
        return unit

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        batches: Iterable[Mapping[str, Any]],
        sites: SiteLike | Sequence[SiteLike],
        *,
        read: str = "mean",
        keys: BatchKeys | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ) -> Condition:
        """Learn a condition from prompts that should trigger it and prompts that should not.

        At each site, the direction is the mean difference of the two sets' readings (as
        ``tdsteer.extract(method="mean_diff")``), and the threshold the cosine similarity that best
        separates them (the highest balanced accuracy). With several sites, the one that separates
        best wins (the earliest among equals); :attr:`accuracies` has every site's. One pass over
        the data, all sites read in it; the readings are kept (one row per prompt and site).

        Args:
            model: The model.
            batches: ``{"positive": inputs, "negative": inputs}`` batches as for
                :func:`tdsteer.extract`: positive prompts match the condition, negative ones do not.
            sites: The condition site, or the candidate sites.
            read: How each prompt is read (see :class:`Condition`).
            keys: Names of the batch entries.
            progress: Show a tqdm bar.
            device: Where to move batch tensors (default: the model's device).

        Returns:
            The fitted :class:`Condition` (steering rows scoring above the threshold), its balanced
            accuracy on this data in :attr:`accuracy`.

        Raises:
            ValueError: No data, or one of the two sets empty.

        Examples:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Identity())
            >>> batches = [{"positive": torch.tensor([[[2.0, 0.1]], [[1.5, -0.2]]]),
            ...             "negative": torch.tensor([[[-1.0, 0.3]], [[-2.0, 0.0]]])}]
            >>> condition = Condition.fit(model, batches, "0", read="last", progress=False)
            >>> condition.accuracy
            1.0
        """
        vector, kept = _read_prompts(model, batches, sites, read, keys=keys, progress=progress, device=device)
        vector.metadata["method"] = "mean_diff"
        fitted = []
        for key, rows in zip(vector.keys(), kept, strict=True):
            condition = cls(vector.select([key]), 0.0, read=read)
            condition.threshold, condition.accuracy = best_threshold(*rows.scores(condition._unit_on(CPU)))
            fitted.append(condition)
        best = max(fitted, key=lambda c: c.accuracy or 0.0)  # max keeps the first of equals
        best.accuracies = {c.site.key: c.accuracy or 0.0 for c in fitted}
        return best

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Mapping[str, Any]],
        *,
        keys: BatchKeys | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ) -> float:
        """Balanced accuracy of this condition on other data (held-out prompts), as :meth:`fit` measures it.

        Args:
            model: The model.
            batches: ``{"positive": inputs, "negative": inputs}`` batches: positive prompts should meet
                the condition, negative ones should not.
            keys: Names of the batch entries.
            progress: Show a tqdm bar.
            device: Where to move batch tensors (default: the model's device).

        Returns:
            The mean of the share of positive prompts that meet it and of negative ones that do not.

        Examples:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Identity())
            >>> condition = Condition({"0": torch.tensor([1.0, 0.0])}, threshold=0.0, read="last")
            >>> batches = [{"positive": torch.tensor([[[2.0, 0.1]], [[-1.5, 0.2]]]),
            ...             "negative": torch.tensor([[[-1.0, 0.3]], [[-2.0, 0.0]]])}]
            >>> condition.evaluate(model, batches, progress=False)  # one of two positives, both negatives
            0.75
        """
        _, (rows,) = _read_prompts(model, batches, [self.site], self.read, keys=keys, progress=progress, device=device)
        positive, negative = (self.met(scores) for scores in rows.scores(self._unit_on(CPU)))
        return float((positive.float().mean() + (~negative).float().mean()) / 2)


def _read_prompts(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: SiteLike | Sequence[SiteLike],
    read: str,
    **options: Any,
) -> tuple[SteeringVector, list[_KeepRows]]:
    """One pass of :func:`tdsteer.extract` that keeps every prompt's reading: the mean-difference
    vector, and the readings of each site in site order."""
    kept: list[_KeepRows] = []

    def keep_rows() -> _KeepRows:  # extract makes one aggregator per site, in site order
        kept.append(_KeepRows())
        return kept[-1]

    vector = extract(model, batches, sites, method=keep_rows, read=read, distributed=False, **options)
    return vector, kept


def cosine(rows: Tensor, unit: Tensor) -> Tensor:
    """Cosine similarity ``[B]`` (float32) of each row of ``rows`` ``[B, C]`` with a unit vector."""
    rows = rows.float()
    return (rows @ unit) / rows.norm(dim=-1).clamp_min(1e-12)


def best_threshold(positive: Tensor, negative: Tensor) -> tuple[float, float]:
    """The threshold that best separates ``positive`` scores (above) from ``negative`` ones (below).

    Returns:
        ``(threshold, balanced accuracy)``; the threshold lies halfway between two neighbouring
        scores.

    Raises:
        ValueError: One of the sets is empty.

    Examples:
        >>> threshold, accuracy = best_threshold(torch.tensor([0.9, 0.8, 0.2]), torch.tensor([0.1, 0.3]))
        >>> round(threshold, 3), round(accuracy, 3)  # 2 of 3 matching prompts above 0.55, both others below
        (0.55, 0.833)
    """
    if positive.numel() == 0 or negative.numel() == 0:
        raise ValueError("Fitting a condition needs prompts that match it and prompts that do not; one set is empty")
    scores = torch.cat([positive, negative]).sort().values
    candidates = torch.cat([scores[:1] - 1e-3, (scores[1:] + scores[:-1]) / 2, scores[-1:] + 1e-3])
    positive, negative = positive.sort().values, negative.sort().values
    hits = positive.numel() - torch.searchsorted(positive, candidates, right=True)
    rejections = torch.searchsorted(negative, candidates, right=True)
    accuracy = (hits / positive.numel() + rejections / negative.numel()) / 2
    best = int(accuracy.argmax())
    return float(candidates[best]), float(accuracy[best])


class _KeepRows(Aggregator):
    """Keeps every positive and negative reading (one row per prompt); the result is their mean difference."""

    name = "condition"
    summable = False

    def __init__(self) -> None:
        super().__init__()
        self.positive: list[Tensor] = []
        self.negative: list[Tensor] = []

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.positive)

    def update(self, pos: Reading, neg: Reading) -> None:
        if isinstance(pos, TokenReading) or isinstance(neg, TokenReading):
            raise ValueError("Condition.fit needs one reading per prompt: use read='mean' or 'last'")
        self.positive.append(pos.detach().to(torch.float64))
        self.negative.append(neg.detach().to(torch.float64))

    def scores(self, unit: Tensor) -> tuple[Tensor, Tensor]:
        """The cosine similarities of the positive and of the negative readings with ``unit`` (on the CPU)."""
        return cosine(torch.cat(self.positive).cpu(), unit), cosine(torch.cat(self.negative).cpu(), unit)

    def all_reduce(self, group: Any = None) -> None:
        raise NotImplementedError("Condition.fit runs in one process")

    def result(self) -> Tensor:
        return self._result().to(torch.float32)

    def _result(self) -> Tensor:
        if not self.positive:
            raise ValueError("Condition.fit got no data")
        return torch.cat(self.positive).mean(0) - torch.cat(self.negative).mean(0)
