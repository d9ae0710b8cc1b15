"""The timm registry of 32-px ViTs: every variant builds, runs, trains; pretrained weights load from a file."""

import pytest
import timm
import torch

import askexpert.models
from askexpert.errors import UserError
from askexpert.modules.classifier import create_network

NAMES = askexpert.models.model_names()


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


def test_pretrained_loads_a_local_weights_file(tmp_path):
    source = timm.create_model("vit_micro_patch8_32", num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_network("vit_micro_patch8_32", 5, pretrained=True, pretrained_path=str(path), drop_path_rate=0)
    for (key, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_pretrained_without_reachable_weights_is_a_clear_error():
    with pytest.raises(UserError, match="cannot load pretrained weights for 'vit_edge_patch8_32'.*pretrained_path"):
        create_network("vit_edge_patch8_32", 10, pretrained=True, pretrained_path=None, drop_path_rate=0)


def test_pretrained_file_missing(tmp_path):
    with pytest.raises(UserError, match="pretrained weights file not found"):
        create_network("vit_micro_patch8_32", 10, True, str(tmp_path / "nope.pth"), 0)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown model 'vit_huge_nope'.*vit_edge_patch4_32.*vit_medium_patch4_32"):
        create_network("vit_huge_nope", 10, False, None, 0)
