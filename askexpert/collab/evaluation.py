"""Evaluate a pipeline run folder: cached logits -> collaborative system -> report dictionary and files.

The folder layout is fixed (`RunLayout`), so `pipeline` (which trains into it) and `evaluate --run DIR`
(which re-reads it, e.g. with another gate or device profile) agree on where everything is.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from importlib import metadata

import torch

from askexpert.collab.costs import CostModel, load_profile, model_cost
from askexpert.collab.logits import cached_logits
from askexpert.collab.sanity import findings
from askexpert.collab.system import CollaborativeSystem, ExpertSet, RoutingConfig
from askexpert.errors import UserError
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import Partition

SPLITS = ("val", "test")
CALIB = "calib"  # the calibration split, when the data has one (`--data.calib_fraction`)
STATIC = "static"
PACKAGES = ("askexpert", "torch", "lightning", "timm", "torchmetrics")


@dataclass(frozen=True)
class RunLayout:
    """Where a pipeline run keeps each artefact (`shared_logits`: its logits cache is shared by many runs)."""

    root: str
    shared_logits: bool = False

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.root, stage)

    def best(self, stage_dir: str) -> str:
        return os.path.join(stage_dir, "checkpoints", "best.ckpt")

    @property
    def partition(self) -> str:
        return os.path.join(self.root, "partition.json")

    def expert_dir(self, family: str, index: int) -> str:
        return os.path.join(self.root, "experts", family, str(index))

    @property
    def logits(self) -> str:
        return os.path.join(self.root, "logits")

    @property
    def settings(self) -> str:
        return os.path.join(self.root, "pipeline.yaml")


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

    from askexpert.checkpoints import check_same_classes, load_checkpoint

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


def expert_families(specialization: str, static_baseline: bool) -> list[str]:
    """The expert folders a run trains: its strategy's, and static ones for the baseline."""
    families = [specialization]
    if static_baseline and specialization != STATIC:
        families.append(STATIC)
    return families


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
    profile = load_profile(profile_path)
    datamodule = ImageDataModule(**data)
    routing.check(datamodule.num_classes)
    partition = Partition.load(_require(layout.partition, "partition artefact"))
    partition.check_classes(datamodule.class_names, "the run's data")
    if num_experts is not None and partition.num_experts != num_experts:
        raise UserError(
            f"{layout.partition} has {partition.num_experts} experts but the run was made with {num_experts}"
        )
    datamodule.setup()
    # the calibration split's logits too when there is one: the router's temperature and τ come from it
    splits = (*SPLITS, CALIB) if datamodule.split_sizes().get(CALIB) else SPLITS

    def logits_of(name: str, stage_dir: str, expert: int | None = None) -> dict:
        checkpoint = _require(layout.best(stage_dir), f"{name} checkpoint")
        check_checkpoint_kind(checkpoint, name, expert, partition, layout.partition, datamodule)
        return cached_logits(name, checkpoint, datamodule, splits, layout.logits, layout.shared_logits)

    generalist = logits_of("generalist", layout.stage_dir("generalist"))
    base = logits_of("base", layout.stage_dir("base"))
    families = {}
    for family in expert_families(specialization, static_baseline):
        families[family] = []
        for i in range(partition.num_experts):
            found = logits_of(f"{family}_{i}", layout.expert_dir(family, i), expert=i)
            check_expert_classes(found["meta"].get("subset"), partition, i, f"{family}_{i}", layout.partition)
            families[family].append(found)

    # the edge sends the stored image (its bytes are the transfer); each model computes at its own input size
    image_shape = tuple(datamodule.tensors("test")[0].shape[1:])
    cost_model = CostModel(profile, image_shape)

    def cost(meta: dict):
        size = meta.get("image_size") or datamodule.hparams.image_size
        return model_cost(profile, meta["model_name"], meta["num_outputs"], size)

    def expert_set(family: str) -> ExpertSet:
        members = families[family]
        return ExpertSet(family, [m["logits"] for m in members], [cost_model.offload(cost(m["meta"])) for m in members])

    system = CollaborativeSystem(
        generalist=generalist["logits"],
        labels=generalist["labels"],
        coverage=partition.coverage(),
        experts=expert_set(specialization),
        cost_model=cost_model,
        generalist_cost=cost(generalist["meta"]),
        base=base["logits"],
        base_cost=cost(base["meta"]),
        static_experts=expert_set(STATIC) if STATIC in families else None,
    )
    result = system.evaluate(routing)

    def test_acc(found: dict) -> float:
        return float((found["logits"]["test"].argmax(-1) == found["labels"]["test"]).double().mean())

    def expert_entries(family: str) -> list[dict]:
        entries = []
        for i, member in enumerate(families[family]):
            meta = member["meta"]
            own, generalist_own = system.subset_accuracy(expert_set(family), i)
            classes = partition.classes_of(i)
            entries.append(
                {
                    "name": f"{family}_{i}",
                    "classes": classes,
                    "class_names": [datamodule.class_names[c] for c in classes],
                    "strategy": family,
                    "init": meta.get("init"),
                    "model_name": meta["model_name"],
                    "params": meta["params"],
                    "subset_test_acc": own,
                    "generalist_subset_test_acc": generalist_own,
                    "subset_test_images": images_of(generalist["labels"]["test"], classes),
                    "test_acc": test_acc(member),
                }
            )
        return entries

    described = datamodule.describe()
    profile_entry = {**profile.describe(), "path": in_run(profile.path, layout.root)}
    models = {
        "generalist": generalist["meta"],
        "base": base["meta"],
        **{f: fs[0]["meta"] for f, fs in families.items()},
    }
    report = {
        "data": {
            "source": described["source"],
            "root": described["root"],
            "num_classes": described["num_classes"],
            "train_size": described["train_size"],
            "val_size": described["val_size"],
            "test_size": described["test_size"],
            **({"calib_size": described["calib_size"]} if "calib_size" in described else {}),
            "stand_in": described["stand_in"],
        },
        "generalist": {
            "model_name": generalist["meta"]["model_name"],
            "params": generalist["meta"]["params"],
            "test_acc": test_acc(generalist),
        },
        "base": {
            "model_name": base["meta"]["model_name"],
            "params": base["meta"]["params"],
            "test_acc": test_acc(base),
        },
        "partition": {
            "path": in_run(layout.partition, layout.root),
            "method": partition.method,
            "num_experts": partition.num_experts,
        },
        "experts": expert_entries(specialization),
        "static_experts": expert_entries(STATIC) if STATIC in families and specialization != STATIC else [],
        **result,
        "costs": {
            "profile": profile_entry,
            "image_bytes": cost_model.image_bytes,
            "models": {
                name: {k: v for k, v in vars(cost(meta)).items() if k != "name"}
                | {
                    "model_name": meta["model_name"],
                    "image_size": meta.get("image_size") or datamodule.hparams.image_size,
                }
                for name, meta in models.items()
            },
        },
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
