"""Model sources: how ``tdsteer info --model`` opens a model through whichever adapter is installed.

An adapter distribution registers a :class:`ModelSource` under the entry-point group
``tdsteer.model_sources``; ``info`` asks each how sure it is that it can open the name and uses the
surest.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

from torch import nn

from tdsteer.adapter import ModelDescription
from tdsteer.cli.messages import CLIError, warn

GROUP = "tdsteer.model_sources"

SURE = 2
MAYBE = 1
NO = 0


@dataclass(frozen=True)
class OpenedModel:
    """A model opened for ``info``.

    Args:
        model: The module (possibly on the meta device, without weights).
        description: How its adapter sees it.
        weights_read: Whether the weights were read (``False``: built from its config only).
        facts: Extra lines for ``info`` (``{"parameters": 124439808}``).
    """

    model: nn.Module
    description: ModelDescription
    weights_read: bool
    facts: dict[str, Any]


class ModelSource(Protocol):
    """Opens models by name for ``tdsteer info``."""

    name: str

    def recognizes(self, name: str) -> int:
        """:data:`SURE`, :data:`MAYBE` or :data:`NO`: whether ``name`` is a model this source opens."""
        ...

    def open(self, name: str) -> OpenedModel:
        """Open the model (without its weights where possible); raise :class:`CLIError` on failure."""
        ...


def installed_sources() -> list[ModelSource]:
    """Every installed model source, by entry-point name."""
    sources: list[ModelSource] = []
    for entry in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        try:
            sources.append(entry.load())
        except Exception as error:  # noqa: BLE001 - one broken distribution must not break the others
            warn(f"cannot load the model source {entry.name!r} ({entry.value}): {error}")
    return sources


def open_model(name: str) -> OpenedModel:
    """Open ``name`` with the installed source surest of it.

    Raises:
        CLIError: No adapter is installed, or none recognises the name.
    """
    sources = installed_sources()
    if not sources:
        raise CLIError(
            f"describing model {name!r} needs an adapter: pip install tdsteer-hf (Hugging Face models) "
            "or tdsteer-timm (timm models)"
        )
    ranked = sorted(((source.recognizes(name), index, source) for index, source in enumerate(sources)), reverse=True)
    score, _, best = ranked[0]
    if score == NO:
        names = ", ".join(source.name for source in sources)
        raise CLIError(f"no installed adapter ({names}) recognises model {name!r}; give a model directory or id")
    try:
        return best.open(name)
    except CLIError as error:
        # another source may know a name close to this one (a typo of a timm model falls through to the hub)
        close = [f"{source.name} model {match!r}" for source in sources for match in _close_names(source, name)]
        if close:
            raise CLIError(f"{str(error).rstrip('.')}; did you mean {' or '.join(close[:3])}?") from None
        raise


def _close_names(source: ModelSource, name: str) -> list[str]:
    """Names close to ``name`` that ``source`` knows (a source may offer ``close_names(name)``)."""
    close_names = getattr(source, "close_names", None)
    return list(close_names(name)) if callable(close_names) else []
