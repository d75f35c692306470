"""The adapter contract: what ``tdsteer_hf`` and ``tdsteer_timm`` (and any third adapter) provide.

An adapter is a module that knows one family of models. Every adapter exports the same names with the
same meanings (see ``docs/adapters.md``):

========================================= ===========================================================
``sites(model, layers=None, kind=K)``      one :class:`~tdsteer.Site` per chosen layer of ``kind``
``num_layers(model, kind=K)``              how many layers ``layers`` indexes into
``describe(model)``                        a :class:`ModelDescription`: every site it offers
``supported()``                            the registered architecture keys
``register_architecture(key, spec)``       teach it an architecture (a function)
``@architecture_for(key, ...)``            the same, as a decorator
``contrastive_batches(...)``               data in the format :func:`tdsteer.extract` reads
``SITE_KINDS``, ``DEFAULT_KIND``           the kinds of site it offers, and the default
========================================= ===========================================================

The rules they share live here, so they cannot drift apart:

* **layers**: :func:`tdsteer.take_indices`. An int is *one* layer (``-1`` is the last), a sequence
  picks several, a ``slice`` or ``range`` a span, ``None`` all. timm's ``feature_take_indices``
  reads an int ``n`` as "the last n"; tdsteer does not: ``sites(model, 2)`` is the third layer in
  both adapters, and "the last two" is ``slice(-2, None)``.
* **fallback**: a registered architecture resolves silently. An unregistered one is guessed by the
  adapter's fallback with a ``UserWarning`` that says what was guessed (``fallback=True``, the
  default); ``fallback=False`` refuses. Either way a model nothing fits raises
  :class:`~tdsteer.UnknownArchitectureError`.
* **description**: one record type, :class:`ModelDescription`, made of :class:`SiteInfo` records.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

from tdsteer.indices import IndexSpec, take_indices
from tdsteer.sites import Site


@dataclass(frozen=True)
class SiteInfo:
    """One site a model offers: a plain record, like an entry of timm's ``feature_info``.

    Args:
        kind: Kind of site (``"resid_post"``, ``"block"``...).
        index: Position among the sites of its kind (the index ``layers`` selects by).
        site: The :class:`~tdsteer.Site` itself.
        num_chs: Channels (hidden size) of the activation, when known.
        stage: For hierarchical vision models, the stage that holds the site.

    Examples:
        >>> SiteInfo("block", 0, Site("blocks.0"), 192).path
        'blocks.0'
    """

    kind: str
    index: int
    site: Site
    num_chs: int | None = None
    stage: int | None = None

    @property
    def path(self) -> str:
        """The site's module path."""
        return self.site.path


@dataclass(frozen=True)
class ModelDescription:
    """How an adapter sees one model: every site it offers, by kind, and how it found them.

    Args:
        adapter: Import name of the adapter that made it (``"tdsteer_hf"``).
        model_class: Class name of the model.
        architecture: The registry key used (an HF ``model_type``, a timm family), or the fallback's name.
        source: How the sites were found: ``"registry"``, or the fallback that applied
            (``"nested"``, ``"blocks_path"``, ``"no_split_modules"``, ``"guess"``, ``"feature_info"``).
        guessed: Whether a fallback guessed the sites (a warning said so).
        hidden_size: Width of the model's residual stream when known.
        sites: Every site, kind by kind, in forward order within a kind.
        kinds: The kinds on offer, in the adapter's order.
        default_kind: The kind ``sites()`` uses when none is given.
        unavailable: Kind -> why this model has no site of that kind.

    Examples:
        >>> d = ModelDescription("tdsteer_x", "Net", "net", "registry", False, 8,
        ...                      (SiteInfo("block", 0, Site("b.0"), 8), SiteInfo("block", 1, Site("b.1"), 8)),
        ...                      ("block",), "block")
        >>> [s.path for s in d.select(-1)], d.num_layers()
        (['b.1'], 2)
    """

    adapter: str
    model_class: str
    architecture: str
    source: str
    guessed: bool
    hidden_size: int | None
    sites: tuple[SiteInfo, ...]
    kinds: tuple[str, ...]
    default_kind: str
    unavailable: Mapping[str, str] = field(default_factory=dict)

    def of_kind(self, kind: str | None = None) -> tuple[SiteInfo, ...]:
        """The sites of ``kind`` (default: :attr:`default_kind`), in order.

        Raises:
            ValueError: The kind is unknown, or this model has no site of that kind (the message says why).
        """
        kind = self.default_kind if kind is None else kind
        if kind in self.unavailable:
            offered = ", ".join(k for k in self.kinds if k not in self.unavailable)
            raise ValueError(
                f"{self.model_class} has no {kind!r} sites ({self.unavailable[kind]}); use one of {offered}"
            )
        if kind not in self.kinds:
            raise ValueError(f"Unknown site kind {kind!r}; use one of {', '.join(self.kinds)}")
        return tuple(info for info in self.sites if info.kind == kind)

    def num_layers(self, kind: str | None = None) -> int:
        """How many sites of ``kind`` there are: the count ``layers`` indexes into."""
        return len(self.of_kind(kind))

    def select(self, layers: IndexSpec = None, kind: str | None = None) -> list[Site]:
        """Sites of ``kind`` at ``layers``, by the one index rule (:func:`tdsteer.take_indices`)."""
        records = self.of_kind(kind)
        return [records[i].site for i in take_indices(len(records), layers, what="layer")]

    def site_sizes(self) -> dict[str, int]:
        """Site key -> channels, for every site whose channels are known (what a vector must match)."""
        return {info.site.key: info.num_chs for info in self.sites if info.num_chs is not None}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible summary: the fields, and per kind its count and first and last paths."""
        kinds: dict[str, Any] = {}
        for kind in self.kinds:
            if kind in self.unavailable:
                kinds[kind] = {"available": False, "reason": self.unavailable[kind]}
                continue
            records = self.of_kind(kind)
            kinds[kind] = {
                "count": len(records),
                "first": records[0].site.key if records else None,
                "last": records[-1].site.key if records else None,
            }
        return {
            "adapter": self.adapter,
            "model_class": self.model_class,
            "architecture": self.architecture,
            "source": self.source,
            "guessed": self.guessed,
            "hidden_size": self.hidden_size,
            "default_kind": self.default_kind,
            "kinds": kinds,
        }


def warn_fallback(adapter: str, model: nn.Module, guess: str, register: str) -> None:
    """The one warning both adapters give when their fallback places an unregistered model.

    Args:
        adapter: The adapter's import name.
        model: The model.
        guess: What the fallback decided (``"the blocks are 'model.layers' (12 x Block)"``).
        register: How to make it explicit (one call, as code).
    """
    warnings.warn(
        f"{adapter}: {type(model).__name__} is not a registered architecture; guessed that {guess}. "
        f"Register it with {register} to make this explicit, or pass fallback=False to refuse guesses.",
        UserWarning,
        stacklevel=4,
    )


@runtime_checkable
class Adapter(Protocol):
    """What an adapter module provides; ``tdsteer_hf`` and ``tdsteer_timm`` both meet it.

    A module satisfies a protocol by its attributes, so ``isinstance(tdsteer_hf, Adapter)`` holds.
    """

    SITE_KINDS: tuple[str, ...]
    DEFAULT_KIND: str

    def sites(
        self, model: nn.Module, layers: IndexSpec = None, kind: str = ..., *, fallback: bool = True
    ) -> list[Site]: ...

    def num_layers(self, model: nn.Module, kind: str = ..., *, fallback: bool = True) -> int: ...

    def describe(self, model: nn.Module, *, fallback: bool = True) -> ModelDescription: ...

    def supported(self) -> list[str]: ...

    def register_architecture(self, key: Any, spec: Any = ..., /, *, overwrite: bool = False, **fields: Any) -> Any: ...

    def architecture_for(self, *keys: Any, overwrite: bool = False) -> Callable[[Any], Any]: ...

    def contrastive_batches(self, *args: Any, **kwargs: Any) -> Iterable[Mapping[str, Any]]: ...
