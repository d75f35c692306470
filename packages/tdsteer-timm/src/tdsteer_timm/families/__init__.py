"""Built-in architecture families, registered on import: one module per kind of model.

- :mod:`tdsteer_timm.families.tokens`: isotropic token models (ViT and its variants, Eva, BEiT,
  CaiT, XCiT, CrossViT, MLP-Mixer) and the token pyramids Hiera and LeViT.
- :mod:`tdsteer_timm.families.hierarchical`: hierarchical vision transformers and hybrids (Swin,
  MaxViT/CoAtNet, MetaFormer, MobileViT, FastViT, EdgeNeXt, EfficientViT, PVTv2, Twins, DaViT).
- :mod:`tdsteer_timm.families.cnn`: convolutional networks (ResNet, ConvNeXt, RegNet, EfficientNet,
  MobileNet, GhostNet, DenseNet, VGG, Inception, HRNet).

Each registered spec lists its stages in the order of timm's ``forward_intermediates`` and
``feature_info``, so that stage ``i`` is timm's index ``i``; ``tests/tdsteer_timm/test_timm_families.py``
checks every one against timm's own intermediates.
"""

from tdsteer_timm.families import cnn, hierarchical, tokens

__all__ = ["cnn", "hierarchical", "tokens"]
