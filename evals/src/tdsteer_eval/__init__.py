"""tdsteer-eval: evaluate tdsteer steering vectors with lm-evaluation-harness.

Importing this package registers the lm-eval model ``"tdsteer"`` (:class:`SteeredLM`).

Examples:
    >>> import tdsteer_eval
    >>> from lm_eval.api.registry import get_model
    >>> get_model("tdsteer") is tdsteer_eval.SteeredLM
    True
"""

from tdsteer_eval._version import __version__
from tdsteer_eval.lm import SteeredLM
from tdsteer_eval.sweep import SweepRecord, records_from_results, sweep
from tdsteer_eval.tasks import DEMO_TASK, write_demo_task, write_multiple_choice_task

__all__ = [
    "DEMO_TASK",
    "SteeredLM",
    "SweepRecord",
    "__version__",
    "records_from_results",
    "sweep",
    "write_demo_task",
    "write_multiple_choice_task",
]
