"""Latency and energy of one classified image, from a device profile (configs/profiles/*.yaml).

Per sample (all times in ms, powers in W, so W x ms = mJ):
    edge      = the generalist's compute time on the edge device
    offload   = transfer (image bytes over the uplink) + round trip + per-request overhead + the expert's
                compute on the near-edge
    latency   = edge + [offloaded] * offload
    edge energy   = P_edge_active * edge
                    + [offloaded] * (P_radio * transfer + P_edge_idle * (transfer + RTT + expert))
    system energy = edge energy + [offloaded] * P_near_active * expert
A sample asked of two experts (the second expert, docs/collaborative.md) goes as the `edge` client sends it: two
concurrent requests, so the image crosses the uplink twice (one radio: 2 x transfer), the round trip and the
per-request overhead are paid once (in parallel), and the near-edge accelerator computes both experts (one
after the other on one accelerator: expert_a + expert_b); the edge waits for both.
The edge device stays on (idle power) while it sends and waits for the network and the expert, and its
radio adds P_radio while sending (Huang et al.'s model is the radio's power above the idle baseline). The
near-edge accelerator is charged only for the time it computes for this sample (it is shared: its idle
power belongs to nobody's sample).
The per-request overhead (`link.overhead_ms`, optional, 0 by default and in the shipped profiles) is what a
real deployment spends on an offload besides the link and the model: serialisation, HTTP, the server's batch
window and process hand-offs. benchmarks/link_vs_model.py measures it on loopback (docs/deploy.md).
Radio power follows the linear model of Huang et al. (MobiSys'12): P_radio = a * uplink_Mbps + b.

A model's compute time is `overhead_ms + GFLOPs / gflops` (the device's sustained rate and fixed
per-inference cost), or the time `python -m askexpert profile` measured for that model and wrote into the
profile (`measured_ms`, keyed by `measured_key`: the model, its number of outputs and its input side, since
a dustbin head or another input size is another model to time). Every figure in a report says which one it
used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from askexpert.errors import UserError
from askexpert.files.reading import DamagedFile, read_yaml_file

DEVICE_FIELDS = ("name", "gflops", "overhead_ms", "active_power_w", "idle_power_w")
LINK_FIELDS = ("name", "uplink_mbps", "rtt_ms", "radio_w_per_mbps", "radio_base_w")
LINK_OPTIONAL_FIELDS = ("overhead_ms",)


def measured_key(model_name: str, num_outputs: int, image_size: int) -> str:
    """The name of a measured time in a profile, e.g. `vit_edge_patch4_32/101/32` (model/outputs/input side)."""
    return f"{model_name}/{num_outputs}/{image_size}"


@dataclass(frozen=True)
class Device:
    name: str
    gflops: float  # sustained GFLOP/s for this kind of model at batch 1
    overhead_ms: float  # fixed cost of one inference (kernel launches, framework)
    active_power_w: float
    idle_power_w: float
    measured_ms: dict[str, float] = field(default_factory=dict)  # measured_key -> measured batch-1 time

    def compute_ms(
        self, model_name: str, num_outputs: int, image_size: int, gflops_per_image: float
    ) -> tuple[float, str]:
        """(milliseconds for one image, "measured", "measured (any head)" or "flops")."""
        key = measured_key(model_name, num_outputs, image_size)
        if key in self.measured_ms:
            return float(self.measured_ms[key]), "measured"
        if model_name in self.measured_ms:  # a profile written before times were keyed by head and input size
            return float(self.measured_ms[model_name]), "measured (any head)"
        return self.overhead_ms + 1e3 * gflops_per_image / self.gflops, "flops"


@dataclass(frozen=True)
class Link:
    name: str
    uplink_mbps: float
    rtt_ms: float
    radio_w_per_mbps: float
    radio_base_w: float
    overhead_ms: float = 0.0  # per offloaded request, besides transfer, round trip and model (see above)

    @property
    def radio_power_w(self) -> float:
        return self.radio_w_per_mbps * self.uplink_mbps + self.radio_base_w

    def transfer_ms(self, num_bytes: float) -> float:
        return num_bytes * 8 / (self.uplink_mbps * 1e3)


@dataclass(frozen=True)
class Profile:
    name: str
    edge: Device
    near_edge: Device
    link: Link
    image_bytes: float | None = None  # None: the raw uint8 image (C x H x W bytes)
    path: str | None = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "edge": self.edge.name,
            "near_edge": self.near_edge.name,
            "link": self.link.name,
            "measured_models": sorted(set(self.edge.measured_ms) | set(self.near_edge.measured_ms)),
        }


def _number(section: str, key: str, value, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"profile field {section}.{key} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(
            f"profile field {section}.{key} must be {'non-negative' if allow_zero else 'positive'}, got {value}"
        )
    return float(value)


def _section(raw: dict, section: str, fields: tuple[str, ...], positive: tuple[str, ...]) -> dict:
    values = raw.get(section)
    if not isinstance(values, dict):
        raise UserError(f"the profile has no {section!r} section (needs: {', '.join(fields)})")
    missing = [key for key in fields if key not in values]
    if missing:
        raise UserError(f"profile section {section!r} misses {', '.join(missing)}")
    allowed = (*fields, "measured_ms") if section != "link" else (*fields, *LINK_OPTIONAL_FIELDS)
    unknown = sorted(str(key) for key in values if key not in allowed)
    if unknown:
        raise UserError(
            f"profile section {section!r} has unknown fields {', '.join(unknown)} (known: {', '.join(allowed)})"
        )
    if not isinstance(values["name"], str) or not values["name"].strip():
        raise UserError(f"profile field {section}.name must be a non-empty text")
    out = {"name": values["name"]}
    for key in fields[1:]:
        out[key] = _number(section, key, values[key], allow_zero=key not in positive)
    for key in LINK_OPTIONAL_FIELDS if section == "link" else ():
        if key in values:
            out[key] = _number(section, key, values[key], allow_zero=True)
    if "measured_ms" in values:
        measured = values["measured_ms"] or {}
        if not isinstance(measured, dict):
            raise UserError(
                f"profile field {section}.measured_ms must map MODEL/OUTPUTS/INPUT_SIDE names to milliseconds"
            )
        out["measured_ms"] = {
            str(name): _number(f"{section}.measured_ms", name, ms, allow_zero=False) for name, ms in measured.items()
        }
    return out


def profile_from_dict(raw: dict, path: str | None = None) -> Profile:
    if not isinstance(raw, dict):
        raise UserError(f"profile {path or ''} is not a mapping of edge / near_edge / link sections")
    edge = Device(**_section(raw, "edge", DEVICE_FIELDS, positive=("gflops",)))
    near_edge = Device(**_section(raw, "near_edge", DEVICE_FIELDS, positive=("gflops",)))
    link = Link(**_section(raw, "link", LINK_FIELDS, positive=("uplink_mbps",)))
    image_bytes = raw.get("image_bytes")
    if image_bytes is not None:
        image_bytes = _number("profile", "image_bytes", image_bytes, allow_zero=False)
    name = str(raw.get("name") or (os.path.splitext(os.path.basename(path))[0] if path else "profile"))
    return Profile(name, edge, near_edge, link, image_bytes, path)


def load_profile(path: str) -> Profile:
    """Read and check a profile YAML: every field present, numbers non-negative (rates positive)."""
    if not os.path.isfile(path):
        raise UserError(f"device profile not found: {path}")
    try:
        raw = read_yaml_file(path, "device profile")
    except DamagedFile as err:
        raise UserError(f"device profile {path} is {err.reason}") from None
    return profile_from_dict(raw, path)


@lru_cache(maxsize=32)
def gflops_per_image(model_name: str, num_outputs: int, image_size: int = 32) -> float:
    """Forward GFLOPs of one image at `image_size` (torch's FLOP counter: 2 per multiply-add of convolutions and
    linear layers), the model built for that size as training builds it (a ViT's token count follows the size).
    Attention's own two matmuls are not counted: on the CPU, scaled-dot-product attention runs a kernel the counter
    has no formula for (torch 2.14). For the registry's 32-px ViTs (16 or 64 tokens) they are about 4-6 % of a
    block's multiply-adds, so the figures (and every latency and energy derived from them) are that much low."""
    from torch.utils.flop_counter import FlopCounterMode

    from askexpert.models import create_network

    model = create_network(model_name, num_outputs, 0.0, image_size).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


@dataclass(frozen=True)
class ModelCost:
    """What one model costs per image on each side."""

    name: str  # timm model name
    gflops: float
    edge_ms: float
    near_edge_ms: float
    edge_source: str  # "measured" or "flops"
    near_edge_source: str


def model_cost(profile: Profile, model_name: str, num_outputs: int, image_size: int = 32) -> ModelCost:
    flops = gflops_per_image(model_name, num_outputs, image_size)
    edge_ms, edge_source = profile.edge.compute_ms(model_name, num_outputs, image_size, flops)
    near_ms, near_source = profile.near_edge.compute_ms(model_name, num_outputs, image_size, flops)
    return ModelCost(model_name, flops, edge_ms, near_ms, edge_source, near_source)


@dataclass(frozen=True)
class SampleCosts:
    """Per-sample latency and energy of the two ways a sample can be answered."""

    latency_ms: float  # answered on the edge (by a model run on the edge)
    edge_energy_mj: float
    system_energy_mj: float

    def as_dict(self) -> dict:
        return {
            "latency_ms": self.latency_ms,
            "energy_mj": self.edge_energy_mj,
            "system_energy_mj": self.system_energy_mj,
        }


class CostModel:
    """Latency and energy per sample for a profile and an image size."""

    def __init__(self, profile: Profile, image_shape: tuple[int, int, int] = (3, 32, 32)) -> None:
        self.profile = profile
        self.image_shape = image_shape
        self.image_bytes = profile.image_bytes or float(math.prod(image_shape))

    def on_edge(self, model: ModelCost) -> SampleCosts:
        """The model runs on the edge device (edge_only, edge_medium, and the first step of every sample)."""
        energy = self.profile.edge.active_power_w * model.edge_ms
        return SampleCosts(model.edge_ms, energy, energy)

    def offload(self, model: ModelCost) -> SampleCosts:
        """The extra cost of sending one image to `model` on the near-edge accelerator and getting the answer."""
        return self._offloaded(transfers=1, near_edge_ms=model.near_edge_ms)

    def offload_pair(self, a: ModelCost, b: ModelCost) -> SampleCosts:
        """The extra cost of asking two experts at once (two concurrent requests; the module's text)."""
        return self._offloaded(transfers=2, near_edge_ms=a.near_edge_ms + b.near_edge_ms)

    def _offloaded(self, transfers: int, near_edge_ms: float) -> SampleCosts:
        """The image sent `transfers` times over one radio, one round trip and request overhead (concurrent
        requests wait together), `near_edge_ms` of accelerator compute; the edge idles until the answer."""
        p = self.profile
        transfer = transfers * p.link.transfer_ms(self.image_bytes)
        wait = p.link.rtt_ms + p.link.overhead_ms + near_edge_ms
        edge_energy = p.link.radio_power_w * transfer + p.edge.idle_power_w * (transfer + wait)
        system_energy = edge_energy + p.near_edge.active_power_w * near_edge_ms
        return SampleCosts(transfer + wait, edge_energy, system_energy)
