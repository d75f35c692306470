"""tdsteer-eval: evaluate tdsteer steering vectors with lm-evaluation-harness.

Importing this package registers the lm-eval model ``"tdsteer"`` (:class:`SteeredLM`). The shipped
tasks (:data:`SHIPPED_TASKS`, in :data:`TASKS_DIR`) are on the include path of :func:`task_manager`,
:func:`sweep`, :func:`run_sweep` and the ``tdsteer eval`` / ``tdsteer sweep`` commands.

The public names are imported on first use, and the model is registered by name (lm-eval imports
:mod:`tdsteer_eval.lm` when it is asked for ``"tdsteer"``), so importing the package, and the start of
the ``tdsteer-eval`` command, pay for neither torch nor lm-eval's models.

Examples:
    >>> import tdsteer_eval
    >>> from lm_eval.api.registry import get_model
    >>> get_model("tdsteer") is tdsteer_eval.SteeredLM
    True
"""

from typing import TYPE_CHECKING

from tdsteer_eval._registration import register_lm_eval_model
from tdsteer_eval._version import __version__

if TYPE_CHECKING:
    from tdsteer_eval.analysis import item_propensities, least_squares_slope, summarize
    from tdsteer_eval.layers import layer_sweep, layer_vectors, record_layers
    from tdsteer_eval.lm import SteeredLM
    from tdsteer_eval.records import SweepRecord, records_from_results, sweep
    from tdsteer_eval.runner import EvalOptions, run_sweep, task_manager
    from tdsteer_eval.task_data import BEHAVIOUR_TASKS, SHIPPED_TASKS, TASKS_DIR
    from tdsteer_eval.tasks import DEMO_TASK, write_demo_task, write_multiple_choice_task
else:
    from tdsteer._lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(__name__, __file__)

register_lm_eval_model()

__all__ = [
    "BEHAVIOUR_TASKS",
    "DEMO_TASK",
    "SHIPPED_TASKS",
    "TASKS_DIR",
    "EvalOptions",
    "SteeredLM",
    "SweepRecord",
    "__version__",
    "item_propensities",
    "layer_sweep",
    "layer_vectors",
    "least_squares_slope",
    "record_layers",
    "records_from_results",
    "run_sweep",
    "summarize",
    "sweep",
    "task_manager",
    "write_demo_task",
    "write_multiple_choice_task",
]
