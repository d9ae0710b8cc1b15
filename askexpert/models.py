"""32-pixel Vision Transformer variants, registered in timm's model registry.

`import askexpert.models` makes every variant creatable with `timm.create_model(name, num_classes=C)`.
Sizes follow the edge / near-edge split of the system:

| name                   | dim | depth | heads | patch | params (C=100) | role                           |
|------------------------|-----|-------|-------|-------|----------------|--------------------------------|
| vit_edge_patch4_32     | 192 | 6     | 3     | 4     | 2.7 M          | generalist on the edge device  |
| vit_medium_patch4_32   | 384 | 8     | 6     | 4     | 14.3 M         | expert / base on the near-edge |
| vit_edge_patch8_32     | 192 | 6     | 3     | 8     | 2.7 M          | CPU demos                      |
| vit_medium_patch8_32   | 384 | 8     | 6     | 8     | 14.3 M         | CPU demos                      |
| vit_micro_patch8_32    | 64  | 2     | 2     | 8     | 0.1 M          | tests                          |

Patch 4 gives 64 tokens per 32x32 image (the usual choice for CIFAR-size ViTs); patch 8 gives 16 tokens,
about 4x cheaper, which is what makes CPU demos and tests fast. All variants pool the patch tokens by
averaging (no class token): on small datasets average pooling trains faster and more stably.

No variant has published weights. `pretrained=True` therefore needs a local file:
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": PATH})`.
"""

from __future__ import annotations

from functools import partial

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

# Defaults for the whole family; CIFAR-100's statistics are also the modules' default normalisation.
_BASE_CFG = {
    "url": "",
    "num_classes": 100,
    "input_size": (3, 32, 32),
    "mean": (0.5071, 0.4865, 0.4409),
    "std": (0.2673, 0.2564, 0.2762),
    "first_conv": "patch_embed.proj",
    "classifier": "head",
}

ARCHITECTURES: dict[str, dict] = {
    "vit_edge_patch4_32": dict(patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit_medium_patch4_32": dict(patch_size=4, embed_dim=384, depth=8, num_heads=6),
    "vit_edge_patch8_32": dict(patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "vit_medium_patch8_32": dict(patch_size=8, embed_dim=384, depth=8, num_heads=6),
    "vit_micro_patch8_32": dict(patch_size=8, embed_dim=64, depth=2, num_heads=2),
}


# timm's registry reads `default_cfgs` from this module when a model is registered.
default_cfgs = generate_default_cfgs({name: dict(_BASE_CFG) for name in ARCHITECTURES})


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(img_size=32, class_token=False, global_pool="avg", mlp_ratio=4.0, qkv_bias=True)
    args.update(ARCHITECTURES[variant])
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **args)


def _register(variant: str) -> None:
    fn = partial(_create, variant)
    fn.__name__ = variant  # timm registers under the function's name
    fn.__module__ = __name__
    fn.__doc__ = f"32-px ViT `{variant}`: {ARCHITECTURES[variant]}."
    register_model(fn)


for _variant in ARCHITECTURES:
    _register(_variant)


def model_names() -> list[str]:
    """Names of the askexpert variants, in size order as declared above."""
    return list(ARCHITECTURES)
