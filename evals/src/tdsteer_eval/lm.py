"""``SteeredLM``: an lm-eval model (``--model tdsteer``) whose forward passes are steered by tdsteer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import Tensor

import tdsteer
from tdsteer import SteeringVector
from tdsteer.checks import Check, as_check
from tdsteer.vector import VectorSource


@register_model("tdsteer")
class SteeredLM(HFLM):
    """lm-eval's Hugging Face model (``HFLM``) with every forward pass steered by a tdsteer vector.

    Registered under the name ``"tdsteer"`` when :mod:`tdsteer_eval` is imported, so
    ``lm_eval.simple_evaluate(model="tdsteer", model_args="pretrained=...,vector=vec.safetensors,scale=4")``
    and ``tdsteer-eval run --model tdsteer --model_args ...`` work. Loglikelihood requests
    (``_model_call``) and generation (``_model_generate``) run inside :func:`tdsteer.steer`.

    Unlike lm-eval's ``steered`` model, the vector comes from a safetensors file with named sites,
    any tdsteer operator applies, the steered positions can be limited, and :attr:`scale` can be
    changed between evaluations (see :func:`tdsteer_eval.sweep`).

    Args:
        pretrained: A model id or local directory, or an already-built
            ``transformers.PreTrainedModel`` (then pass ``tokenizer=`` too).
        vector: A :class:`tdsteer.SteeringVector`, the path of a tdsteer ``.safetensors`` file, or a
            mapping ``{site path: tensor}``. Site paths are relative to the model root
            (``transformer.h.3``, ``model.layers.10``).
        scale: Multiplier of the vector (``0`` with ``operator="add"`` leaves the model unchanged).
        operator: ``"add"``, ``"ablate"``, ``"clamp"``, ``"add_norm"``, or a tdsteer operator.
        positions: ``"all"``, ``"prompt"``, ``"generated"``, an int ``k`` or ``"from:k"``. In a plain
            forward call (loglikelihood requests) ``"prompt"`` steers every token and
            ``"generated"`` none.
        sites: Steer only these site keys of the vector (Python use; lm-eval's ``model_args``
            strings cannot hold a list).
        check: What to do when the vector was made for another model type: ``"warn"``, ``"error"``
            or ``"ignore"``.
        **kwargs: Passed to ``HFLM`` (``tokenizer``, ``device``, ``dtype``, ``batch_size``...).

    Raises:
        ValueError: A site of the vector does not exist in the model, or an argument is invalid.

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
        positions: str | int = "all",
        sites: Sequence[str] | None = None,
        check: Check = "warn",
        **kwargs: Any,
    ) -> None:
        if vector is None:
            raise ValueError(
                "SteeredLM needs a steering vector: pass vector=PATH.safetensors (model_args 'vector=...') "
                "or a tdsteer.SteeringVector"
            )
        as_check(check)
        loaded = tdsteer.as_vector(vector)  # before the model loads: a bad file fails fast
        self._steering_open = False
        super().__init__(pretrained=pretrained, **kwargs)
        if sites is not None:
            loaded = loaded.select(list(sites))
        loaded.validate(self.model, check=check)  # every site resolves; model type checked once
        self.vector: SteeringVector = loaded
        self.operator = operator
        self.positions = positions
        self.scale = scale
        # Fail now, not in the middle of an evaluation, on a bad operator or position policy.
        with self.steering():
            pass

    @property
    def scale(self) -> float:
        """Multiplier of the steering vector used by the next forward passes."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"scale must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"scale must be finite, got {value}")
        self._scale = value

    def steering(self) -> Any:
        """The :func:`tdsteer.steer` context this model runs its forward passes in.

        Returns:
            A context manager that steers ``self.model`` while it is open.
        """
        return tdsteer.steer(
            self.model,
            self.vector,
            scale=self.scale,
            operator=self.operator,
            positions=self.positions,
            check="ignore",
        )

    @contextmanager
    def _steered(self) -> Iterator[None]:
        """Steer while open; nested uses share the outer context, so each request set opens one."""
        if self._steering_open:
            yield
            return
        self._steering_open = True
        try:
            with self.steering():
                yield
        finally:
            self._steering_open = False

    # A whole request set runs in one context (opening one costs hook registration per site);
    # the per-batch methods open their own when called directly.
    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
        with self._steered():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        with self._steered():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        with self._steered():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _model_call(self, inps: Tensor, attn_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        with self._steered():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context: Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> Tensor:
        with self._steered():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model information plus the steering settings (stored in the results' ``config``)."""
        info: dict[str, Any] = dict(super().get_model_info())
        info.update(
            tdsteer_scale=self.scale,
            tdsteer_operator=self.operator if isinstance(self.operator, str) else type(self.operator).__name__,
            tdsteer_positions=self.positions,
            tdsteer_sites=self.vector.keys(),
            tdsteer_vector_method=self.vector.metadata.get("method"),
        )
        return info
