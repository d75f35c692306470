"""The exceptions tdsteer raises for a user's mistakes, one module so that every package can import them."""

from __future__ import annotations

from collections.abc import Sequence


class SteeringVectorFileError(ValueError):
    """A steering-vector file is missing, truncated, corrupted or not a tdsteer file."""


class ActivationCacheError(ValueError):
    """A cache that cannot be opened, resumed or appended to as asked.

    Raised for a folder that is not a cache, truncated or corrupted files (a failed checksum), a
    resume with other data, another model or other settings, and a folder that another process is
    recording into; the message names the folder and what to do.
    """


class UnknownArchitectureError(ValueError):
    """An adapter does not know where the sites of a model are.

    Both adapters raise it for a model they cannot place (with ``fallback=False``, or when the fallback
    finds nothing); the message names the model, lists the supported architectures, and says how to
    register one or to pass module paths directly.

    Args:
        adapter: The adapter's import name (``"tdsteer_hf"``).
        model: What was not recognised (``"GPT2Foo (model type 'foo')"``).
        supported: Registered architecture keys.
        register: How to register this model with the adapter (one call, as code).
        paths: How to give module paths instead (``blocks_path=...`` or ``tdsteer.Site("...")``).
        reason: Why the fallback did not apply, when it was tried.

    Examples:
        >>> error = UnknownArchitectureError("tdsteer_x", "MyNet", ["a", "b"], "tdsteer_x.register_architecture(...)")
        >>> "Supported: a, b" in str(error)
        True
    """

    def __init__(
        self,
        adapter: str,
        model: str,
        supported: Sequence[str],
        register: str,
        paths: str = "tdsteer.Site('path.to.module') for each module you want",
        reason: str = "",
    ) -> None:
        self.adapter = adapter
        self.model = model
        self.supported = list(supported)
        because = f" ({reason})" if reason else ""
        super().__init__(
            f"{adapter} does not know the architecture of {model}{because}. "
            f"Supported: {', '.join(self.supported) or 'none'}. "
            f"Register it with {register}, or pass module paths yourself: {paths}."
        )
