"""The timm registry of 32-px ViTs: every variant builds, runs, trains, gives features as timm's own ViTs do, and
loads a weights file through timm's own path, at another image size too."""

import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import checkpoint_filter_fn

import askexpert.models
import askexpert.models.registry
from askexpert.errors import UserError
from askexpert.modules.classifier import create_network

NAMES = askexpert.models.model_names()
B = 2


def test_registry_lists_our_variants():
    assert set(NAMES) <= set(timm.list_models("vit_*_32"))
    assert {"vit_edge_patch4_32", "vit_medium_patch4_32", "vit_edge_patch8_32"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_finite_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_sizes_match_their_roles():
    params = {n: sum(p.numel() for p in timm.create_model(n, num_classes=100).parameters()) for n in NAMES}
    assert 2.5e6 < params["vit_edge_patch4_32"] < 3.0e6
    assert 12e6 < params["vit_medium_patch4_32"] < 16e6
    assert params["vit_micro_patch8_32"] < 0.2e6
    # the CPU evidence's near-edge model: several times the generalist, a third of the edge-size ViT
    assert 0.7e6 < params["vit_mini_patch8_32"] < 1.0e6


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_filter_is_timms_vit_filter_where_timm_looks_for_it(name):
    module = sys.modules[timm.models.model_entrypoint(name).__module__]
    assert module is askexpert.models.registry
    assert module.checkpoint_filter_fn is checkpoint_filter_fn


def test_no_variant_has_published_weights():
    assert not set(NAMES) & set(timm.list_models(pretrained=True))
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):
        timm.create_model("vit_edge_patch8_32", pretrained=True)


def test_pretrained_loads_a_local_weights_file(tmp_path):
    source = timm.create_model("vit_micro_patch8_32", num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = timm.create_model(
        "vit_micro_patch8_32",
        num_classes=5,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "num_classes": 5},  # the file's head fits: loaded too
    )
    for (key, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown model 'vit_huge_nope'.*vit_edge_patch4_32.*vit_medium_patch4_32"):
        create_network("vit_huge_nope", 10, 0.0)


# --- features, as timm's tests/test_models.py checks them for its own ViTs ---------------------------------------


def _block_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output tokens during `forward_features`, caught by hooks, as NCHW maps on the patch grid."""
    caught = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: caught.append(out)) for block in model.blocks]
    try:
        model.forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
    rows, cols = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    assert model.num_prefix_tokens == 0  # every token is a patch: the maps hold all of them
    return [t.transpose(1, 2).reshape(x.shape[0], -1, rows, cols) for t in caught]


@pytest.mark.parametrize("name", NAMES)
def test_features_only_gives_the_maps_feature_info_declares(name):
    arch = askexpert.models.ARCHITECTURES[name]
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True).eval()
    assert isinstance(features, FeatureGetterNet)
    count = min(3, arch["depth"])  # timm's ViT default: the last 3 blocks (all 2 of the micro variant)
    assert features.feature_info.channels() == [arch["embed_dim"]] * count
    assert features.feature_info.reduction() == [arch["patch_size"]] * count
    assert features.feature_info.module_name() == [f"blocks.{i}" for i in range(arch["depth"] - count, arch["depth"])]

    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        maps = features(x)
        blocks = _block_outputs(features.model, x)  # the wrapped ViT's blocks, caught by hooks: the reference
    assert isinstance(maps, list) and len(maps) == count
    infos = zip(features.feature_info.channels(), features.feature_info.reduction(), strict=True)
    for fmap, (channels, reduction), expected in zip(maps, infos, blocks[-count:], strict=True):
        assert fmap.shape == (B, channels, 32 // reduction, 32 // reduction)
        assert torch.isfinite(fmap).all()
        torch.testing.assert_close(fmap, expected)  # raw block output (no final norm), as timm's default


def test_features_only_takes_out_indices():
    torch.manual_seed(0)
    features = timm.create_model("vit_edge_patch8_32", features_only=True, out_indices=(0, -1)).eval()
    assert features.feature_info.module_name() == ["blocks.0", "blocks.5"]
    with torch.no_grad():
        maps = features(torch.randn(B, 3, 32, 32))
    assert [m.shape for m in maps] == [(B, 192, 4, 4)] * 2


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_follows_timms_contract(name):
    arch = askexpert.models.ARCHITECTURES[name]
    depth, dim, grid = arch["depth"], arch["embed_dim"], 32 // arch["patch_size"]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    assert len(model.feature_info) == depth
    x = torch.randn(B, 3, 32, 32)
    indices = [0, depth - 1]
    with torch.no_grad():
        blocks = _block_outputs(model, x)
        final, intermediates = model.forward_intermediates(x, indices=indices)
        only = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        every = model.forward_intermediates(x, intermediates_only=True)  # indices=None: every block
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)  # an int n: the last n blocks
        tokens = model.forward_intermediates(x, indices=indices, output_fmt="NLC", intermediates_only=True)
        features = model.forward_features(x)
        logits = model(x)

    assert len(intermediates) == len(only) == len(tokens) == len(indices)
    for i, fmap, alone, seq in zip(indices, intermediates, only, tokens, strict=True):
        assert fmap.shape == (B, dim, grid, grid)
        assert torch.isfinite(fmap).all()
        torch.testing.assert_close(fmap, blocks[i])
        torch.testing.assert_close(alone, fmap)
        assert seq.shape == (B, grid * grid, dim)
        torch.testing.assert_close(seq, fmap.flatten(2).transpose(1, 2))
    assert len(every) == depth
    for fmap, expected in zip(every, blocks, strict=True):
        torch.testing.assert_close(fmap, expected)
    assert len(last) == 1
    torch.testing.assert_close(last[0], blocks[-1])

    # the final output is the normed token sequence, `forward_features`; the head turns it into the logits
    assert final.shape == (B, grid * grid, dim)
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(model.forward_head(final), logits)


@pytest.mark.parametrize("name", NAMES)
def test_prune_intermediate_layers_keeps_what_the_indices_need(name):
    arch = askexpert.models.ARCHITECTURES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert model.prune_intermediate_layers([0]) == [0]
    assert len(model.blocks) == 1
    assert model.num_classes == 0 and model.global_pool == ""  # timm drops the head and the pooling with it
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        tokens = model(x)
    torch.testing.assert_close(after[0], before[0])
    grid = 32 // arch["patch_size"]
    assert tokens.shape == (B, grid * grid, arch["embed_dim"])  # what is left: the first block's tokens, normed
    torch.testing.assert_close(tokens, model.norm(before[0].flatten(2).transpose(1, 2)))


# --- a file saved at 32 px, loaded at 64 px through timm's own path ----------------------------------------------


@pytest.fixture(scope="module")
def micro_32px(tmp_path_factory) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(0)
    state = timm.create_model("vit_micro_patch8_32", num_classes=100).state_dict()
    path = tmp_path_factory.mktemp("weights") / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state, str(path)


def test_weights_saved_at_32px_load_into_a_64px_model(micro_32px):
    saved, path = micro_32px
    torch.manual_seed(1)  # another initialisation: whatever equals the file was loaded
    model = timm.create_model(
        "vit_micro_patch8_32", num_classes=100, img_size=64, pretrained=True, pretrained_cfg_overlay={"file": path}
    ).eval()
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    differ = [k for k in saved if k != "pos_embed" and not torch.equal(saved[k], loaded[k])]
    assert not differ, f"weights not loaded from the file: {differ}"

    # 4x4 patch grid at 32 px -> 8x8 at 64 px; no class token, so all 16 positions are the grid being resampled
    assert model.patch_embed.grid_size == (8, 8)
    assert saved["pos_embed"].shape == (1, 16, 64) and loaded["pos_embed"].shape == (1, 64, 64)
    expected = resample_abs_pos_embed(saved["pos_embed"], new_size=(8, 8), old_size=(4, 4), num_prefix_tokens=0)
    torch.testing.assert_close(loaded["pos_embed"], expected)

    with torch.no_grad():
        out = model(torch.randn(B, 3, 64, 64))
    assert out.shape == (B, 100)
    assert torch.isfinite(out).all()


def test_features_only_loads_the_32px_file_at_64px(micro_32px):
    _, path = micro_32px
    overlay = {"file": path}
    features = timm.create_model(
        "vit_micro_patch8_32", features_only=True, img_size=64, pretrained=True, pretrained_cfg_overlay=overlay
    ).eval()
    full = timm.create_model("vit_micro_patch8_32", img_size=64, pretrained=True, pretrained_cfg_overlay=overlay)
    x = torch.randn(B, 3, 64, 64)
    with torch.no_grad():
        maps = features(x)
        expected = full.eval().forward_intermediates(x, intermediates_only=True)
    assert [m.shape for m in maps] == [(B, 64, 8, 8)] * 2
    for fmap, reference in zip(maps, expected, strict=True):
        torch.testing.assert_close(fmap, reference)
