"""The files of a cache recorded by several ``torch.distributed`` ranks: rank folders and the manifest.

A cache recorded by ``N`` ranks is a folder of ``N`` rank folders, ``rank-00000-of-0000N`` and on,
each a whole one-process cache (its own header, progress, checksums and lock: each rank records and
resumes on its own), and ``manifest.json``, written atomically by rank 0 once every rank finished.
The manifest names the number of ranks, the facts the ranks share (the header of their caches:
model, weights fingerprint, sites, hidden sizes, read position, dtype) and what each rank's cache
held when it was written (rows, examples, data-order hash), so that a reader can tell a finished
recording from one that is still running, was killed, or was appended to since. Rank folders are
named from the rank and the number of ranks, never read from the manifest. Like every header, the
manifest is parsed as untrusted data: its checksum, then every field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdsteer.cache.files import FORMAT, FORMAT_VERSION, MAX_INT, check_header, read_json
from tdsteer.errors import ActivationCacheError
from tdsteer.safe_io import TEMP_SUFFIX, seal_json, short_repr, temp_prefix, unseal_json, write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tdsteer.activation_cache.ranks"
MANIFEST_VERSION = 1
MAX_RANKS = 99999  # five digits in a rank folder's name
SHARED_FIELDS = ("model_type", "model_name", "weights_fingerprint", "sites", "read", "dtype")
_RANK_FOLDER = re.compile(r"rank-(\d{5})-of-(\d{5})")


def rank_folder(rank: int, world_size: int) -> str:
    """The name of rank ``rank``'s cache in a recording by ``world_size`` ranks.

    Examples:
        >>> rank_folder(1, 2)
        'rank-00001-of-00002'
    """
    return f"rank-{rank:05d}-of-{world_size:05d}"


def recorded_world_sizes(path: Path) -> list[int]:
    """The numbers of ranks that the rank folders and manifest in ``path`` were recorded by (sorted)."""
    sizes = set()
    for entry in path.iterdir() if path.is_dir() else ():
        match = _RANK_FOLDER.fullmatch(entry.name)
        if match and entry.is_dir():
            sizes.add(int(match.group(2)))
    if (path / MANIFEST).is_file():
        sizes.add(read_manifest(path).world_size)
    return sorted(sizes)


def holds_only_rank_files(path: Path) -> bool:
    """Whether ``path`` is missing, empty, or holds only rank folders, the manifest and its temporary files."""
    if not path.exists():
        return True
    temps = temp_prefix(path / MANIFEST)
    return all(
        (_RANK_FOLDER.fullmatch(entry.name) and entry.is_dir())
        or entry.name == MANIFEST
        or (entry.name.startswith(temps) and entry.name.endswith(TEMP_SUFFIX))
        for entry in path.iterdir()
    )


@dataclass(frozen=True)
class RankPart:
    """What one rank's cache held when the manifest was written."""

    rows: int
    examples: int
    data_order: str

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "examples": self.examples, "data_order": self.data_order}


@dataclass(frozen=True)
class Manifest:
    """The manifest of a cache recorded by several ranks: their number, shared header and parts."""

    world_size: int
    header: dict[str, Any]  # the header of the ranks' caches, with the data fingerprint of all ranks
    parts: tuple[RankPart, ...]

    def folder(self, path: Path, rank: int) -> Path:
        """Where rank ``rank``'s cache lies under the cache folder ``path``."""
        return path / rank_folder(rank, self.world_size)


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Replace ``manifest.json`` in ``path`` atomically, with its checksum."""
    saved = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "world_size": manifest.world_size,
        "header": manifest.header,
        "ranks": [part.to_dict() for part in manifest.parts],
    }
    write_json(path / MANIFEST, seal_json(saved))


def read_manifest(path: Path) -> Manifest:
    """``manifest.json`` of the cache at ``path``, every field checked.

    Raises:
        ActivationCacheError: Unreadable, a failed checksum, written by a newer tdsteer, or a field of
            the wrong type or out of range.
    """
    where = f"The cache manifest at {str(path / MANIFEST)!r}"
    saved, intact = unseal_json(read_json(path / MANIFEST, "cache manifest"))
    if not intact:
        raise ActivationCacheError(f"{where} fails its checksum: it is corrupted; record the cache again")

    def bad(message: str) -> ActivationCacheError:
        return ActivationCacheError(f"{where} {message}; the cache is damaged: record it again")

    if saved.get("format") != MANIFEST_FORMAT:
        raise bad(f"has format {short_repr(saved.get('format'))}")
    version = saved.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"has a bad format_version {short_repr(version)}")
    if version > MANIFEST_VERSION:
        raise ActivationCacheError(
            f"{where} was written by a newer tdsteer (manifest format {version}, this one reads up to "
            f"{MANIFEST_VERSION}); upgrade tdsteer"
        )
    world = saved.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or not 1 <= world <= MAX_RANKS:
        raise bad(f"has world_size {short_repr(world)}")
    header = saved.get("header")
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise bad(f"has a header that is not a cache header of format {FORMAT_VERSION}")
    check_header(header, where)
    ranks = saved.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != world:
        raise bad(f"has {short_repr(ranks)} as ranks, not a list of {world}")
    return Manifest(world, header, tuple(_part(raw, bad) for raw in ranks))


def _part(raw: Any, bad: Any) -> RankPart:
    if not isinstance(raw, dict):
        raise bad(f"has a bad rank record {short_repr(raw)}")
    rows, examples, order = raw.get("rows"), raw.get("examples"), raw.get("data_order")
    for name, value in (("rows", rows), ("examples", examples)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
            raise bad(f"has a rank with {name} {short_repr(value)}")
    if not isinstance(order, str) or len(order) != 64:
        raise bad(f"has a rank with a bad data hash {short_repr(order)}")
    assert isinstance(rows, int) and isinstance(examples, int)
    return RankPart(rows, examples, order)
