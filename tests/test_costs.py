"""askexpert/collab/costs.py: a device profile read and checked, and the latency and energy of one image worked out
by hand on a tiny profile (the formulas are in the module docstring). A model's FLOPs come from the model registry
(askexpert.models), counted by hand from its architecture here."""

from __future__ import annotations

import copy
import math

import pytest
import yaml
from conftest import REPO
from helpers.routing import PROFILE

from askexpert.collab.costs import (
    CostModel,
    Device,
    ModelCost,
    gflops_per_image,
    load_profile,
    measured_key,
    model_cost,
    profile_from_dict,
)
from askexpert.errors import UserError
from askexpert.models.registry import ARCHITECTURES

# PROFILE (tests/helpers/routing.py) with a per-request overhead on the link and a compressed image
TINY = {**copy.deepcopy(PROFILE), "image_bytes": 1000}
TINY["link"]["overhead_ms"] = 2.0


def counted_flops(model_name: str, num_outputs: int, image_size: int) -> int:
    """FLOPs (2 per multiply-add) of a registry ViT's convolution and linear layers, from its architecture.

    Attention's two matmuls (2 * N * N * D multiply-adds per block) are not in it: gflops_per_image runs the
    network on the CPU, where torch's scaled-dot-product attention takes a kernel (flash attention for CPU) that
    torch's FlopCounterMode has no formula for (torch 2.14). So the published figures leave them out, as
    gflops_per_image's docstring says."""
    arch = ARCHITECTURES[model_name]
    width, patch, depth = arch["embed_dim"], arch["patch_size"], arch["depth"]
    tokens = (image_size // patch) ** 2
    patch_embed = tokens * width * 3 * patch * patch
    block = tokens * width * 3 * width + tokens * width * width + 2 * tokens * width * 4 * width  # qkv, proj, MLP
    head = width * num_outputs  # on the averaged tokens (no class token)
    return 2 * (patch_embed + depth * block + head)


@pytest.mark.parametrize(
    "model_name, num_outputs, image_size",
    [("vit_micro_patch8_32", 10, 32), ("vit_micro_patch8_32", 3, 32), ("vit_micro_patch8_32", 10, 64)],
)
def test_flops_follow_the_registry_architecture(model_name, num_outputs, image_size) -> None:
    """An extra output adds one head row; a larger input adds tokens (the model is built at that size)."""
    assert gflops_per_image(model_name, num_outputs, image_size) * 1e9 == counted_flops(
        model_name, num_outputs, image_size
    )


def test_device_compute_time_measured_or_from_flops() -> None:
    measured = {measured_key("m", 10, 32): 7.5, "old": 4.0}
    device = Device("d", gflops=20.0, overhead_ms=1.5, active_power_w=1.0, idle_power_w=0.5, measured_ms=measured)
    assert measured_key("vit_edge_patch4_32", 101, 32) == "vit_edge_patch4_32/101/32"
    assert device.compute_ms("m", 10, 32, 99.0) == (7.5, "measured")
    assert device.compute_ms("m", 11, 32, 0.1) == (1.5 + 1e3 * 0.1 / 20.0, "flops")  # another head: not measured
    assert device.compute_ms("m", 10, 64, 0.1) == (6.5, "flops")  # another input size neither
    assert device.compute_ms("old", 3, 224, 0.1) == (4.0, "measured (any head)")  # a profile before keys had heads


def test_model_cost_on_each_side() -> None:
    profile = profile_from_dict({**TINY, "edge": {**TINY["edge"], "measured_ms": {"vit_micro_patch8_32/10/32": 2.5}}})
    cost = model_cost(profile, "vit_micro_patch8_32", 10)
    flops = counted_flops("vit_micro_patch8_32", 10, 32) / 1e9
    assert cost == ModelCost(
        "vit_micro_patch8_32", pytest.approx(flops), 2.5, pytest.approx(3.0 + flops), "measured", "flops"
    )  # near-edge: 3 ms overhead + GFLOPs / 1000 GFLOP/s (in ms: x 1e3 / 1e3)


def test_latency_and_energy_by_hand() -> None:
    model = CostModel(profile_from_dict(TINY), (3, 32, 32))
    assert model.image_bytes == 1000  # the profile's figure wins over the raw image's 3072
    generalist = ModelCost("g", 0.0, 4.0, 0.0, "measured", "measured")
    expert = ModelCost("e", 0.0, 0.0, 6.0, "measured", "measured")

    edge = model.on_edge(generalist)
    assert (edge.latency_ms, edge.edge_energy_mj, edge.system_energy_mj) == (4.0, 20.0, 20.0)  # 5 W x 4 ms

    offload = model.offload(expert)
    transfer = 1000 * 8 / 24e3  # 1/3 ms at 24 Mbit/s
    wait = 4.0 + 2.0 + 6.0  # round trip + per-request overhead + the expert on the near-edge
    assert offload.latency_ms == pytest.approx(transfer + wait)
    radio = 0.25 * 24 + 1.0  # 7 W while sending
    assert offload.edge_energy_mj == pytest.approx(radio * transfer + 2.0 * (transfer + wait))  # idle while waiting
    assert offload.system_energy_mj == pytest.approx(offload.edge_energy_mj + 30.0 * 6.0)  # only its compute
    assert offload.as_dict() == {
        "latency_ms": offload.latency_ms,
        "energy_mj": offload.edge_energy_mj,
        "system_energy_mj": offload.system_energy_mj,
    }


def test_the_raw_image_is_sent_when_the_profile_says_nothing() -> None:
    profile = profile_from_dict(PROFILE)
    assert CostModel(profile, (3, 64, 64)).image_bytes == 3 * 64 * 64
    assert profile.link.overhead_ms == 0.0 and profile.link.radio_power_w == 7.0
    assert profile.link.transfer_ms(3072) == pytest.approx(1.024)


def test_the_shipped_profiles_load(tmp_path) -> None:
    for path in sorted((REPO / "configs" / "profiles").glob("*.yaml")):
        profile = load_profile(str(path))
        assert profile.name == path.stem and profile.path == str(path)
        assert profile.edge.gflops > 0 and profile.link.uplink_mbps > 0
        assert profile.describe()["measured_models"] == sorted(
            set(profile.edge.measured_ms) | set(profile.near_edge.measured_ms)
        )
    # without a name, a profile is named after its file
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(PROFILE))
    assert load_profile(str(tmp_path / "mine.yaml")).name == "mine"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["edge"].update(gflops=True), "profile field edge.gflops must be a number, got True"),
        (lambda p: p["edge"].update(gflops=math.inf), "profile field edge.gflops must be a number, got inf"),
        (lambda p: p["link"].update(overhead_ms=-1), "profile field link.overhead_ms must be non-negative, got -1"),
        (lambda p: p["link"].update(uplink_mbps=0), "profile field link.uplink_mbps must be positive, got 0"),
        (lambda p: p.update(image_bytes=0), "profile field profile.image_bytes must be positive, got 0"),
        (lambda p: p["edge"].update(measured_ms=[1]), "edge.measured_ms must map MODEL/OUTPUTS/INPUT_SIDE names"),
        (lambda p: p["edge"].update(measured_ms={"m/1/32": 0}), "field edge.measured_ms.m/1/32 must be positive"),
        (lambda p: p["near_edge"].update(fast=1), "section 'near_edge' has unknown fields fast (known: name,"),
    ],
)
def test_a_bad_field_is_named(change, message) -> None:
    raw = copy.deepcopy(PROFILE)
    change(raw)
    with pytest.raises(UserError) as raised:
        profile_from_dict(raw)
    assert message in str(raised.value)


def test_a_profile_that_is_not_a_mapping_or_not_yaml(tmp_path) -> None:
    with pytest.raises(UserError, match=r"^device profile not found: .*absent\.yaml$"):
        load_profile(str(tmp_path / "absent.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="is not a mapping of edge / near_edge / link sections"):
        load_profile(str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("edge: [unclosed\n")
    with pytest.raises(UserError, match=r"^device profile .*bad\.yaml is not valid YAML: "):
        load_profile(str(tmp_path / "bad.yaml"))
