"""32-pixel Vision Transformer variants, registered in timm's model registry.

`import askexpert.models` makes every variant creatable with `timm.create_model(name, num_classes=C)`.
Sizes follow the edge / near-edge split of the system:

| name                   | dim | depth | heads | patch | params (C=100) | role                           |
|------------------------|-----|-------|-------|-------|----------------|--------------------------------|
| vit_edge_patch4_32     | 192 | 6     | 3     | 4     | 2.7 M          | generalist on the edge device  |
| vit_medium_patch4_32   | 384 | 8     | 6     | 4     | 14.3 M         | expert / base on the near-edge |
| vit_edge_patch8_32     | 192 | 6     | 3     | 8     | 2.7 M          | CPU demos                      |
| vit_medium_patch8_32   | 384 | 8     | 6     | 8     | 14.3 M         | CPU demos                      |
| vit_mini_patch8_32     | 128 | 4     | 4     | 8     | 0.8 M          | base / experts, CPU evidence   |
| vit_micro_patch8_32    | 64  | 2     | 2     | 8     | 0.1 M          | generalist: demo, CPU evidence; tests |

Patch 4 gives 64 tokens per 32x32 image (the usual choice for CIFAR-size ViTs); patch 8 gives 16 tokens,
about 4x cheaper, which is what makes CPU demos and tests fast. All variants pool the patch tokens by
averaging (no class token): on small datasets average pooling trains faster and more stably.

No variant has published weights. `pretrained=True` therefore needs a local file:
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": PATH})`. The file goes through timm's
own ViT checkpoint filter (`checkpoint_filter_fn`, also importable from here, where timm's convention looks for
it), exactly as for timm's ViTs: weights saved at 32 px load into a model built at another `img_size`, their
position embeddings resampled to the new patch grid (these variants have no class token, so every position is a
patch position); a file of another patch size has its patch embedding resampled too.

As timm's own ViTs, every variant supports `features_only=True` (a `FeatureGetterNet` returning the last
`out_indices` blocks, default 3 or all of them when fewer, as NCHW maps at 1/patch resolution),
`forward_intermediates` and `prune_intermediate_layers`.
"""

from __future__ import annotations

from functools import partial

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

# `checkpoint_filter_fn` is timm's own ViT filter. It is also a name of this module on purpose: by timm's convention
# a model's filter is `checkpoint_filter_fn` of the module that registers it (`sys.modules[entrypoint.__module__]`);
# timm keeps no reference to it on the built model.
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from askexpert.errors import UserError

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
    "vit_mini_patch8_32": dict(patch_size=8, embed_dim=128, depth=4, num_heads=4),
    "vit_micro_patch8_32": dict(patch_size=8, embed_dim=64, depth=2, num_heads=2),
}


# timm's registry reads `default_cfgs` from this module when a model is registered.
default_cfgs = generate_default_cfgs({name: dict(_BASE_CFG) for name in ARCHITECTURES})


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(img_size=32, class_token=False, global_pool="avg", mlp_ratio=4.0, qkv_bias=True)
    args.update(ARCHITECTURES[variant])
    args.update(kwargs)
    # As timm's `_create_vision_transformer`: features are the last `out_indices` blocks (3 by default; our micro
    # variant has only 2), taken by the model's own `forward_intermediates` (feature_cls='getter').
    out_indices = args.pop("out_indices", min(3, args["depth"]))
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


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


def create_network(
    model_name: str, num_outputs: int, drop_path_rate: float, image_size: int = 32, img_size: int | None = None
) -> torch.nn.Module:
    """A timm model by registry name with random weights, built for `image_size` inputs where it takes a size.

    Models that take an image size (ViTs) are built at `image_size`; others (ResNets, ...) are built as they
    are and must accept that size (checked by `check_input_size`). An explicit `img_size` that differs from the
    size the data gives the model is refused: the model would never see what it was built for.
    """
    if not timm.is_model(model_name):
        known = ", ".join(model_names())
        raise UserError(f"unknown model {model_name!r}; askexpert models: {known} (or any timm model name)")
    if img_size is not None and img_size != image_size:
        raise UserError(
            f"--model.img_size {img_size} differs from --data.image_size {image_size}, the size the model is given"
        )
    kwargs: dict = dict(num_classes=num_outputs, drop_path_rate=drop_path_rate)
    try:
        try:
            return timm.create_model(model_name, img_size=image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            return timm.create_model(model_name, **kwargs)  # an architecture without a built-in size
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot build {model_name!r} for {image_size}x{image_size} images: {reason}") from None


def check_input_size(net: torch.nn.Module, model_name: str, image_size: int) -> None:
    """One forward pass at the size the data gives: an architecture that cannot take it fails now, in one line."""
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, image_size, image_size))
    except Exception as err:  # shape errors come as RuntimeError, AssertionError, ValueError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model {model_name} cannot take {image_size}x{image_size} images: {reason}") from None
    finally:
        net.train(was_training)
