"""The lm-eval model ``"tdsteer"``, registered by name so that lm-eval imports it only when it is used."""

from __future__ import annotations

#: Where lm-eval finds :class:`tdsteer_eval.SteeredLM` (``module:class``, the form its registry expects).
TARGET = "tdsteer_eval.lm:SteeredLM"


def register_lm_eval_model() -> None:
    """Register ``"tdsteer"`` with lm-eval, lazily where lm-eval supports it.

    lm-eval 0.4.10 and later take a ``module:class`` placeholder and import it on the first
    ``get_model("tdsteer")``; older releases need the class itself, so :mod:`tdsteer_eval.lm` is
    imported now (its ``@register_model`` decorator registers it).

    Examples:
        >>> register_lm_eval_model()  # again: a no-op
        >>> from lm_eval.api.registry import get_model
        >>> get_model("tdsteer").__name__
        'SteeredLM'
    """
    try:
        from lm_eval.api.registry import model_registry  # light: lm-eval's models are not imported
    except ImportError:  # lm-eval before its lazy registry
        import tdsteer_eval.lm  # noqa: F401  (its decorator registers the model)

        return
    if "tdsteer" not in model_registry:
        model_registry.register("tdsteer", target=TARGET)
