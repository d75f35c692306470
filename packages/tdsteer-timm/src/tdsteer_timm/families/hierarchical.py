"""Hierarchical vision transformers and hybrids: Swin, MaxViT/CoAtNet, MetaFormer, MobileViT, FastViT,
EdgeNeXt, EfficientViT, PVTv2, Twins, DaViT.

- SwinTransformer, SwinTransformerV2. block: ``layers.{s}.blocks.{j}``; stage (timm index order):
  ``layers.{s}``; layout: NHWC.
- SwinTransformerV2Cr. block: ``stages.{s}.blocks.{j}`` (NHWC); stage (timm index order): ``stages.{s}``;
  layout: NCHW.
- MaxxVit (MaxViT, CoAtNet, MaxxViT). block: ``stages.{s}.blocks.{j}``; stage (timm index order): ``stem``,
  ``stages.{s}``; layout: NCHW.
- MetaFormer (PoolFormer, ConvFormer, CAFormer). block: ``stages.{s}.blocks.{j}`` (NLC in attention stages);
  stage (timm index order): ``stages.{s}``; layout: NCHW.
- ByobNet (MobileViT, MobileViTv2, RepVGG, GENet...). block: ``stages.{s}.{j}``; stage (timm index order):
  ``feature_info`` (``stages.{s}``, ``final_conv``); layout: NCHW.
- FastVit, EdgeNeXt, EfficientVit, EfficientVitLarge, EfficientVitMsra, DaVit. block:
  ``stages.{s}.blocks.{j}``; stage (timm index order): ``stages.{s}``; layout: NCHW.
- PyramidVisionTransformerV2. block: ``stages.{s}.blocks.{j}`` (NLC, 0 prefix); stage (timm index order):
  ``stages.{s}``; layout: NCHW.
- Twins. block: ``blocks.{s}.{j}``; stage (timm index order): the last block of each ``blocks.{s}``
  (``pos_block.{s}`` for a one-block stage); layout: NLC, 0 prefix.
"""

from __future__ import annotations

import re

from timm.models.byobnet import ByobNet
from timm.models.davit import DaVit
from timm.models.edgenext import EdgeNeXt
from timm.models.efficientvit_mit import EfficientVit, EfficientVitLarge
from timm.models.efficientvit_msra import EfficientVitMsra
from timm.models.fastvit import FastVit
from timm.models.maxxvit import MaxxVit
from timm.models.metaformer import MetaFormer
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
from timm.models.twins import Twins
from torch import nn

from tdsteer_timm.arch import ArchSpec, Layout, architecture_for

_STAGE_BLOCKS = r"stages\.\d+\.blocks\.\d+"
_STAGES = r"stages\.\d+"


@architecture_for(SwinTransformer, SwinTransformerV2)
def _swin(model: nn.Module) -> ArchSpec:
    return ArchSpec("swin", r"layers\.\d+\.blocks\.\d+", r"layers\.\d+", "NHWC")


@architecture_for(SwinTransformerV2Cr)
def _swin_cr(model: nn.Module) -> ArchSpec:
    # the blocks work channels-last; each stage permutes its output back to NCHW
    return ArchSpec("swin_cr", _STAGE_BLOCKS, _STAGES, "NHWC", stage_layout="NCHW")


@architecture_for(MetaFormer)
def _metaformer(model: nn.Module) -> ArchSpec:
    # attention stages (CAFormer's last two) flatten the map into tokens around their blocks
    tokens: dict[str, Layout] = {
        path: "NLC"
        for path, module in model.named_modules()
        if path.count(".") == 1 and path.startswith("stages.") and getattr(module, "use_nchw", True) is False
    }
    return ArchSpec("metaformer", _STAGE_BLOCKS, _STAGES, "NCHW", block_layouts=tokens)


@architecture_for(MaxxVit)
def _maxxvit(model: nn.Module) -> ArchSpec:
    return ArchSpec("maxxvit", _STAGE_BLOCKS, _STAGES, "NCHW")


@architecture_for(ByobNet)
def _byobnet(model: nn.Module) -> ArchSpec:
    return ArchSpec("byobnet", r"stages\.\d+\.\d+", _STAGES, "NCHW")


@architecture_for(FastVit, EdgeNeXt, EfficientVit, EfficientVitLarge, EfficientVitMsra, DaVit)
def _stages_of_blocks(model: nn.Module) -> ArchSpec:
    family = {
        "FastVit": "fastvit",
        "EdgeNeXt": "edgenext",
        "DaVit": "davit",
        "EfficientVitMsra": "efficientvit_msra",
    }.get(type(model).__name__, "efficientvit")
    return ArchSpec(family, _STAGE_BLOCKS, _STAGES, "NCHW")


@architecture_for(PyramidVisionTransformerV2)
def _pvt_v2(model: nn.Module) -> ArchSpec:
    # blocks see (B, H*W, C) tokens; each stage reshapes its output into a map
    return ArchSpec("pvt_v2", _STAGE_BLOCKS, _STAGES, "NLC", stage_layout="NCHW")


@architecture_for(Twins)
def _twins(model: nn.Module) -> ArchSpec:
    # feature_info names 'block.{s}', which is no module: a stage ends with its last block, or with
    # the position convolution that follows its first block when that is its only one
    modules = dict(model.named_modules())
    stages = []
    for index in range(len(model.blocks)):  # type: ignore[arg-type]
        depth = len(modules[f"blocks.{index}"])  # type: ignore[arg-type]
        single = depth == 1 and f"pos_block.{index}" in modules
        stages.append(f"pos_block.{index}" if single else f"blocks.{index}.{depth - 1}")

    def stage_of(path: str) -> int | None:
        found = re.fullmatch(r"blocks\.(\d+)\.\d+", path)
        return int(found.group(1)) if found else None

    return ArchSpec("twins", r"blocks\.\d+\.\d+", r"blocks\.\d+\.\d+", "NLC", stages=tuple(stages), stage_of=stage_of)
