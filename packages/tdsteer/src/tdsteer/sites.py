"""Sites: where in a model one activation lives."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from tdhook.paths import resolve_submodule_path
from torch import Tensor, nn

Layout = Literal["NLC", "NCHW", "NHWC"]
LAYOUTS: tuple[str, ...] = ("NLC", "NCHW", "NHWC")
Io = Literal["output", "input"]


@dataclass(frozen=True)
class Site:
    """One activation in a model: a module output, which part of it, and its layout.

    Args:
        path: Module path relative to the model root, in tdhook's path grammar
            (``"transformer.h.6"``, ``"model.layers.10.mlp"``).
        slot: Index of the tensor inside a tuple or list output (``0`` for blocks that return
            ``(hidden, ...)``); ``None`` when the module returns a tensor, or to take the first
            element of a tuple. For ``io="input"`` it indexes the positional arguments.
        layout: ``"NLC"`` (batch, tokens, channels), ``"NCHW"`` or ``"NHWC"`` feature maps.
        prefix_tokens: Number of leading non-patch tokens (CLS, registers) in an ``NLC`` layout.
        io: ``"output"`` (default) reads and steers what the module returns; ``"input"`` what it
            receives (a block's input is the residual stream before the block).
        kwarg: For ``io="input"``: the keyword argument holding the tensor when the module is called
            without positional arguments (``"hidden_states"`` by default).
        name: Key under which a :class:`~tdsteer.SteeringVector` stores this site; defaults to
            ``path`` (with ``#slot`` appended for slots other than ``0``/``None``).
        class_token: For an ``NLC`` image model: whether token 0 is a class token (``True``), or
            the model has none (``False``: ``read="cls"`` is refused); ``None`` when unknown (text
            models, hand-made sites), where ``read="cls"`` reads the first real token.

    Examples:
        >>> Site("transformer.h.3").key
        'transformer.h.3'
        >>> Site("blocks.2", prefix_tokens=1).prefix_tokens
        1
    """

    path: str
    slot: int | None = None
    layout: Layout = "NLC"
    prefix_tokens: int = 0
    io: Io = "output"
    kwarg: str | None = None
    name: str | None = None
    class_token: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise TypeError(f"Site path must be a string, got {type(self.path).__name__}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"Site {self.path!r}: unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
        if self.slot is not None and (not isinstance(self.slot, int) or isinstance(self.slot, bool)):
            raise TypeError(f"Site {self.path!r}: slot must be an int or None, got {self.slot!r}")
        if self.io not in ("output", "input"):
            raise ValueError(f"Site {self.path!r}: io must be 'output' or 'input', got {self.io!r}")
        if self.class_token not in (None, True, False):
            raise TypeError(f"Site {self.path!r}: class_token must be True, False or None, got {self.class_token!r}")
        if self.prefix_tokens < 0:
            raise ValueError(f"Site {self.path!r}: prefix_tokens must be >= 0, got {self.prefix_tokens}")

    @property
    def key(self) -> str:
        """The name this site has inside a steering vector."""
        if self.name is not None:
            return self.name
        base = self.path if self.io == "output" else f"{self.path}:input"
        if self.slot in (None, 0):
            return base
        return f"{base}#{self.slot}"

    @property
    def channel_dim(self) -> int:
        """Dimension of the activation that holds the hidden channels."""
        return 1 if self.layout == "NCHW" else -1

    def module(self, model: nn.Module) -> nn.Module:
        """Resolve this site's module inside ``model``.

        Raises:
            ValueError: if the path does not name a module of ``model``.
        """
        try:
            module = resolve_submodule_path(model, self.path)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Site {self.path!r} does not resolve in {type(model).__name__}: {_missing_part(model, self.path) or error}. "
                "Check the path against model.named_modules(), or build sites with an adapter "
                "(tdsteer_hf.sites / tdsteer_timm.sites)."
            ) from None
        if not isinstance(module, nn.Module):
            raise ValueError(f"Site {self.path!r} resolves to a {type(module).__name__}, not a torch.nn.Module")
        return module

    def select(self, output: Any) -> Any:
        """Return the tensor of this site from a module's output."""
        if isinstance(output, (tuple, list)):
            return output[self.slot or 0]
        if self.slot not in (None, 0):
            raise ValueError(f"Site {self.key!r}: slot {self.slot} given but the module returned a single tensor")
        return output

    def replace(self, output: Any, tensor: Any) -> Any:
        """Return ``output`` with this site's tensor replaced by ``tensor``, structure preserved."""
        if isinstance(output, tuple):
            slot = self.slot or 0
            return output[:slot] + (tensor,) + output[slot + 1 :]
        if isinstance(output, list):
            items = list(output)
            items[self.slot or 0] = tensor
            return items
        return tensor

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible record of this site."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Site:
        """Build a site from :meth:`to_dict` output."""
        known = {"path", "slot", "layout", "prefix_tokens", "io", "kwarg", "name", "class_token"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Site record has unknown fields {sorted(unknown)}")
        return cls(**dict(data))


SiteLike = Site | str


def _missing_part(model: nn.Module, path: str) -> str | None:
    """Where a dotted path stops resolving, and what the last module it reached holds; ``None`` for
    other path forms.

    Examples:
        >>> blocks = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> _missing_part(nn.Sequential(blocks), "0.3")
        "'0' has no '3' (it holds 2: '0', '1')"
    """
    names = path.split(".")
    if not all(name.isidentifier() or name.isdigit() for name in names):
        return None
    module, reached = model, list[str]()
    for name in names:
        child = module._modules.get(name)
        if child is None:
            where = repr(".".join(reached)) if reached else "the model"
            held = list(module._modules)
            shown = ", ".join(repr(h) for h in (held if len(held) <= 6 else [*held[:2], "...", held[-1]]))
            shown = shown.replace("'...'", "...")
            return f"{where} has no {name!r} (it holds {len(held)}: {shown})" if held else f"{where} has no submodules"
        module = child
        reached.append(name)
    return None


def as_site(value: SiteLike) -> Site:
    """Return ``value`` as a :class:`Site`; a string is a module path with defaults, or a site key
    (:attr:`Site.key`: ``path``, ``path:input`` for the module's input, ``#k`` for tuple slot ``k``).

    Examples:
        >>> as_site("model.layers.0") == Site("model.layers.0")
        True
        >>> as_site("model.layers.2:input#1") == Site("model.layers.2", io="input", slot=1)
        True
    """
    if isinstance(value, Site):
        return value
    if isinstance(value, str):
        path, hash_, slot = value.partition("#")
        path, colon, io = path.partition(":")
        if (colon and io != "input") or (hash_ and not slot.isdigit()):
            raise ValueError(f"Site {value!r} is neither a module path nor a site key (path, path:input, path#slot)")
        return Site(path, slot=int(slot) if hash_ else None, io="input" if colon else "output")
    raise TypeError(f"Expected a Site or a module path string, got {type(value).__name__}")


def feature_map_as_tokens(site: Site, h: Tensor) -> str:
    """The message for a token site (layout ``NLC``, the default) whose activation is a 4-D feature map."""
    return (
        f"Site {site.key!r} has layout NLC (tokens), the default of a plain module path, but its activation has "
        f"shape {tuple(h.shape)}, a feature map: give the site its layout (tdsteer.Site({site.path!r}, "
        "layout='NCHW' or 'NHWC')), or take sites from the model's adapter (tdsteer_timm.sites)"
    )


def as_sites(values: SiteLike | Iterable[SiteLike]) -> list[Site]:
    """Normalise one site or many into a list of :class:`Site`, refusing an empty or duplicated list."""
    items = [values] if isinstance(values, (Site, str)) else list(values)
    sites = [as_site(v) for v in items]
    if not sites:
        raise ValueError("No sites given: pass at least one Site or module path")
    keys = [s.key for s in sites]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"Duplicate sites {duplicates}: each site may appear once")
    return sites
