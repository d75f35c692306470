"""The fallback for unregistered classes: a guess from ``model.feature_info``, checked by one forward pass.

The modules that ``feature_info`` lists become the blocks and the stages. Where the model has timm's
``forward_intermediates`` (every timm model does), one call on a dummy input, with hooks on those
modules, confirms the guess: each module's output must be timm's intermediate of the same index,
read with a layout (``NCHW``, ``NHWC``, or ``NLC`` with ``p`` leading prefix tokens). That check
measures the layout and the prefix-token count rather than trusting ``num_prefix_tokens`` (CaiT and
XCiT add their class token after the blocks). A guess that the check cannot confirm is refused with
the reason (:class:`Refusal`), never returned.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import FeatureHookNet
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

from tdsteer import Site
from tdsteer.adapter import ModelDescription, SiteInfo
from tdsteer_timm.arch import Layout
from tdsteer_timm.build import describe_sites, feature_entries, last_width

FALLBACK = "feature_info"

Reference = Callable[[Tensor], Mapping[int, Tensor]]


class Refusal(Exception):
    """The fallback cannot place the model; ``str(refusal)`` says why."""


@dataclass(frozen=True)
class Guess:
    """What the fallback found: the description, a sentence for the warning, and the class token."""

    description: ModelDescription
    summary: str
    class_token: bool


_CACHE: weakref.WeakKeyDictionary[nn.Module, Guess | Refusal] = weakref.WeakKeyDictionary()


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5))


def match_layout(output: Tensor, reference: Tensor) -> tuple[Layout, int] | None:
    """The layout (and prefix-token count) under which ``output`` is ``reference``, or ``None``.

    ``reference`` is timm's intermediate (``NCHW``, or ``NLC`` for models that return tokens).

    Examples:
        >>> import torch
        >>> ref = torch.randn(1, 4, 2, 3)
        >>> tokens = torch.cat([torch.zeros(1, 1, 4), ref.flatten(2).transpose(1, 2)], 1)
        >>> match_layout(ref, ref), match_layout(ref.permute(0, 2, 3, 1), ref), match_layout(tokens, ref)
        (('NCHW', 0), ('NHWC', 0), ('NLC', 1))
    """
    if reference.ndim == 3:
        return ("NLC", 0) if _close(output, reference) else None
    if reference.ndim != 4:
        return None
    batch, channels, height, width = reference.shape
    if output.ndim == 4:
        if _close(output, reference):
            return "NCHW", 0
        if _close(output.permute(0, 3, 1, 2), reference):
            return "NHWC", 0
        return None
    if output.ndim == 3 and output.shape[0] == batch and output.shape[2] == channels:
        prefix = output.shape[1] - height * width
        if prefix >= 0 and _close(output[:, prefix:].transpose(1, 2).reshape(reference.shape), reference):
            return "NLC", prefix
    return None


def input_channels(model: nn.Module) -> int:
    """The channels of the images ``model`` takes: its ``in_chans`` (or that of the timm model a
    ``features_only`` wrapper holds), else the ``in_channels`` of its first convolution, else
    ``pretrained_cfg["input_size"]``'s, else 3.

    ``pretrained_cfg`` comes last: ``timm.create_model(..., in_chans=1)`` keeps its
    ``input_size`` of ``(3, H, W)``.

    Examples:
        >>> import timm
        >>> input_channels(timm.create_model("resnet10t", pretrained=False, in_chans=1))
        1
        >>> input_channels(timm.create_model("resnet10t", pretrained=False, in_chans=1, features_only=True))
        1
    """
    holders = [model]
    if isinstance(model, FeatureGetterNet):
        holders.append(model.model)
    elif isinstance(model, FeatureHookNet) and "body" in model:
        holders.append(model["body"])
    for holder in holders:
        chans = getattr(holder, "in_chans", None)
        if isinstance(chans, int) and not isinstance(chans, bool) and chans > 0:
            return chans
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None:
        return int(conv.in_channels)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    return int(size[0]) if isinstance(size, (tuple, list)) and len(size) == 3 else 3


def dummy_sizes(model: nn.Module) -> list[tuple[int, int, int]]:
    """Input sizes ``(C, H, W)`` to try, best first: the first ``img_size`` a module records (a patch
    embedding's), ``pretrained_cfg``'s, then 224 and a few common sizes (a model built for another
    size, like LeViT, records none). ``C`` is always :func:`input_channels`.

    Examples:
        >>> import timm
        >>> dummy_sizes(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1))[:2]
        [(3, 64, 64), (3, 224, 224)]
        >>> dummy_sizes(timm.create_model("starnet_s050", pretrained=False, in_chans=1))[:2]
        [(1, 224, 224), (1, 64, 64)]
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    chans = input_channels(model)
    found: list[tuple[int, int, int]] = []
    recorded = next((m.img_size for m in model.modules() if getattr(m, "img_size", None) is not None), None)
    if isinstance(recorded, int):
        recorded = (recorded, recorded)
    if isinstance(recorded, (tuple, list)) and len(recorded) == 2:
        found.append((chans, int(recorded[0]), int(recorded[1])))
    if size and len(size) == 3:
        found.append((chans, int(size[1]), int(size[2])))
    found += [(chans, side, side) for side in (224, 64, 32, 256, 384)]
    return list(dict.fromkeys(found))


def _parameter(model: nn.Module) -> Tensor | None:
    return next((p for p in model.parameters() if p.is_floating_point()), None)


def intermediates_reference(model: nn.Module) -> Reference:
    """timm's ``forward_intermediates`` (every index) as a reference."""

    def reference(x: Tensor) -> Mapping[int, Tensor]:
        found = model.forward_intermediates(x, intermediates_only=True)  # type: ignore[operator]
        return dict(enumerate(found))

    return reference


def _captured(model: nn.Module, paths: Sequence[str], x: Tensor, reference: Reference) -> tuple[dict[str, Any], Any]:
    modules = dict(model.named_modules())
    seen: dict[str, Any] = {}
    handles = [
        modules[path].register_forward_hook(lambda m, a, out, path=path: seen.setdefault(path, out))
        for path in dict.fromkeys(paths)
    ]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            found = reference(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return seen, found


def _run(model: nn.Module, paths: Sequence[str], reference: Reference) -> tuple[dict[str, Any], Any, tuple[int, ...]]:
    parameter = _parameter(model)
    if parameter is not None and parameter.device.type == "meta":
        raise Refusal("its parameters are on the meta device, so the guess cannot be checked by a forward pass")
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    errors = []
    for size in dummy_sizes(model):
        x = torch.randn(1, *size, device=device, dtype=dtype)
        try:
            seen, found = _captured(model, paths, x, reference)
        except Exception as error:  # noqa: BLE001 - any failure of the model's own forward: try the next size
            errors.append(f"{tuple(x.shape)}: {type(error).__name__}: {error}")
            continue
        return seen, found, tuple(x.shape)
    raise Refusal(f"the check's forward pass failed on every dummy input ({'; '.join(errors)})")


def _channels_layout(output: Tensor, num_chs: Any) -> Layout | None:
    """For a stage the reference does not return: the layout its shape and ``num_chs`` imply."""
    if output.ndim != 4 or not isinstance(num_chs, int):
        return None
    first, last = output.shape[1] == num_chs, output.shape[-1] == num_chs
    if first != last:
        return "NCHW" if first else "NHWC"
    return None


def _tensors(output: Any) -> list[tuple[int | None, Tensor]]:
    """The tensors a module returned, with their slot: ``None`` for a lone tensor, ``k`` in a tuple or list."""
    if isinstance(output, Tensor):
        return [(None, output)]
    if isinstance(output, (tuple, list)):
        return [(slot, item) for slot, item in enumerate(output) if isinstance(item, Tensor)]
    return []


Checked = tuple[int | None, Layout, int, int]


def _checked(
    model: nn.Module, paths: Sequence[str], labels: Sequence[str], reference: Reference, *, complete: bool
) -> Iterator[Checked]:
    """(slot, layout, prefix tokens, channels) of each listed module, from one forward pass.

    A module that returns several tensors (a tuple, or CrossViT's list of branches, listed once per
    branch) is matched slot by slot; each listing of the same module takes a slot of its own.
    """
    entries = feature_entries(model)
    seen, found, shape = _run(model, paths, reference)
    if set(found) - set(range(len(paths))) or (complete and len(found) != len(paths)):
        raise Refusal(
            f"forward_intermediates returned {len(found)} intermediates but model.feature_info lists {len(paths)} "
            "modules, so they cannot be paired by index"
        )
    taken: dict[str, set[int | None]] = {}
    for index, path in enumerate(paths):
        if path not in seen:
            raise Refusal(f"{labels[index]!r} did not run in the check's forward pass")
        candidates = [(slot, t) for slot, t in _tensors(seen[path]) if slot not in taken.get(path, set())]
        if not candidates:
            raise Refusal(f"{labels[index]!r} returns a {type(seen[path]).__name__}, with no tensor left to match")
        matched: tuple[int | None, Layout, int, Tensor] | None = None
        if index in found:
            for slot, output in candidates:
                layout_prefix = match_layout(output, found[index])
                if layout_prefix is not None:
                    matched = (slot, *layout_prefix, output)
                    break
            if matched is None:
                shapes = ", ".join(str(tuple(t.shape)) for _, t in candidates)
                raise Refusal(
                    f"the output of {labels[index]!r} ({shapes}) is not timm's intermediate {index} "
                    f"{tuple(found[index].shape)} under any layout (NCHW, NHWC, NLC with leading prefix tokens), "
                    f"checked on a dummy input of shape {shape}"
                )
        else:
            num_chs = entries[index].get("num_chs") if index < len(entries) else None
            slot, output = candidates[0]
            guessed = _channels_layout(output, num_chs) if len(candidates) == 1 else None
            if guessed is None:
                raise Refusal(f"the layout of {labels[index]!r} cannot be confirmed: no reference for index {index}")
            matched = (slot, guessed, 0, output)
        slot, layout, prefix, output = matched
        taken.setdefault(path, set()).add(slot)
        yield slot, layout, prefix, int(output.shape[1] if layout == "NCHW" else output.shape[-1])


def feature_paths(
    model: nn.Module, translate: Callable[[str], str | None] | None = None
) -> tuple[list[str], list[str]]:
    """The module paths of ``model.feature_info`` (and the names it gives them), cut where a pruned
    model's modules end.

    Raises:
        Refusal: No feature_info, or a name that is no module.
    """
    entries = feature_entries(model)
    if not entries:
        raise Refusal("it has no usable model.feature_info to guess its stages from")
    names = [str(e["module"]) for e in entries]
    if "" in names:
        raise Refusal("model.feature_info lists the model itself ('') as a feature module")
    modules = dict(model.named_modules())
    paths = [(translate(name) if translate else name) for name in names]
    present = [path is not None and path in modules for path in paths]
    if not present[0] or (False in present and any(present[present.index(False) :])):
        missing = [name for name, ok in zip(names, present) if not ok]
        raise Refusal(
            f"model.feature_info names {missing[0]!r}, which is not a module of {type(model).__name__} (like Twins' "
            "'block.N' or HRNet's 'stage1'); register the class with explicit stages"
        )
    kept = present.index(False) if False in present else len(paths)
    return [str(path) for path in paths[:kept]], names[:kept]


def _class_token(model: nn.Module) -> bool:
    flag = getattr(model, "has_class_token", None)
    if isinstance(flag, bool):
        return flag
    return getattr(model, "cls_token", None) is not None


def guess(
    model: nn.Module,
    *,
    translate: Callable[[str], str | None] | None = None,
    reference: Reference | None = None,
) -> Guess:
    """Place an unregistered model from its ``feature_info``, confirmed by one forward pass.

    Args:
        model: The model.
        translate: Maps a ``feature_info`` module name to its path in ``model`` (``FeatureListNet``
            flattens ``stages.0`` into ``stages_0``), or ``None`` where it has none.
        reference: ``fn(x) -> {index: intermediate}``; default: ``model.forward_intermediates``.
            Without either, the guess is made from the model's attributes and not checked.

    Returns:
        The :class:`Guess` (cached per model instance).

    Raises:
        Refusal: The guess cannot be confirmed; the message says why.
    """
    cached = _CACHE.get(model)
    if cached is None:
        try:
            cached = _guess(model, translate, reference)
        except Refusal as refusal:
            cached = refusal
        _CACHE[model] = cached
    if isinstance(cached, Refusal):
        raise cached
    return cached


def _unchecked(model: nn.Module, paths: Sequence[str], labels: Sequence[str]) -> list[Checked]:
    """The guess without a check: layout from the model's attributes, channels from feature_info."""
    if len(set(paths)) != len(paths):
        raise Refusal(
            "model.feature_info lists a module more than once, and without forward_intermediates the "
            "outputs cannot be told apart"
        )
    layout: Layout = "NHWC" if getattr(model, "output_fmt", None) == "NHWC" else "NCHW"
    if hasattr(model, "num_prefix_tokens"):
        layout = "NLC"
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if layout == "NLC" else 0
    modules = dict(model.named_modules())
    records: list[Checked] = []
    for index, (path, entry) in enumerate(zip(paths, feature_entries(model))):
        chs = entry.get("num_chs")
        chs = chs if isinstance(chs, int) else last_width(modules[path])
        if chs is None:
            raise Refusal(f"model.feature_info gives no num_chs for {labels[index]!r}")
        records.append((None, layout, prefix, int(chs)))
    return records


def _guess(model: nn.Module, translate: Callable[[str], str | None] | None, reference: Reference | None) -> Guess:
    paths, labels = feature_paths(model, translate)
    complete = reference is None
    if reference is None and callable(getattr(model, "forward_intermediates", None)):
        reference = intermediates_reference(model)
    span = f"{len(paths)} modules listed in model.feature_info ({paths[0]!r} .. {paths[-1]!r})"
    if reference is None:
        records = _unchecked(model, paths, labels)
        layout = records[0][1]
        summary = (
            f"its blocks and stages are the {span}, {layout} (not checked: the model has no forward_intermediates)"
        )
    else:
        records = list(_checked(model, paths, labels, reference, complete=complete))
        layouts = sorted(
            {f"{layout} with {prefix} prefix tokens" if layout == "NLC" else layout for _, layout, prefix, _ in records}
        )
        check = "one forward_intermediates call" if complete else "one forward pass of the feature wrapper"
        summary = f"its blocks and stages are the {span}, {' / '.join(layouts)}, as {check} confirmed"
        declared = getattr(model, "num_prefix_tokens", None)
        measured = {prefix for _, layout, prefix, _ in records if layout == "NLC"}
        if isinstance(declared, int) and measured and measured != {declared}:
            summary += f" (model.num_prefix_tokens is {declared}, but the sequences there carry {min(measured)})"
    sites = [
        (Site(path, slot=slot, layout=layout, prefix_tokens=prefix), chs, index)
        for index, (path, (slot, layout, prefix, chs)) in enumerate(zip(paths, records))
    ]
    blocks = [SiteInfo("block", index, site, chs, index) for site, chs, index in sites]
    stages = [SiteInfo("stage", index, site, chs, index) for site, chs, index in sites]
    description = describe_sites(model, FALLBACK, blocks, stages, source=FALLBACK, guessed=True)
    has_cls = _class_token(model) and any(site.prefix_tokens > 0 for site, _, _ in sites)
    return Guess(description, summary, has_cls)
