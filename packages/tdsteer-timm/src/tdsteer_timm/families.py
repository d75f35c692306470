"""Built-in architecture families: the module paths of timm's model classes (timm 1.0).

| class | block | stage | layout |
|---|---|---|---|
| VisionTransformer (ViT, DeiT), Eva, Beit | ``blocks.{i}`` | same as blocks | NLC, ``num_prefix_tokens`` |
| ResNet | ``layer{k}.{j}`` | ``layer1..4`` | NCHW |
| ConvNeXt | ``stages.{s}.blocks.{j}`` | ``stages.{s}`` | NCHW |
| SwinTransformer, SwinTransformerV2 | ``layers.{s}.blocks.{j}`` | ``layers.{s}`` | NHWC |
| EfficientNet, MobileNetV3 | ``blocks.{s}.{j}`` | ``blocks.{s}`` listed in ``feature_info`` | NCHW |
| RegNet | ``s{k}.b{j}`` | ``s1..s4`` | NCHW |

Subclasses (``VisionTransformerDistilled`` for DeiT) inherit their parent's entry.
"""

from __future__ import annotations

from timm.models.beit import Beit
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.eva import Eva
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tdsteer_timm.arch import ArchSpec, architecture_for


@architecture_for(VisionTransformer, Eva, Beit)
def _vit(model: nn.Module) -> ArchSpec:
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return ArchSpec("vit", r"blocks\.\d+", r"blocks\.\d+", "NLC", prefix_tokens=prefix)


@architecture_for(ResNet)
def _resnet(model: nn.Module) -> ArchSpec:
    return ArchSpec("resnet", r"layer\d+\.\d+", r"layer\d+", "NCHW")


@architecture_for(ConvNeXt)
def _convnext(model: nn.Module) -> ArchSpec:
    return ArchSpec("convnext", r"stages\.\d+\.blocks\.\d+", r"stages\.\d+", "NCHW")


@architecture_for(SwinTransformer, SwinTransformerV2)
def _swin(model: nn.Module) -> ArchSpec:
    return ArchSpec("swin", r"layers\.\d+\.blocks\.\d+", r"layers\.\d+", "NHWC")


@architecture_for(EfficientNet, MobileNetV3)
def _efficientnet(model: nn.Module) -> ArchSpec:
    return ArchSpec("efficientnet", r"blocks\.\d+\.\d+", r"blocks\.\d+", "NCHW")


@architecture_for(RegNet)
def _regnet(model: nn.Module) -> ArchSpec:
    return ArchSpec("regnet", r"s\d+\.b\d+", r"s\d+", "NCHW")
