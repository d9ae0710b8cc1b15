"""The adapt folder (RUN/adapt, or `--out`): its settings, and which rounds are finished.

    ADAPT_DIR/adapt.json               the settings every round was made with (their identity)
    ADAPT_DIR/round_<r>/metrics.json   written last: the round is finished (round 0 has only this)
    ADAPT_DIR/round_<r>/generalist.ckpt the generalist after round r's fine-tuning (weights-only, the run's format)
    ADAPT_DIR/round_<r>/kept.safetensors the round's offloaded images with the experts' soft labels
    ADAPT_DIR/adapt.csv, adapt.png     one row / point per finished round, rewritten after each

Like a pipeline's stages.json: a finished round (metrics.json says so and its files load) is skipped; a round
interrupted before its metrics.json is done again; settings that differ from adapt.json are refused in one
line (`--overwrite true` starts again). Every file is written atomically, so a kill leaves a round either
finished or absent. Checkpoints are read weights-only and the kept images are safetensors: data, never code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from askexpert.errors import UserError
from askexpert.files.atomic import atomic_write_bytes, write_json
from askexpert.files.checkpoints import load_checkpoint, save_torch_file

SETTINGS_FILE = "adapt.json"
FORMAT = 1


@dataclass(frozen=True)
class AdaptFolder:
    root: str

    @property
    def settings(self) -> str:
        return os.path.join(self.root, SETTINGS_FILE)

    def round_dir(self, r: int) -> str:
        return os.path.join(self.root, f"round_{r}")

    def metrics(self, r: int) -> str:
        return os.path.join(self.round_dir(r), "metrics.json")

    def checkpoint(self, r: int) -> str:
        return os.path.join(self.round_dir(r), "generalist.ckpt")

    def kept(self, r: int) -> str:
        return os.path.join(self.round_dir(r), "kept.safetensors")

    @property
    def csv(self) -> str:
        return os.path.join(self.root, "adapt.csv")

    @property
    def plot(self) -> str:
        return os.path.join(self.root, "adapt.png")


def adapt_identity(generalist: str, experts: list[str], routing, stream, distill) -> dict:
    """What makes the rounds what they are: the run's models (SHA-256 of the generalist's and the experts'
    checkpoints), the routing adapt reads (by name: fields RoutingConfig may gain later change no identity), the
    stream (kind, round size, seed, a record's hash) and every fine-tuning setting."""
    chosen = asdict(routing)
    return {
        "models": {"generalist": generalist, "experts": list(experts)},
        "routing": {key: chosen[key] for key in ("gate", "top_k", "temperature", "fusion", "budget", "seed")},
        "stream": {**stream.identity, "round_size": stream.round_size, "seed": stream.seed},
        "distill": asdict(distill),
    }


def _flat(value, prefix: str = "") -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}" if prefix else key).items()}


def recorded_identity(folder: AdaptFolder) -> dict | None:
    """The identity adapt.json records; None when the folder has none yet."""
    if not os.path.isfile(folder.settings):
        return None
    try:
        with open(folder.settings, encoding="utf-8") as f:
            found = json.load(f)
        if found.get("format") != FORMAT or not isinstance(found["identity"], dict):
            raise KeyError("identity")
        return found["identity"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{folder.settings} is damaged; pass --overwrite true to start this adaptation again") from None


def check_identity(folder: AdaptFolder, identity: dict, overwrite: bool) -> None:
    """Refuse settings that differ from those of the rounds already in the folder (unless `overwrite`)."""
    if overwrite:
        return
    if os.path.isdir(folder.root) and os.listdir(folder.root) and not os.path.isfile(folder.settings):
        if any(name.startswith("round_") for name in os.listdir(folder.root)):
            raise UserError(f"{folder.root} holds rounds but no {SETTINGS_FILE}; pass --overwrite true to start again")
    recorded = recorded_identity(folder)
    if recorded is None or json.loads(json.dumps(identity)) == recorded:
        return
    old, new = _flat(recorded), _flat(json.loads(json.dumps(identity)))
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    shown = ", ".join(f"{key} {_short(old.get(key))} -> {_short(new.get(key))}" for key in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise UserError(
        f"{folder.root} was adapted with other settings ({shown}{more}); use the same settings to go on, another "
        "--out, or --overwrite true to start again"
    )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:12] + "..."


def start(folder: AdaptFolder, identity: dict, overwrite: bool, described: dict) -> None:
    """Write adapt.json (after removing every round when `overwrite`); called under the folder's lock."""
    if overwrite:
        for name in os.listdir(folder.root):
            path = os.path.join(folder.root, name)
            if name.startswith("round_") and os.path.isdir(path):
                shutil.rmtree(path)
            elif name in (SETTINGS_FILE, "adapt.csv", "adapt.png"):
                os.remove(path)
    if not os.path.isfile(folder.settings):
        write_json(folder.settings, {"format": FORMAT, "identity": identity, **described}, sort_keys=True)


def finished_round(folder: AdaptFolder, r: int) -> dict | None:
    """Round r's metrics when it finished and its files load; None otherwise (it is done again)."""
    try:
        with open(folder.metrics(r), encoding="utf-8") as f:
            metrics = json.load(f)
        if metrics.get("round") != r:
            return None
        if r > 0:
            load_checkpoint(folder.checkpoint(r), mmap=True)
            load_kept(folder, r)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, UserError, AttributeError):
        return None
    return metrics


def save_round(folder: AdaptFolder, r: int, metrics: dict) -> None:
    """The round's marker, written after its other files: from now on it is finished."""
    write_json(folder.metrics(r), {"round": r, **metrics}, sort_keys=False)


def save_kept(
    folder: AdaptFolder, r: int, images: torch.Tensor, soft: torch.Tensor, labels: torch.Tensor | None
) -> None:
    tensors = {"images": images.contiguous(), "soft_labels": soft.float().contiguous()}
    if labels is not None:  # known only for a simulated stream: to report how right the kept labels were
        tensors["labels"] = labels.contiguous()
    atomic_write_bytes(folder.kept(r), safetensors_bytes(tensors))


def load_kept(folder: AdaptFolder, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, soft labels) kept in round r."""
    path = folder.kept(r)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            images, soft = handle.get_tensor("images"), handle.get_tensor("soft_labels")
    except Exception:  # noqa: BLE001 (a damaged file fails in many ways; the round is done again)
        raise UserError(f"{path} is damaged") from None
    if images.dtype != torch.uint8 or images.ndim != 4 or soft.ndim != 2 or len(images) != len(soft):
        raise UserError(f"{path} is damaged")
    return images, soft


def save_generalist(folder: AdaptFolder, r: int, generalist, original: str, info: dict) -> None:
    """The fine-tuned generalist as a weights-only checkpoint in the run's own format (its original checkpoint with
    new weights and no training state), so `load_classifier` and `export` read it like any best.ckpt."""
    checkpoint = load_checkpoint(original, mmap=True)
    weights = {key: value.detach().cpu().clone() for key, value in generalist.state_dict().items()}
    if set(weights) != set(checkpoint["state_dict"]):
        raise RuntimeError("the fine-tuned generalist's weights do not match its checkpoint's keys")
    for key in ("loops", "optimizer_states", "lr_schedulers", "callbacks"):
        checkpoint.pop(key, None)
    checkpoint["state_dict"] = weights
    checkpoint["adapt"] = {"round": r, **info}
    save_torch_file(checkpoint, folder.checkpoint(r))
