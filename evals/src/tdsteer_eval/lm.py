"""``SteeredLM``: an lm-eval model (``--model tdsteer``) whose forward passes are steered by tdsteer."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import Tensor

import tdsteer
from tdsteer import SteeringVector
from tdsteer.checks import Check, as_check
from tdsteer.handle import SteeringHandle
from tdsteer.operators import OPERATORS, as_operator
from tdsteer.positions import POSITION_POLICIES, PositionsLike, as_token_policy
from tdsteer.vector import VectorSource, as_vector, is_lm_eval_file
from tdsteer_eval.scoring import assistant_marker_ids, continuation_start, marker_start, score_requests
from tdsteer_eval.vectors import describe_condition

#: Position policies of :class:`SteeredLM`: the core's, plus ``"assistant"``.
POSITIONS = (*POSITION_POLICIES[:-1], "assistant", POSITION_POLICIES[-1])
ROW_POLICIES = ("continuation", "assistant")
#: The operator names a command line accepts (the core's registry, :data:`tdsteer.operators.OPERATORS`).
OPERATOR_NAMES: tuple[str, ...] = tuple(OPERATORS)


def as_scale(value: Any) -> float:
    """A scale as :class:`SteeredLM` takes it: a number, or its text (``model_args`` values are text).

    Raises:
        TypeError: Neither a number nor text (a bool included).
        ValueError: Text that is not a number, or a number that is not finite.

    Examples:
        >>> as_scale("-2.5"), as_scale(4)
        (-2.5, 4.0)
    """
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"scale {value!r} is not a number: give e.g. scale=4 or scale=-2.5") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"scale must be finite, got {value}")
    return number


def check_positions(positions: PositionsLike) -> PositionsLike:
    """The core policy behind a :class:`SteeredLM` policy (``"assistant"`` steers as ``"continuation"``
    from other starts).

    Args:
        positions: A policy of :data:`POSITIONS`.

    Returns:
        What :func:`tdsteer.steer` gets: ``positions`` itself, or ``"continuation"`` for ``"assistant"``.

    Raises:
        TypeError: A bool.
        ValueError: Not a policy, or an image policy (``"patches"``, ``"prefix"``), which means nothing
            for a language model; the message lists the policies to use instead.

    Examples:
        >>> check_positions("assistant"), check_positions(3)
        ('continuation', 3)
    """
    if positions == "assistant":
        return "continuation"
    as_token_policy(positions, extra=("assistant",))
    return positions


def split_sites(sites: Sequence[str] | str | None) -> list[str] | None:
    """Site keys from a list, or from one string separated by ``|``, ``;`` or spaces (lm-eval's
    ``model_args`` use commas themselves).

    Examples:
        >>> split_sites("transformer.h.0|transformer.h.1")
        ['transformer.h.0', 'transformer.h.1']
    """
    if sites is None:
        return None
    if isinstance(sites, str):
        return [part for part in sites.replace("|", " ").replace(";", " ").split() if part]
    return [str(site) for site in sites]


@register_model("tdsteer")
class SteeredLM(HFLM):
    """lm-eval's Hugging Face model (``HFLM``) with every forward pass steered by a tdsteer vector.

    Registered under the name ``"tdsteer"`` when :mod:`tdsteer_eval` is imported, so
    ``lm_eval.simple_evaluate(model="tdsteer", model_args="pretrained=...,vector=vec.safetensors,scale=4")``
    and ``tdsteer eval run --model tdsteer --model_args ...`` work. Each request set (all loglikelihood
    requests, all generations) runs in one :func:`tdsteer.steer` context.

    Args:
        pretrained: A model id or local directory, or an already-built
            ``transformers.PreTrainedModel`` (then pass ``tokenizer=`` too).
        vector: A :class:`tdsteer.SteeringVector`, the path of a tdsteer ``.safetensors`` file or of
            an lm-eval ``steered`` ``.pt`` file (hookpoints relative to ``model.base_model``), or a
            mapping ``{site path: tensor}``. Site paths are relative to the model root.
        scale: Multiplier of the vector (``0`` with ``operator="add"`` leaves the model unchanged): a
            number, or its text as ``model_args`` give it (``"4"``); the :attr:`scale` property takes
            numbers only.
        operator: A name of :data:`tdsteer.operators.OPERATORS` (``"add"``, ``"ablate"`` or its alias
            ``"project_out"``, ``"clamp"``, ``"add_norm"``), or a tdsteer operator.
        positions: Which tokens are steered. ``"all"``; ``"continuation"``: in loglikelihood requests
            the positions whose outputs score the continuation (the last context token and the
            continuation's tokens but its last), the context before them untouched; in generation
            the last prompt token and the generated tokens. ``"assistant"``: from the end of the
            chat template's user turn on (the CAA protocol; the marker's last token), falling back
            to ``"continuation"`` where no marker is found. ``"prompt"``, ``"generated"``, an int
            ``k`` or ``"from:k"`` as in :func:`tdsteer.steer` (in loglikelihood requests ``"prompt"``
            steers every token and ``"generated"`` none: a warning says so).
        sites: Steer only these site keys of the vector (a list, or one string ``"a|b"``).
        check: When the vector was made for another model type: ``"warn"``, ``"error"``, ``"ignore"``.
        assistant_marker: For ``positions="assistant"``: the text that opens the assistant turn
            (default: taken from the tokenizer's chat template).
        condition: Steer only the requests whose context meets this :class:`tdsteer.Condition` (or
            the path of a condition file, ``tdsteer extract --condition``): read on each scored
            request's context (up to the token that scores the continuation) and on each
            generation's prompt.
        **kwargs: Passed to ``HFLM`` (``tokenizer``, ``device``, ``dtype``, ``batch_size``,
            ``parallelize``...); ``device`` defaults to ``"cuda"`` where a GPU is available and
            ``"cpu"`` otherwise (HFLM's own default is ``"cuda"`` everywhere).

    Raises:
        ValueError: A site of the vector does not exist in the model, or an argument is invalid (a
            ``scale`` text that is not a number included).
        TypeError: ``scale`` is neither a number nor text.

    Examples:
        >>> from tdsteer_eval.lm import SteeredLM  # doctest: +SKIP
        >>> lm = SteeredLM(pretrained=model, tokenizer=tok, vector="honesty.safetensors", scale=4.0)  # doctest: +SKIP
        >>> lm.scale = -4.0  # the next evaluation steers the other way  # doctest: +SKIP
    """

    def __init__(
        self,
        pretrained: Any,
        vector: VectorSource | None = None,
        scale: float = 1.0,
        operator: str | tdsteer.Operator | Callable[..., Tensor] = "add",
        positions: PositionsLike = "all",
        sites: Sequence[str] | str | None = None,
        check: Check = "warn",
        assistant_marker: str | None = None,
        condition: str | tdsteer.Condition | None = None,
        **kwargs: Any,
    ) -> None:
        if vector is None:
            raise ValueError(
                "SteeredLM needs a steering vector: pass vector=PATH.safetensors (model_args 'vector=...') "
                "or a tdsteer.SteeringVector"
            )
        as_check(check)
        scale = as_scale(scale)  # model_args give text: a bad scale fails before the model loads
        self._core_positions = check_positions(positions)
        as_operator(operator)  # a bad operator fails before the model loads
        # Before the model loads, so that a bad file fails fast (a .pt file is re-keyed once the model is known).
        loaded = as_vector(vector)
        self.condition = condition if not isinstance(condition, str) else tdsteer.Condition.load(condition)
        self.condition_source = condition if isinstance(condition, str) else None
        self._handle: SteeringHandle | None = None
        self._warned: set[str] = set()
        # HFLM's default device is "cuda" even where there is none; the command line's rule instead
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        with _quiet_model_instance_warning():  # a model instance is how tdsteer passes one it steers
            super().__init__(pretrained=pretrained, **kwargs)
        self._shard_on_cpus()
        if is_lm_eval_file(vector):
            loaded = as_vector(vector, self.model)
            _warn_if_scaled_twice(loaded, scale)
        chosen = split_sites(sites)
        if chosen is not None:
            loaded = loaded.select(chosen)
        loaded.validate(self.model, check=check)  # every site resolves; model type checked once
        self._vector: SteeringVector = loaded
        self.vector_source = _source_path(vector)
        self.operator = operator
        self.positions = positions
        self.scale = scale
        if self.positions in ROW_POLICIES and self.backend != "causal":
            raise ValueError(f"positions={positions!r} needs a causal model; this one is {self.backend}")
        if self.condition is not None and self.backend != "causal":
            raise ValueError(f"a condition needs a causal model; this one is {self.backend}")
        self._marker = assistant_marker_ids(self.tokenizer, assistant_marker) if positions == "assistant" else None
        with self.steering():  # fail now, not in the middle of an evaluation
            pass

    def _shard_on_cpus(self) -> None:
        """Under ``accelerate launch`` (or ``torchrun``) on CPUs, give each process its share of the requests.

        ``HFLM`` shards requests over processes only when it sees several GPUs; on CPUs every process
        would run every request. The processes talk over gloo, as accelerate sets up.
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is None or accelerator.num_processes <= 1 or self.world_size > 1 or self.device.type != "cpu":
            return
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes

    @property
    def vector(self) -> SteeringVector:
        """The steering vector; assign another one (validated against the model) between evaluations."""
        return self._vector

    @vector.setter
    def vector(self, value: VectorSource) -> None:
        if self._handle is not None:
            raise RuntimeError("Cannot change the vector while a request set is being evaluated")
        loaded = as_vector(value, self.model)
        loaded.validate(self.model, check="ignore")
        self._vector = loaded
        self.vector_source = _source_path(value)

    @property
    def scale(self) -> float:
        """Multiplier of the steering vector used by the next forward passes."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if isinstance(value, str):
            raise TypeError(f"scale must be a number, got {value!r}")
        value = as_scale(value)
        self._scale = value
        if self._handle is not None:
            self._handle.set(scale=value)

    def steering(self) -> SteeringHandle:
        """The :func:`tdsteer.steer` context this model runs its forward passes in.

        Returns:
            A :class:`tdsteer.SteeringHandle` that steers ``self.model`` while it is open.
        """
        return tdsteer.steer(
            self.model,
            self.vector,
            scale=self.scale,
            operator=self.operator,
            positions=self._core_positions,
            check="ignore",
            condition=self.condition,
        )

    @contextmanager
    def _steered(self) -> Iterator[None]:
        """Steer while open; nested uses share the outer context, so each request set opens one."""
        if self._handle is not None:
            yield
            return
        handle = self.steering()
        with handle:
            self._handle = handle
            try:
                yield
            finally:
                self._handle = None

    def _set_starts(self, starts: Tensor | None) -> None:
        assert self._handle is not None, "starts are set inside a request set"
        self._handle.set(starts=starts)

    def _warn_idle(self, request_type: str) -> None:
        """Warn once per request type when the policy steers nothing in it."""
        if self.positions == "generated" and request_type not in self._warned:
            self._warned.add(request_type)
            warnings.warn(
                f"positions='generated' steers nothing in {request_type} requests (a scored request generates "
                "no token); use positions='continuation' to steer the tokens that score the answer",
                UserWarning,
                stacklevel=3,
            )

    # A whole request set runs in one context (opening one costs hook registration per site);
    # the per-batch methods open their own when called directly.
    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._warn_idle("loglikelihood")
        with self._steered():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._warn_idle("loglikelihood_rolling")
        with self._steered():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        with self._steered():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False, override_bs: int | None = None) -> Any:
        if self.positions not in ROW_POLICIES and self.condition is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # per-row starts: where the continuation is scored from, and where a condition's prompt ends
        with self._steered():
            return score_requests(
                self, requests, self._start_of, self._set_starts, disable_tqdm=disable_tqdm, override_bs=override_bs
            )

    def _start_of(self, row: list[int], continuation_length: int) -> int:
        """First steered position of a scored row under the ``continuation`` or ``assistant`` policy."""
        start = continuation_start(row, continuation_length)
        if self._marker is None:
            return start
        found = marker_start(row, start + 1, self._marker)
        if found is None:
            self._missed_marker()
            return start
        return found

    def _missed_marker(self) -> None:
        if "marker" not in self._warned:
            self._warned.add("marker")
            warnings.warn(
                "positions='assistant': no assistant-turn marker in a request (is the chat template applied? "
                "--apply_chat_template); such requests are steered from the continuation",
                UserWarning,
                stacklevel=4,
            )

    def _model_call(self, inps: Tensor, attn_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        with self._steered():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context: Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> Tensor:
        with self._steered():
            if self._marker is None:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            self._set_starts(self._generation_starts(context))
            try:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            finally:
                self._set_starts(None)

    def _generation_starts(self, context: Tensor) -> Tensor:
        """Per-row assistant starts of a left-padded prompt batch (one read of the prompt tokens)."""
        assert self._marker is not None
        width = context.shape[1]
        starts = []
        for row in context.tolist():
            found = marker_start(row, width, self._marker)
            if found is None:
                self._missed_marker()
            starts.append(width - 1 if found is None else found)
        return context.new_tensor(starts)

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model information plus the steering settings (stored in the results' ``config``)."""
        info: dict[str, Any] = dict(super().get_model_info())
        info.update(
            tdsteer_scale=self.scale,
            tdsteer_operator=self.operator if isinstance(self.operator, str) else type(self.operator).__name__,
            tdsteer_positions=self.positions,
            tdsteer_sites=self.vector.keys(),
            tdsteer_vector_method=self.vector.metadata.get("method"),
            tdsteer_condition=describe_condition(self.condition_source, self.condition),
        )
        return info


class _DropModelInstanceWarning(logging.Filter):
    NOTES = (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in self.NOTES)


@contextmanager
def _quiet_model_instance_warning() -> Iterator[None]:
    """HFLM warns twice whenever ``pretrained`` is a model instance rather than a name; for SteeredLM
    that is the normal way in (the demo, sweeps over a loaded model), so the warnings are left out
    (its sharding over processes is :meth:`SteeredLM._shard_on_cpus`'s)."""
    logger, dropping = logging.getLogger(HFLM.__module__), _DropModelInstanceWarning()
    logger.addFilter(dropping)
    try:
        yield
    finally:
        logger.removeFilter(dropping)


def _warn_if_scaled_twice(vector: SteeringVector, scale: Any) -> None:
    """An lm-eval file's coefficient is part of its directions: a scale other than 1 multiplies it."""
    coefficient = vector.metadata.get("steering_coefficient")
    try:
        factor = float(scale)
    except (TypeError, ValueError):
        return  # a per-row tensor or text the scale check refuses
    if isinstance(coefficient, (int, float)) and coefficient != 1 and factor != 1:
        warnings.warn(
            f"{vector.metadata.get('source')}: its steering_coefficient {coefficient:g} is part of the vector, so "
            f"scale={factor:g} steers at {coefficient * factor:g} times its direction; pass scale=1 for the file's "
            "own strength",
            UserWarning,
            stacklevel=3,
        )


def _source_path(vector: Any) -> str | None:
    """The file a vector came from, for the provenance of results (``None``: built in memory)."""
    return str(vector) if isinstance(vector, (str, os.PathLike)) else None
