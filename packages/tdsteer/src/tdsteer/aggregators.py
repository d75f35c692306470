"""Aggregators: from positive and negative readings to one direction per site.

Each aggregator streams: ``update`` folds in one batch of readings and its state has a size set by
the hidden size, not by the number of examples (the linear probe, which must see every row, is
the exception and says so). States merge: ``a.merge(b)`` combines shards computed elsewhere, and
``all_reduce()`` does the same across ``torch.distributed`` processes. Statistics accumulate in
float64.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tdsteer.reading import Reading, TokenReading

_F64 = torch.float64


def _rows(reading: Reading) -> Tensor:
    """All rows of a reading as ``[N, C]`` float64 (real tokens only for a token reading)."""
    if isinstance(reading, TokenReading):
        return reading.values[reading.mask].to(_F64)
    return reading.to(_F64)


def _paired(pos: Reading, neg: Reading, method: str) -> tuple[Tensor, Tensor]:
    if isinstance(pos, TokenReading) or isinstance(neg, TokenReading):
        raise ValueError(
            f"method={method!r} pairs one positive row with one negative row per example; "
            "use a read that gives one row per example (read='last', 'mean', an index, ...)"
        )
    if pos.shape != neg.shape:
        raise ValueError(
            f"method={method!r}: positive rows {tuple(pos.shape)} and negative rows {tuple(neg.shape)} differ"
        )
    return pos.to(_F64), neg.to(_F64)


class Aggregator:
    """Base class. Subclasses keep summable tensors in ``self.state``."""

    name = "aggregator"
    #: Whether states combine by summing their tensors (else ``merge`` is overridden).
    summable = True
    #: Whether the method reads every token (``read="all"``) and gives one row per position.
    per_token = False

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}
        self.nonfinite = torch.zeros((), dtype=torch.bool)

    def _add(self, key: str, value: Tensor) -> None:
        current = self.state.get(key)
        self.state[key] = value.clone() if current is None else current + value

    def _check_finite(self, *tensors: Tensor) -> None:
        flag = self.nonfinite.to(tensors[0].device)
        for tensor in tensors:
            flag = flag | ~torch.isfinite(tensor).all()
        self.nonfinite = flag

    @property
    def count(self) -> int:
        """Number of examples (or tokens) folded in so far."""
        n = self.state.get("n", self.state.get("n_pos"))
        return 0 if n is None else int(n.item())

    def update(self, pos: Reading, neg: Reading) -> None:
        raise NotImplementedError

    def merge(self, other: Aggregator) -> Aggregator:
        """Fold ``other``'s state into this one (shards from other processes or runs)."""
        if type(other) is not type(self):
            raise TypeError(f"Cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for key, value in other.state.items():
            self._add(key, value.to(self.state[key].device) if key in self.state else value)
        self.nonfinite = self.nonfinite | other.nonfinite.to(self.nonfinite.device)
        return self

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state over all processes of ``group`` (``torch.distributed``).

        A process that read no data (an empty shard) takes part with zeros of the others' shapes.
        """
        mine = {key: (tuple(value.shape), str(value.dtype).removeprefix("torch.")) for key, value in self.state.items()}
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        for state in gathered:
            for key, shape in state.items():
                if shapes.setdefault(key, shape) != shape:
                    raise RuntimeError(
                        f"Processes hold different {self.name} states for {key!r}: {shapes[key]} vs {shape}; "
                        "did every rank read the same sites of the same model?"
                    )
        device = _collective_device(group, self.state)
        for key in sorted(shapes):
            if key not in self.state:
                shape, dtype = shapes[key]
                self.state[key] = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
            dist.all_reduce(self.state[key], group=group)
        flag = self.nonfinite.to(device=device, dtype=torch.int64).reshape(1)
        dist.all_reduce(flag, group=group)
        self.nonfinite = flag[0] > 0

    def result(self) -> Tensor:
        """The direction, ``[C]`` (``[L, C]`` for per-position methods), as float32."""
        if not self.state:
            raise ValueError(f"{self.name}: no data was read; the batches were empty")
        if bool(self.nonfinite):
            raise ValueError(f"{self.name}: the activations contained NaN or infinite values")
        return self._result().to(torch.float32)

    def _result(self) -> Tensor:
        raise NotImplementedError


class MeanDiff(Aggregator):
    """Mean of positive rows minus mean of negative rows (CAA). Memory O(hidden)."""

    name = "mean_diff"

    def update(self, pos: Reading, neg: Reading) -> None:
        p, n = _rows(pos), _rows(neg)
        self._check_finite(p, n)
        self._add("sum_pos", p.sum(0))
        self._add("sum_neg", n.sum(0))
        self._add("n_pos", torch.tensor(float(p.shape[0]), dtype=_F64, device=p.device))
        self._add("n_neg", torch.tensor(float(n.shape[0]), dtype=_F64, device=n.device))

    def _result(self) -> Tensor:
        if float(self.state["n_pos"]) == 0 or float(self.state["n_neg"]) == 0:
            raise ValueError("mean_diff: no positive or no negative rows were read")
        return self.state["sum_pos"] / self.state["n_pos"] - self.state["sum_neg"] / self.state["n_neg"]


class _PairMoments(Aggregator):
    """First and second moments of paired differences ``d = pos - neg``. Memory O(hidden^2)."""

    def update(self, pos: Reading, neg: Reading) -> None:
        p, n = _paired(pos, neg, self.name)
        self._check_finite(p, n)
        d = p - n
        self._add("sum_d", d.sum(0))
        self._add("sum_dd", d.T @ d)
        self._add("n", torch.tensor(float(d.shape[0]), dtype=_F64, device=d.device))

    def _matrix(self, mean: Tensor, n: Tensor) -> Tensor:
        raise NotImplementedError

    def _result(self) -> Tensor:
        n = self.state["n"]
        if float(n) < 2:
            raise ValueError(f"{self.name}: needs at least 2 pairs, got {int(n)}")
        mean = self.state["sum_d"] / n
        _, vectors = torch.linalg.eigh(self._matrix(mean, n))
        direction = vectors[:, -1]
        projection = mean @ direction
        # Orient and size the component like the mean difference: its projection on the direction.
        return direction * projection


class PCADiff(_PairMoments):
    """First principal component of the paired differences, centred (repeng's ``pca_diff``).

    The direction is oriented and scaled by the projection of the mean difference on it.
    """

    name = "pca_diff"

    def _matrix(self, mean: Tensor, n: Tensor) -> Tensor:
        return self.state["sum_dd"] / n - torch.outer(mean, mean)


class PCACenter(_PairMoments):
    """First principal component of activations centred on each pair's midpoint (repeng's
    ``pca_center``): the uncentred second moment of the differences."""

    name = "pca_center"

    def _matrix(self, mean: Tensor, n: Tensor) -> Tensor:
        return self.state["sum_dd"] / n


class LinearProbe(Aggregator):
    """Logistic regression separating positive from negative rows; the direction is the unit weight
    vector scaled by the mean difference's projection on it.

    Unlike the other methods it keeps every row (float32), since the fit needs them all.

    Args:
        l2: L2 penalty on the weights.
        max_iter: L-BFGS iterations.
    """

    name = "probe"
    summable = False

    def __init__(self, l2: float = 1e-3, max_iter: int = 200) -> None:
        super().__init__()
        self.l2 = l2
        self.max_iter = max_iter
        self.rows_pos: list[Tensor] = []
        self.rows_neg: list[Tensor] = []

    @property
    def count(self) -> int:
        return sum(r.shape[0] for r in self.rows_pos)

    def update(self, pos: Reading, neg: Reading) -> None:
        p, n = _rows(pos), _rows(neg)
        self._check_finite(p, n)
        self.rows_pos.append(p.float().cpu())
        self.rows_neg.append(n.float().cpu())

    def merge(self, other: Aggregator) -> Aggregator:
        if not isinstance(other, LinearProbe):
            raise TypeError(f"Cannot merge a {type(other).__name__} into a LinearProbe")
        self.rows_pos += other.rows_pos
        self.rows_neg += other.rows_neg
        self.nonfinite = self.nonfinite | other.nonfinite.to(self.nonfinite.device)
        return self

    def all_reduce(self, group: Any = None) -> None:
        gathered: list[Any] = [None] * dist.get_world_size(group)
        rows = (torch.cat(self.rows_pos), torch.cat(self.rows_neg)) if self.rows_pos else None
        dist.all_gather_object(gathered, (rows, bool(self.nonfinite)), group=group)
        self.rows_pos = [g[0][0] for g in gathered if g[0] is not None]
        self.rows_neg = [g[0][1] for g in gathered if g[0] is not None]
        self.nonfinite = torch.tensor(any(g[1] for g in gathered))

    def result(self) -> Tensor:
        if not self.rows_pos or not self.rows_neg:
            raise ValueError("probe: no data was read; the batches were empty")
        if bool(self.nonfinite):
            raise ValueError("probe: the activations contained NaN or infinite values")
        return self._result().to(torch.float32)

    def _result(self) -> Tensor:
        pos, neg = torch.cat(self.rows_pos).to(_F64), torch.cat(self.rows_neg).to(_F64)
        x = torch.cat([pos, neg])
        y = torch.cat([torch.ones(len(pos), dtype=_F64), torch.zeros(len(neg), dtype=_F64)])
        mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mu) / sigma
        w = torch.zeros(x.shape[1], dtype=_F64, requires_grad=True)
        b = torch.zeros((), dtype=_F64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + self.l2 * (w @ w)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        direction = w.detach() / sigma
        direction = direction / direction.norm().clamp_min(1e-12)
        mean_diff = pos.mean(0) - neg.mean(0)
        return direction * (mean_diff @ direction).abs()

    def score(self, rows: Tensor) -> Tensor:
        """Projection of ``rows [N, C]`` on the fitted direction."""
        return rows.to(_F64) @ self._result()


class ActAdd(Aggregator):
    """Per-position differences of a single pair (or the mean over pairs): a ``[L, C]`` vector.

    Rows are aligned on their first real token; position ``i`` averages ``pos[i] - neg[i]`` over
    the pairs where both have a real token ``i``. Use prompts of equal token length (pad the
    shorter one, as ActAdd does) to cover every position. Needs ``read="all"``.
    """

    name = "actadd"
    per_token = True

    def update(self, pos: Reading, neg: Reading) -> None:
        if not isinstance(pos, TokenReading) or not isinstance(neg, TokenReading):
            raise ValueError("method='actadd' needs every token: use read='all'")
        p, pm = _left_align(pos)
        n, nm = _left_align(neg)
        length = min(p.shape[1], n.shape[1])
        both = (pm[:, :length] & nm[:, :length]).to(_F64)
        d = (p[:, :length].to(_F64) - n[:, :length].to(_F64)) * both.unsqueeze(-1)
        self._check_finite(d)
        self._grow_add("sum", d.sum(0))
        self._grow_add("n", both.sum(0))

    def _grow_add(self, key: str, value: Tensor) -> None:
        current = self.state.get(key)
        if current is not None and current.shape[0] != value.shape[0]:
            size = max(current.shape[0], value.shape[0])
            current, value = _pad_rows(current, size), _pad_rows(value, size)
        self.state[key] = value.clone() if current is None else current + value

    def merge(self, other: Aggregator) -> Aggregator:
        if not isinstance(other, ActAdd):
            raise TypeError(f"Cannot merge a {type(other).__name__} into an ActAdd")
        for key, value in other.state.items():
            self._grow_add(key, value)
        self.nonfinite = self.nonfinite | other.nonfinite.to(self.nonfinite.device)
        return self

    def all_reduce(self, group: Any = None) -> None:
        mine = self.state["n"].shape[0] if "n" in self.state else 0
        length = torch.tensor([mine], dtype=torch.int64, device=_collective_device(group, self.state))
        dist.all_reduce(length, op=dist.ReduceOp.MAX, group=group)
        self.state = {k: _pad_rows(v, int(length)) for k, v in self.state.items()}
        super().all_reduce(group)

    @property
    def count(self) -> int:
        n = self.state.get("n")
        return 0 if n is None else int(n[0].item())

    def _result(self) -> Tensor:
        counts = self.state["n"]
        keep = int((counts > 0).sum())
        return self.state["sum"][:keep] / counts[:keep].unsqueeze(-1)


def _collective_device(group: Any, state: dict[str, Tensor]) -> torch.device:
    """Where a collective's tensors must live: the state's device, or this rank's GPU under nccl."""
    for value in state.values():
        return value.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pad_rows(tensor: Tensor, size: int) -> Tensor:
    if tensor.shape[0] >= size:
        return tensor
    pad = tensor.new_zeros((size - tensor.shape[0],) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, pad])


def _left_align(reading: TokenReading) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the front: values ``[B, L, C]`` and mask ``[B, L]``."""
    order = torch.argsort((~reading.mask).to(torch.int8), dim=1, stable=True)
    values = torch.gather(reading.values, 1, order.unsqueeze(-1).expand_as(reading.values))
    count = reading.mask.sum(1, keepdim=True)
    mask = torch.arange(reading.mask.shape[1], device=count.device).unsqueeze(0) < count
    return values, mask


METHODS: dict[str, Callable[..., Aggregator]] = {
    "mean_diff": MeanDiff,
    "caa": MeanDiff,
    "pca_diff": PCADiff,
    "pca_center": PCACenter,
    "probe": LinearProbe,
    "linear_probe": LinearProbe,
    "actadd": ActAdd,
    "single_pair": ActAdd,
}


def register_method(name: str) -> Callable[[Callable[..., Aggregator]], Callable[..., Aggregator]]:
    """Register an :class:`Aggregator` subclass (or factory) as an extraction method.

    Examples:
        >>> @register_method("pos_mean")
        ... class PositiveMean(MeanDiff):
        ...     def _result(self):
        ...         return self.state["sum_pos"] / self.state["n_pos"]
    """

    def decorator(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        METHODS[name] = factory
        return factory

    return decorator


def make_aggregator(method: str | Callable[..., Aggregator], **kwargs: Any) -> Aggregator:
    """Build a fresh aggregator for ``method`` (a registered name or an Aggregator factory)."""
    if isinstance(method, str):
        try:
            factory = METHODS[method]
        except KeyError:
            raise ValueError(
                f"Unknown method {method!r}; use one of {', '.join(sorted(METHODS))} or register one with "
                "tdsteer.register_method"
            ) from None
    elif callable(method):
        factory = method
    else:
        raise TypeError(f"method must be a name or an Aggregator factory, got {type(method).__name__}")
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = None
    if accepted is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            options = ", ".join(sorted(accepted)) or "none"
            raise TypeError(
                f"Method {method!r} takes no option {', '.join(map(repr, unknown))}; its options: {options}"
            )
    return factory(**kwargs)
