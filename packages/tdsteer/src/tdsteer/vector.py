"""``SteeringVector``: directions per site, their metadata, arithmetic and safetensors files."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tdsteer import control_vectors, formats
from tdsteer._version import __version__
from tdsteer.checks import Check, as_check, report
from tdsteer.errors import SteeringVectorFileError
from tdsteer.formats import is_lm_eval_file
from tdsteer.model_facts import base_model_prefix, model_hidden_size, model_name_of, model_type_of
from tdsteer.sites import Site, SiteLike, as_site, as_sites

FORMAT = formats.FORMAT
FORMAT_VERSION = formats.FORMAT_VERSION


@dataclass
class SteeringVector:
    """Steering directions for one or more sites of one model, with where they came from.

    Args:
        directions: Site key -> tensor ``[C]`` (or ``[L, C]`` per position, from ``actadd``).
        sites: Site key -> :class:`~tdsteer.Site`; defaults to plain module paths.
        metadata: Free-form JSON-compatible record. Extraction fills ``model_name``, ``model_type``,
            ``hidden_sizes``, ``method``, ``read``, ``data_fingerprint``, ``num_examples``,
            ``tdsteer_version`` and ``created``.

    Examples:
        >>> import torch
        >>> v = SteeringVector({"model.layers.3": torch.ones(4)})
        >>> (2 * v - v)["model.layers.3"].tolist()
        [1.0, 1.0, 1.0, 1.0]
        >>> v.normalize()["model.layers.3"].norm().item()
        1.0
    """

    directions: dict[str, Tensor]
    sites: dict[str, Site] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        directions: dict[str, Tensor] = {}
        sites: dict[str, Site] = {}
        for key, tensor in self.directions.items():
            site = self.sites.get(key) if isinstance(key, str) else None
            site = site or as_site(key)
            if not isinstance(tensor, Tensor):
                raise TypeError(f"Direction for site {site.key!r} must be a tensor, got {type(tensor).__name__}")
            if tensor.ndim not in (1, 2):
                raise ValueError(f"Direction for site {site.key!r} must be [C] or [L, C], got {tuple(tensor.shape)}")
            directions[site.key] = tensor.detach()
            sites[site.key] = site
        if not directions:
            raise ValueError("A SteeringVector needs at least one site")
        self.directions = directions
        self.sites = sites
        self.metadata = dict(self.metadata)
        self.metadata.setdefault("hidden_sizes", {k: int(v.shape[-1]) for k, v in directions.items()})
        self.metadata.setdefault("tdsteer_version", __version__)

    # -- mapping-like access ----------------------------------------------------------------------
    def __getitem__(self, key: SiteLike) -> Tensor:
        return self.directions[as_site(key).key if isinstance(key, Site) else key]

    def __contains__(self, key: object) -> bool:
        return (key.key if isinstance(key, Site) else key) in self.directions

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.directions)

    def __len__(self) -> int:
        return len(self.directions)

    def keys(self) -> list[str]:
        """Site keys, in order."""
        return list(self.directions)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.directions.items())
        method = self.metadata.get("method")
        return f"SteeringVector({shapes}{', method=' + repr(method) if method else ''})"

    # -- arithmetic -------------------------------------------------------------------------------
    def _derived(self, directions: dict[str, Tensor], **changes: Any) -> SteeringVector:
        metadata = {**self.metadata, **changes}
        return SteeringVector(directions, dict(self.sites), metadata)

    def _binary(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if set(self.directions) != set(other.directions):
            raise ValueError(
                f"Cannot combine vectors over different sites: {sorted(self.directions)} vs {sorted(other.directions)}; "
                "use .select(sites) first"
            )
        for key in self.directions:
            if self.directions[key].shape != other.directions[key].shape:
                raise ValueError(
                    f"Site {key!r}: shapes differ ({tuple(self.directions[key].shape)} vs "
                    f"{tuple(other.directions[key].shape)})"
                )
        mt_a, mt_b = self.metadata.get("model_type"), other.metadata.get("model_type")
        if mt_a and mt_b and mt_a != mt_b:
            raise ValueError(f"Cannot combine a vector for model type {mt_a!r} with one for {mt_b!r}")
        directions = {k: v + sign * other.directions[k].to(v.dtype) for k, v in self.directions.items()}
        return self._derived(directions, method="combination")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._binary(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._binary(other, -1.0)

    def __mul__(self, factor: float) -> SteeringVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return self._derived({k: v * factor for k, v in self.directions.items()})

    __rmul__ = __mul__

    def __truediv__(self, factor: float) -> SteeringVector:
        return self * (1.0 / factor)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def normalize(self) -> SteeringVector:
        """Each site's direction scaled to unit norm (per position for ``[L, C]`` directions)."""
        return self._derived({k: v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12) for k, v in self.directions.items()})

    def scaled(self, factors: Mapping[SiteLike, float]) -> SteeringVector:
        """Each listed site's direction times its factor (per-layer strengths); other sites as they are.

        Args:
            factors: Site (or key) -> factor.

        Raises:
            KeyError: A listed site is not in this vector.

        Examples:
            >>> import torch
            >>> v = SteeringVector({"h.1": torch.ones(2), "h.2": torch.ones(2)})
            >>> v.scaled({"h.2": 0.5})["h.2"].tolist()
            [0.5, 0.5]
        """
        by_key = {(s.key if isinstance(s, Site) else s): float(f) for s, f in factors.items()}
        missing = sorted(set(by_key) - set(self.directions))
        if missing:
            raise KeyError(f"Sites {missing} are not in this vector; it has {sorted(self.directions)}")
        return self._derived({k: v * by_key.get(k, 1.0) for k, v in self.directions.items()})

    def select(self, sites: SiteLike | Iterable[SiteLike]) -> SteeringVector:
        """A vector with only the given sites (by :class:`Site` or key)."""
        wanted = [s.key if isinstance(s, Site) else s for s in ([sites] if isinstance(sites, (str, Site)) else sites)]
        missing = [k for k in wanted if k not in self.directions]
        if missing:
            raise KeyError(f"Sites {missing} are not in this vector; it has {sorted(self.directions)}")
        metadata = dict(self.metadata)
        if isinstance(metadata.get("hidden_sizes"), dict):
            metadata["hidden_sizes"] = {k: v for k, v in metadata["hidden_sizes"].items() if k in wanted}
        return SteeringVector({k: self.directions[k] for k in wanted}, {k: self.sites[k] for k in wanted}, metadata)

    def to(self, *args: Any, **kwargs: Any) -> SteeringVector:
        """Move or cast every direction (``torch.Tensor.to`` arguments)."""
        return self._derived({k: v.to(*args, **kwargs) for k, v in self.directions.items()})

    # -- checks -----------------------------------------------------------------------------------
    def validate(self, model: nn.Module, *, check: Check = "warn", site_sizes: Mapping[str, int] | None = None) -> None:
        """Check that this vector fits ``model``: the one check before steering, from Python or the command line.

        Every site must resolve to a module; a vector that records the hidden size of the model it
        came from (``model_hidden_size``) must match the model's (:func:`tdsteer.model_facts.model_hidden_size`);
        each direction must have the channels an adapter reports for its site (``site_sizes``); a
        different recorded model type warns, errors or is ignored per ``check``. Each site's size is
        checked again on every steered call, naming the site, the expected and the found size.

        Args:
            model: The model the vector is about to steer.
            check: ``"warn"``, ``"error"`` or ``"ignore"`` for a model-type mismatch.
            site_sizes: Site key -> channels the model has there (an adapter's
                ``describe(model).site_sizes()``); sites not listed are not checked here.

        Raises:
            ValueError: A site does not resolve, a size differs, or (with ``check="error"``) another
                model type.

        Examples:
            >>> import torch
            >>> v = SteeringVector({"0": torch.ones(4)})
            >>> v.validate(torch.nn.Sequential(torch.nn.Linear(4, 4)), site_sizes={"0": 4})
        """
        as_check(check)
        recorded = self.metadata.get("model_type")
        actual = model_type_of(model)
        for site in self.sites.values():
            try:
                site.module(model)
            except ValueError as error:
                if recorded and recorded != actual:
                    raise ValueError(
                        f"This steering vector was made for model type {recorded!r} but the model is {actual!r}: its "
                        f"site {site.key!r} does not exist here; extract a vector for this model"
                    ) from error
                raise
        recorded_size = self.metadata.get("model_hidden_size")
        actual_size = model_hidden_size(model)
        if recorded_size and actual_size and int(recorded_size) != actual_size:
            raise ValueError(
                f"This steering vector comes from a model with hidden size {recorded_size}, but this model has "
                f"hidden size {actual_size}: it was made for another model; extract a vector for this one"
            )
        for key, direction in self.directions.items():
            size = (site_sizes or {}).get(key)
            if size is not None and int(direction.shape[-1]) != size:
                raise ValueError(
                    f"This steering vector has hidden size {int(direction.shape[-1])} at site {key!r} but the model's "
                    f"hidden size there is {size}: the vector was made for another model"
                )
        if recorded and recorded != actual:
            report(
                check,
                f"This steering vector was made for model type {recorded!r} but the model is {actual!r}; "
                "pass check='ignore' (--check ignore) if that is intended",
                stacklevel=4,
            )

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save as safetensors, with the sites and metadata as JSON in the file header.

        The file is written atomically (a temporary file beside ``path``, renamed over it), and
        carries a CRC-32 of its header and of each tensor, checked by :meth:`load`.

        Args:
            path: Destination ``.safetensors`` file; its folder is created when missing.

        Returns:
            The path written.

        Raises:
            ValueError: A direction holds NaN or infinite values (nothing is written).

        Examples:
            >>> import tempfile, torch
            >>> v = SteeringVector({"h.0": torch.arange(3.0)}, metadata={"method": "mean_diff"})
            >>> p = v.save(tempfile.mkdtemp() + "/v.safetensors")
            >>> SteeringVector.load(p).metadata["method"]
            'mean_diff'
        """
        return formats.save_safetensors(self.directions, self.sites, self.metadata, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SteeringVector:
        """Load a vector saved by :meth:`save`.

        The file is read as data: its header is checked field by field, and the checksums of
        files written since tdsteer's format 2 are verified (older files have none and load
        without the check).

        Args:
            path: The ``.safetensors`` file.
            device: Where the directions go.

        Returns:
            The vector.

        Raises:
            SteeringVectorFileError: The file is missing, truncated, corrupted (a failed checksum),
                not a tdsteer file, or holds NaN or infinite directions.
        """
        directions, sites, metadata = formats.load_safetensors(path)
        try:
            return cls({k: v.to(device) for k, v in directions.items()}, sites, metadata)
        except (TypeError, ValueError) as error:
            raise SteeringVectorFileError(f"{str(path)!r} does not describe a steering vector: {error}") from None

    # -- interchange ------------------------------------------------------------------------------
    def to_lm_eval(
        self, path: str | os.PathLike[str], *, scale: float = 1.0, action: str = "add", prefix: str | None = None
    ) -> Path:
        """Export to lm-eval's ``steered`` ``.pt`` format.

        Args:
            path: Destination ``.pt`` file.
            scale: ``steering_coefficient`` (for ``action="clamp"``: the projection value).
            action: ``"add"`` or ``"clamp"``.
            prefix: Path of ``model.base_model`` inside the model the sites refer to (lm-eval names
                hookpoints relative to it: ``"transformer"`` for GPT-2, ``"model"`` for Llama).
                Default: the path extraction recorded (``metadata["base_model_path"]``); a vector
                without that record warns and keeps its site paths whole.

        Returns:
            The path written (atomically: the previous file stays whole if writing fails).

        Raises:
            ValueError: A site lm-eval cannot name, or a NaN or infinite direction or scale.

        Examples:
            >>> import tempfile, torch
            >>> v = SteeringVector({"transformer.h.3": torch.ones(4)}, metadata={"base_model_path": "transformer"})
            >>> path = v.to_lm_eval(tempfile.mkdtemp() + "/v.pt")
            >>> list(torch.load(path))  # lm-eval's hookpoint, relative to model.base_model
            ['h.3']
        """
        if prefix is None:
            recorded = self.metadata.get("base_model_path")
            if recorded is None:
                warnings.warn(
                    "This vector does not record the path of its model's base model, so its site paths are written "
                    "as lm-eval hookpoints whole; lm-eval names them relative to model.base_model: pass prefix= "
                    "('transformer' for GPT-2, 'model' for Llama)",
                    UserWarning,
                    stacklevel=2,
                )
            prefix = str(recorded or "")
        return formats.save_lm_eval(self.directions, self.sites, path, scale=scale, action=action, prefix=prefix)

    @classmethod
    def from_lm_eval(cls, path: str | os.PathLike[str], *, prefix: str = "") -> SteeringVector:
        """Import lm-eval's ``steered`` ``.pt`` format (read as data: a pickle that would run code is refused).

        Args:
            path: The ``.pt`` file.
            prefix: Path of ``model.base_model``, prepended to the hookpoints to make site paths.

        Raises:
            SteeringVectorFileError: Not a readable file, entries tdsteer cannot represent, or NaN
                or infinite directions.
        """
        return cls(*formats.load_lm_eval(path, prefix=prefix))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], *, path_template: str, layout: str = "NLC") -> SteeringVector:
        """Import a llama.cpp GGUF control vector; needs ``tdsteer[gguf]``.

        Args:
            path: The ``.gguf`` file.
            path_template: Site path of block ``i`` with ``{i}``, e.g. ``"model.layers.{i}"``.
            layout: Layout of the sites.

        Raises:
            SteeringVectorFileError: Not a readable GGUF file, no ``direction.N`` tensors, quantized
                directions, or NaN or infinite values.
        """
        return cls(*control_vectors.load_gguf(path, path_template=path_template, layout=layout))

    def to_gguf(
        self,
        path: str | os.PathLike[str],
        *,
        layer_of: Mapping[str, int] | Callable[[str], int] | None = None,
        model_hint: str | None = None,
    ) -> Path:
        """Export to a llama.cpp GGUF control vector; needs ``tdsteer[gguf]``.

        llama.cpp adds ``direction.{i}`` to the output of block ``i`` (``i >= 1``): the sites should
        be block outputs (``resid_post``); a block's input (``resid_pre``, ``model.layers.i:input``) is
        the output of block ``i - 1`` and is written as such.

        Args:
            path: Destination ``.gguf`` file.
            layer_of: The ``direction`` index of each site; default: the trailing number of the site
                path (less one for a block's input).
            model_hint: ``controlvector.model_hint`` (default: the recorded model type).

        Returns:
            The path written (atomically: the previous file stays whole if writing fails).

        Raises:
            ValueError: A direction that is not ``[C]``, two sites on one layer, a site at
                ``direction.0`` (llama.cpp refuses it: the output of block 0 cannot be steered there),
                or a NaN or infinite direction.
        """
        hint = model_hint or self.metadata.get("model_type")
        return control_vectors.save_gguf(
            self.directions, path, sites=self.sites, layer_of=layer_of, model_hint=str(hint) if hint else None
        )


def make_metadata(
    model: nn.Module | None,
    directions: Mapping[str, Tensor],
    *,
    method: str,
    read: object,
    fingerprint: str | None,
    num_examples: int,
    model_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata record extraction attaches to a vector."""
    return {
        "model_name": model_name or (model_name_of(model) if model is not None else None),
        "model_type": model_type_of(model) if model is not None else None,
        "model_hidden_size": model_hidden_size(model) if model is not None else None,
        "hidden_sizes": {k: int(v.shape[-1]) for k, v in directions.items()},
        "base_model_path": base_model_prefix(model) if model is not None else None,
        "method": method,
        "read": read if isinstance(read, (str, int)) or read is None else repr(read),
        "data_fingerprint": fingerprint,
        "num_examples": num_examples,
        "tdsteer_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(dict(extra) if extra else {}),
    }


def vector_from_sites(
    directions: Mapping[SiteLike, Tensor] | Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> SteeringVector:
    """Build a vector from ``{Site or path: tensor}``."""
    sites = as_sites(list(directions))
    return SteeringVector(
        {s.key: t for s, t in zip(sites, directions.values(), strict=True)},
        {s.key: s for s in sites},
        dict(metadata or {}),
    )


VectorSource = SteeringVector | str | os.PathLike[str] | Mapping[str, Tensor]


def as_vector(vector: VectorSource, model: nn.Module | None = None) -> SteeringVector:
    """Return ``vector`` as a :class:`SteeringVector`: the one way every package loads a vector.

    Args:
        vector: A :class:`SteeringVector`, the path of a tdsteer ``.safetensors`` file (``~``
            expanded), the path of an lm-eval ``steered`` ``.pt`` file, or a mapping
            ``{site path: tensor}``.
        model: For a ``.pt`` file: the model, whose :func:`base_model_prefix` turns lm-eval's
            hookpoints into site paths (without it the hookpoints are used as they are).

    Returns:
        The steering vector (on the CPU when read from a file).

    Raises:
        SteeringVectorFileError: The file is missing or is not a vector file.
        TypeError: ``vector`` is none of the accepted types.

    Examples:
        >>> import torch
        >>> as_vector({"transformer.h.0": torch.ones(4)}).keys()
        ['transformer.h.0']
    """
    if isinstance(vector, SteeringVector):
        return vector
    if isinstance(vector, (str, os.PathLike)):
        path = Path(vector).expanduser()
        if is_lm_eval_file(path):
            return SteeringVector.from_lm_eval(path, prefix=base_model_prefix(model) if model is not None else "")
        return SteeringVector.load(path)
    if isinstance(vector, Mapping):
        return vector_from_sites({key: value for key, value in vector.items()})
    raise TypeError(
        f"vector must be a tdsteer.SteeringVector, the path of a .safetensors or lm-eval .pt file, or a mapping "
        f"{{site path: tensor}}; got {type(vector).__name__}"
    )
