"""Convolutional networks: ResNet, ResNetV2, ConvNeXt, RegNet, EfficientNet, MobileNetV3/V4, GhostNet,
DenseNet, VGG, Inception, TResNet, HRNet. Every site is an ``NCHW`` feature map.

- ResNet (ResNet, ResNeXt, SE-ResNet, ResNet-D...). block: ``layer{k}.{j}``; stage (timm index order):
  ``act1`` (stem), ``layer1..4``.
- ResNetV2. block: ``stages.{s}.blocks.{j}``; stage (timm index order): ``stem.*``, ``stages.{s}``.
- ConvNeXt (V1, V2). block: ``stages.{s}.blocks.{j}``; stage (timm index order): ``stages.{s}``.
- RegNet. block: ``s{k}.b{j}``; stage (timm index order): ``stem``, ``s1..s4``.
- EfficientNet, MobileNetV3 (V3, V4), GhostNet (+ their ``features_only`` classes). block: ``blocks.{s}.{j}``;
  stage (timm index order): ``feature_info`` (stem, then ``blocks.{s}``).
- DenseNet. block: ``features.denseblock{k}``, ``features.transition{k}``; stage (timm index order):
  ``features.norm0``, ``features.denseblock1..3``, ``features.norm5``.
- VGG. block: every ReLU of ``features``; stage (timm index order): ``feature_info`` (the ReLU before each
  pool, and the last pool).
- InceptionV3. block: ``Mixed_*``; stage (timm index order): ``feature_info``.
- InceptionV4. block: ``features.{i}``; stage (timm index order): ``feature_info``.
- InceptionResnetV2. block: ``mixed_*``, ``repeat*.{j}``, ``block8``; stage (timm index order):
  ``feature_info``.
- TResNet. block: ``body.layer{k}.{j}``; stage (timm index order): ``body.conv1`` (stem), ``body.layer1..4``.
- HighResolutionNet (+ HighResolutionNetFeatures). block: ``layer1.{j}``, ``stage{k}.{m}.branches.{b}``; stage
  (timm index order): ``act1``, then ``incre_modules.{b}`` (or ``stage4#{b}`` without them).
"""

from __future__ import annotations

import re

from timm.models.convnext import ConvNeXt
from timm.models.densenet import DenseNet
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from timm.models.ghostnet import GhostNet
from timm.models.hrnet import HighResolutionNet, HighResolutionNetFeatures
from timm.models.inception_resnet_v2 import InceptionResnetV2
from timm.models.inception_v3 import InceptionV3
from timm.models.inception_v4 import InceptionV4
from timm.models.mobilenetv3 import MobileNetV3, MobileNetV3Features
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from timm.models.tresnet import TResNet
from timm.models.vgg import VGG
from torch import nn

from tdsteer_timm.arch import ArchSpec, architecture_for
from tdsteer_timm.build import feature_entries, following_conv_channels


@architecture_for(ResNet)
def _resnet(model: nn.Module) -> ArchSpec:
    return ArchSpec("resnet", r"layer\d+\.\d+", r"layer\d+", "NCHW")


@architecture_for(TResNet)
def _tresnet(model: nn.Module) -> ArchSpec:
    # feature_info lists the model itself ('') for the stem; its output is the stem convolution's
    stages = ("body.conv1", *(f"body.layer{k}" for k in range(1, 5)))
    return ArchSpec("tresnet", r"body\.layer\d+\.\d+", r"body\.layer\d+", "NCHW", stages=stages)


@architecture_for(ResNetV2)
def _resnetv2(model: nn.Module) -> ArchSpec:
    return ArchSpec("resnetv2", r"stages\.\d+\.blocks\.\d+", r"stages\.\d+", "NCHW")


@architecture_for(ConvNeXt)
def _convnext(model: nn.Module) -> ArchSpec:
    return ArchSpec("convnext", r"stages\.\d+\.blocks\.\d+", r"stages\.\d+", "NCHW")


@architecture_for(RegNet)
def _regnet(model: nn.Module) -> ArchSpec:
    return ArchSpec("regnet", r"s\d+\.b\d+", r"s\d+", "NCHW")


@architecture_for(EfficientNet, EfficientNetFeatures, MobileNetV3, MobileNetV3Features)
def _efficientnet(model: nn.Module) -> ArchSpec:
    stages = [str(e["module"]) for e in feature_entries(model)]
    act = getattr(model, "act1", None)
    if stages and stages[0] == "bn1" and isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        stages[0] = "act1"  # MobileNetV3Features: a plain norm, then a separate (in-place) activation
    return ArchSpec("efficientnet", r"blocks\.\d+\.\d+", r"blocks\.\d+", "NCHW", stages=tuple(stages) or None)


@architecture_for(GhostNet)
def _ghostnet(model: nn.Module) -> ArchSpec:
    # a ghost module concatenates its primary and cheap convolutions
    return ArchSpec("ghostnet", r"blocks\.\d+\.\d+", r"blocks\.\d+", "NCHW", channels=following_conv_channels)


def _densenet_channels(model: nn.Module, path: str) -> int:
    module = model.get_submodule(path)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if "transition" in path:
        return convs[-1].out_channels
    # a dense block concatenates its input with every layer's new features
    first_norm = next(m for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    growth = convs[-1].out_channels
    layers = len(list(module.children()))
    return first_norm.num_features + layers * growth


@architecture_for(DenseNet)
def _densenet(model: nn.Module) -> ArchSpec:
    return ArchSpec(
        "densenet",
        r"features\.(denseblock|transition)\d+",
        r"features\.denseblock\d+",
        "NCHW",
        channels=_densenet_channels,
    )


@architecture_for(VGG)
def _vgg(model: nn.Module) -> ArchSpec:
    relus = [
        path for path, module in model.named_modules() if path.startswith("features.") and isinstance(module, nn.ReLU)
    ]
    pattern = "|".join(re.escape(path) for path in relus) or r"features\.\d+"
    return ArchSpec("vgg", pattern, r"features\.\d+", "NCHW", channels=following_conv_channels)


@architecture_for(InceptionV3)
def _inception_v3(model: nn.Module) -> ArchSpec:
    return ArchSpec("inception", r"Mixed_\w+", r"Mixed_\w+", "NCHW", channels=following_conv_channels)


@architecture_for(InceptionV4)
def _inception_v4(model: nn.Module) -> ArchSpec:
    return ArchSpec("inception", r"features\.\d+", r"features\.\d+", "NCHW", channels=following_conv_channels)


@architecture_for(InceptionResnetV2)
def _inception_resnet_v2(model: nn.Module) -> ArchSpec:
    return ArchSpec(
        "inception", r"mixed_\w+|repeat(_\d+)?\.\d+|block8", r"repeat(_\d+)?", "NCHW", channels=following_conv_channels
    )


@architecture_for(HighResolutionNet, HighResolutionNetFeatures)
def _hrnet(model: nn.Module) -> ArchSpec:
    # feature_info names 'stem' and 'stage1..4', which are no modules: index 0 is the first conv's
    # activation, indices 1..4 the branches of the last stage, through the incre modules when present
    branches = int(getattr(model, "num_branches", 4))
    if getattr(model, "incre_modules", None) is not None:
        stages = ("act1", *(f"incre_modules.{b}" for b in range(branches)))
    else:
        stages = ("act1", *(f"stage4#{b}" for b in range(branches)))
    pattern = re.compile(r"layer1\.\d+|stage\d+\.\d+\.branches\.(\d+)")

    def stage_of(path: str) -> int | None:
        found = pattern.fullmatch(path)
        if found is None:
            return None
        return 1 if found.group(1) is None else int(found.group(1)) + 1

    return ArchSpec("hrnet", pattern.pattern, r"incre_modules\.\d+", "NCHW", stages=stages, stage_of=stage_of)
