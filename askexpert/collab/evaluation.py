"""Evaluate a pipeline run folder: cached logits -> collaborative system -> report dictionary (`collab/report.py`
writes it as files).

The folder layout is fixed (`RunLayout`), so `pipeline` (which trains into it) and `evaluate --run DIR`
(which re-reads it, e.g. with another gate or device profile) agree on where everything is.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from askexpert.collab.costs import CostModel, load_profile, model_cost
from askexpert.collab.diagnostics import diagnostics
from askexpert.collab.logits import cached_logits
from askexpert.collab.sanity import findings
from askexpert.collab.system import CollaborativeSystem, ExpertSet, RoutingConfig
from askexpert.errors import UserError
from askexpert.runs.layout import STATIC, RunLayout, expert_families
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import Partition

SPLITS = ("val", "test")
CALIB = "calib"  # the calibration split, when the data has one (`--data.calib_fraction`)
PACKAGES = ("askexpert", "torch", "lightning", "timm", "torchmetrics")


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def in_run(path: str | None, root: str) -> str | None:
    """`path` relative to the run folder when it lies inside it (the partition, the run's copy of its profile), so
    the report of a copied or moved run names the same files; any other path as given."""
    if path is None:
        return None
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def _require(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path} (has the pipeline finished this stage?)")
    return path


def check_expert_classes(subset, partition: Partition, index: int, name: str, partition_path: str) -> None:
    """Refuse an expert whose trained classes are not the ones the partition gives it (a mismatched artefact)."""
    if subset is None or sorted(int(c) for c in subset) != sorted(partition.classes_of(index)):
        raise UserError(f"expert {name} was trained on other classes than {partition_path} gives it")


def check_checkpoint_kind(
    checkpoint: str, name: str, expert: int | None, partition: Partition, partition_path: str, datamodule
) -> None:
    """Refuse a checkpoint of the wrong kind (an expert as the generalist or base, anything else as an expert),
    of other classes than the partition gives it, or of another class set than the data, from its saved
    hyper-parameters: before its logits are computed and cached."""
    from types import SimpleNamespace

    from lightning.fabric.utilities.data import AttributeDict

    from askexpert.files.checkpoints import check_same_classes, load_checkpoint

    hparams = AttributeDict(load_checkpoint(checkpoint, mmap=True).get("hyper_parameters", {}))
    subset = hparams.get("subset")
    if expert is None and subset is not None:
        raise UserError(f"{name} checkpoint {checkpoint} is an expert's ({len(subset)} classes), not the {name}'s")
    if expert is not None and subset is None:
        raise UserError(f"expert {name}'s checkpoint {checkpoint} is not an expert's (it has no class subset)")
    if expert is not None:
        check_expert_classes(subset, partition, expert, name, partition_path)
    if hparams.get("num_classes") is not None:
        check_same_classes(SimpleNamespace(hparams=hparams), datamodule, f"{name} ({checkpoint})")


def images_of(labels: torch.Tensor, classes: list[int]) -> int:
    """How many of `labels` are in `classes`: the n of an expert's own-class accuracy (its standard error in
    `collab/sanity.py`)."""
    return int(torch.isin(labels, torch.tensor(classes, dtype=labels.dtype)).sum())


@dataclass
class LoadedRun:
    """A finished run's models as cached logits, wired into a `CollaborativeSystem` (no routing chosen yet)."""

    layout: RunLayout
    datamodule: ImageDataModule
    partition: Partition
    profile: Any
    cost_model: CostModel
    generalist: dict
    base: dict
    families: dict[str, list[dict]]  # expert family (strategy name, "static") -> per expert: cached logits + meta
    specialization: str
    system: CollaborativeSystem

    def model_cost(self, meta: dict):
        size = meta.get("image_size") or self.datamodule.hparams.image_size
        return model_cost(self.profile, meta["model_name"], meta["num_outputs"], size)

    def expert_set(self, family: str) -> ExpertSet:
        members = self.families[family]
        models = [self.model_cost(m["meta"]) for m in members]
        costs = [self.cost_model.offload(model) for model in models]
        return ExpertSet(family, [m["logits"] for m in members], costs, models)


def _run_logits(layout: RunLayout, name: str, stage_dir: str, expert, partition, datamodule, splits) -> dict:
    """One model's cached logits (computed and cached when missing), after checking its checkpoint's kind."""
    checkpoint = _require(layout.best(stage_dir), f"{name} checkpoint")
    check_checkpoint_kind(checkpoint, name, expert, partition, layout.partition, datamodule)
    return cached_logits(name, checkpoint, datamodule, splits, layout.logits, layout.shared_logits)


def load_run(
    layout: RunLayout,
    data: dict,
    specialization: str,
    static_baseline: bool,
    profile_path: str,
    num_experts: int | None = None,
) -> LoadedRun:
    """Every model of a finished run as cached logits (computing and caching any missing ones), checked against
    the partition and the data, with the system they make. Many routing settings can then be evaluated on it
    (`LoadedRun.system.evaluate`) for the cost of one load."""
    profile = load_profile(profile_path)
    datamodule = ImageDataModule(**data)
    partition = Partition.load(_require(layout.partition, "partition artefact"))
    partition.check_classes(datamodule.class_names, "the run's data")
    if num_experts is not None and partition.num_experts != num_experts:
        raise UserError(
            f"{layout.partition} has {partition.num_experts} experts but the run was made with {num_experts}"
        )
    datamodule.setup()
    # the calibration split's logits too when there is one: the router's temperature and τ come from it
    splits = (*SPLITS, CALIB) if datamodule.split_sizes().get(CALIB) else SPLITS
    generalist = _run_logits(layout, "generalist", layout.stage_dir("generalist"), None, partition, datamodule, splits)
    base = _run_logits(layout, "base", layout.stage_dir("base"), None, partition, datamodule, splits)
    families = {}
    for family in expert_families(specialization, static_baseline):
        families[family] = []
        for i in range(partition.num_experts):
            name = f"{family}_{i}"
            found = _run_logits(layout, name, layout.expert_dir(family, i), i, partition, datamodule, splits)
            check_expert_classes(found["meta"].get("subset"), partition, i, name, layout.partition)
            families[family].append(found)
    # the edge sends the stored image (its bytes are the transfer); each model computes at its own input size
    image_shape = tuple(datamodule.tensors("test")[0].shape[1:])
    run = LoadedRun(
        layout, datamodule, partition, profile, CostModel(profile, image_shape), generalist, base, families,
        specialization, system=None,
    )  # fmt: skip
    run.system = CollaborativeSystem(
        generalist=generalist["logits"],
        labels=generalist["labels"],
        coverage=partition.coverage(),
        experts=run.expert_set(specialization),
        cost_model=run.cost_model,
        generalist_cost=run.model_cost(generalist["meta"]),
        base=base["logits"],
        base_cost=run.model_cost(base["meta"]),
        static_experts=run.expert_set(STATIC) if STATIC in families else None,
    )
    return run


def accuracy_on_test(found: dict) -> float:
    """A model's test accuracy from its cached logits."""
    return float((found["logits"]["test"].argmax(-1) == found["labels"]["test"]).double().mean())


def expert_entries(run: LoadedRun, family: str) -> list[dict]:
    """The report's entry of every expert of `family`: classes, model, accuracy on its own classes."""
    entries = []
    labels = run.generalist["labels"]["test"]
    for i, member in enumerate(run.families[family]):
        meta = member["meta"]
        own, generalist_own = run.system.subset_accuracy(run.expert_set(family), i)
        classes = run.partition.classes_of(i)
        entries.append(
            {
                "name": f"{family}_{i}",
                "classes": classes,
                "class_names": [run.datamodule.class_names[c] for c in classes],
                "strategy": family,
                "init": meta.get("init"),
                "model_name": meta["model_name"],
                "params": meta["params"],
                "subset_test_acc": own,
                "generalist_subset_test_acc": generalist_own,
                "subset_test_images": images_of(labels, classes),
                "test_acc": accuracy_on_test(member),
            }
        )
    return entries


def evaluate_run(
    layout: RunLayout,
    data: dict,
    specialization: str,
    static_baseline: bool,
    routing: RoutingConfig,
    profile_path: str,
    seed: int,
    num_experts: int | None = None,
) -> dict:
    """The report dictionary of a finished run (computing and caching any missing logits), opening with its
    sanity findings (`collab/sanity.py`)."""
    routing.check(ImageDataModule(**data).num_classes)
    run = load_run(layout, data, specialization, static_baseline, profile_path, num_experts)
    return run_report(run, routing, seed)


def run_report(run: LoadedRun, routing: RoutingConfig, seed: int) -> dict:
    """The report dictionary of a loaded run under `routing`, opening with its sanity findings."""
    routing.check(run.datamodule.num_classes)
    result = run.system.evaluate(routing)
    profile_entry = {**run.profile.describe(), "path": in_run(run.profile.path, run.layout.root)}
    has_static = STATIC in run.families and run.specialization != STATIC
    report = {
        "data": _data_entry(run.datamodule.describe()),
        "generalist": _model_entry(run.generalist),
        "base": _model_entry(run.base),
        "partition": {
            "path": in_run(run.layout.partition, run.layout.root),
            "method": run.partition.method,
            "num_experts": run.partition.num_experts,
        },
        "experts": expert_entries(run, run.specialization),
        "static_experts": expert_entries(run, STATIC) if has_static else [],
        **result,
        # what the report's plots draw (collab/diagnostics.py): calibration bins, per-class routing counts
        **diagnostics(run.system, result["routing"], result["selected"]["threshold"]),
        "costs": _costs_entry(run, profile_entry),
        "provenance": {
            "packages": package_versions(),
            "git_revision": git_revision(),
            "seed": seed,
            "profile": profile_entry,
            "torch_threads": torch.get_num_threads(),
        },
    }
    # Warnings first, so that report.json opens with what a reader must know before trusting any number.
    return {"findings": findings(report), **report}


def _data_entry(described: dict) -> dict:
    """The report's data entry: what the data was (`ImageDataModule.describe`), split sizes included."""
    keys = ("source", "root", "num_classes", "train_size", "val_size", "test_size")
    return {
        **{key: described[key] for key in keys},
        **({"calib_size": described["calib_size"]} if "calib_size" in described else {}),
        "stand_in": described["stand_in"],
    }


def _model_entry(found: dict) -> dict:
    """The report's entry of an all-class model (the generalist, the base model) from its cached logits."""
    return {
        "model_name": found["meta"]["model_name"],
        "params": found["meta"]["params"],
        "test_acc": accuracy_on_test(found),
    }


def _costs_entry(run: LoadedRun, profile_entry: dict) -> dict:
    """The report's costs: the profile, the image's bytes, and each model's cost (one expert per family)."""
    models = {
        "generalist": run.generalist["meta"],
        "base": run.base["meta"],
        **{f: fs[0]["meta"] for f, fs in run.families.items()},
    }
    return {
        "profile": profile_entry,
        "image_bytes": run.cost_model.image_bytes,
        "models": {
            name: {k: v for k, v in vars(run.model_cost(meta)).items() if k != "name"}
            | {
                "model_name": meta["model_name"],
                "image_size": meta.get("image_size") or run.datamodule.hparams.image_size,
            }
            for name, meta in models.items()
        },
    }
