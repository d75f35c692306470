"""Token models: ViT and its variants, Eva, BEiT, CaiT, XCiT, CrossViT, MLP-Mixer, Hiera, LeViT, MViTv2.

- VisionTransformer (ViT, DeiT3, FlexiViT, SigLIP, registers, hybrids), VisionTransformerDistilled (DeiT),
  Eva, Beit. block: ``blocks.{i}``; stage (timm index order): every block; layout: NLC; prefix tokens:
  ``num_prefix_tokens``.
- Cait, Xcit. block: ``blocks.{i}``; stage (timm index order): every block; layout: NLC; prefix tokens: 0 (the
  class token joins after ``blocks``).
- CrossVit. block: ``blocks.{i}.blocks.{b}.{j}``; stage (timm index order): ``blocks.{i}#{b}``: branch 0 of
  every block, then branch 1; layout: NLC; prefix tokens: 1.
- MlpMixer (Mixer, ResMLP, gMLP). block: ``blocks.{i}``; stage (timm index order): every block; layout: NLC;
  prefix tokens: 0.
- Hiera. block: ``blocks.{i}``; stage (timm index order): the last block of each stage; layout: NLC, tokens in
  mask-unit order; prefix tokens: 0.
- Levit, LevitDistilled. block: ``stages.{s}.blocks.{j}``; stage (timm index order): ``stages.{s}``; layout:
  NLC (``NCHW`` for ``levit_conv_*``); prefix tokens: 0.
- MultiScaleVit (MViTv2). block: ``stages.{s}.blocks.{j}``; stage (timm index order): ``stages.{s}``; layout:
  NLC; prefix tokens: ``num_prefix_tokens`` (1 for ``*_cls``).
"""

from __future__ import annotations

import re

from timm.models.beit import Beit
from timm.models.cait import Cait
from timm.models.crossvit import CrossVit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.hiera import Hiera
from timm.models.levit import Levit, LevitDistilled
from timm.models.mlp_mixer import MlpMixer
from timm.models.mvitv2 import MultiScaleVit
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import Xcit
from torch import nn

from tdsteer_timm.arch import ArchSpec, Layout, architecture_for

_BLOCKS = r"blocks\.\d+"


def class_token(model: nn.Module) -> bool:
    """Whether a ViT-style model puts a class token first (``False`` for SigLIP-style and register-only ViTs).

    Examples:
        >>> import timm
        >>> class_token(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1))
        True
    """
    flag = getattr(model, "has_class_token", None)
    if isinstance(flag, bool):
        return flag
    return getattr(model, "cls_token", None) is not None


@architecture_for(VisionTransformer, VisionTransformerDistilled, Eva, Beit)
def _vit(model: nn.Module) -> ArchSpec:
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return ArchSpec("vit", _BLOCKS, _BLOCKS, "NLC", prefix_tokens=prefix, class_token=class_token(model) and prefix > 0)


@architecture_for(Cait, Xcit)
def _class_attention(model: nn.Module) -> ArchSpec:
    # the class token is concatenated after `blocks`, for the class-attention blocks only
    return ArchSpec("class_attention", _BLOCKS, _BLOCKS, "NLC", prefix_tokens=0)


@architecture_for(CrossVit)
def _crossvit(model: nn.Module) -> ArchSpec:
    depth = len(model.blocks)  # type: ignore[arg-type]
    branches = int(getattr(model, "num_branches", 2))
    # each multi-scale block returns one sequence per branch; timm lists branch 0 of every block first
    stages = tuple(f"blocks.{i}#{b}" for b in range(branches) for i in range(depth))
    pattern = re.compile(r"blocks\.(\d+)\.blocks\.(\d+)\.\d+")

    def stage_of(path: str) -> int | None:
        found = pattern.fullmatch(path)
        return int(found.group(2)) * depth + int(found.group(1)) if found else None

    return ArchSpec(
        "crossvit",
        pattern.pattern,
        _BLOCKS,
        "NLC",
        prefix_tokens=1,
        stages=stages,
        stage_of=stage_of,
        class_token=True,
    )


@architecture_for(MlpMixer)
def _mixer(model: nn.Module) -> ArchSpec:
    return ArchSpec("mlp_mixer", _BLOCKS, _BLOCKS, "NLC")


@architecture_for(Hiera)
def _hiera(model: nn.Module) -> ArchSpec:
    # tokens stay in Hiera's mask-unit order inside the blocks; timm re-rolls them into a map for its intermediates
    return ArchSpec("hiera", _BLOCKS, _BLOCKS, "NLC")


@architecture_for(Levit, LevitDistilled)
def _levit(model: nn.Module) -> ArchSpec:
    layout: Layout = "NCHW" if getattr(model, "use_conv", False) else "NLC"
    return ArchSpec("levit", r"stages\.\d+\.blocks\.\d+", r"stages\.\d+", layout)


@architecture_for(MultiScaleVit)
def _mvitv2(model: nn.Module) -> ArchSpec:
    # feature_info names 'block.{s}', which is no module: the stages are the stage modules
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    return ArchSpec(
        "mvitv2",
        r"stages\.\d+\.blocks\.\d+",
        r"stages\.\d+",
        "NLC",
        prefix_tokens=prefix,
        stages_from_feature_info=False,
        class_token=prefix > 0,
    )
