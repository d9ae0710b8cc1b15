"""The calibration split (`--data.calib_fraction`, issue 13 item 8): held out of training and checkpoint selection,
used for the router's temperature and threshold, and invisible to the identities of existing stages.

The end-to-end check (a pipeline trained with a calibration split reports `chosen_on: calib`) shares the trained
run of tests/test_readonly_runs.py.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO
from helpers.routing import COVER, PROFILE

from askexpert.collab.costs import CostModel, ModelCost, profile_from_dict
from askexpert.collab.routing import fit_temperature
from askexpert.collab.system import CollaborativeSystem, ExpertSet, RoutingConfig
from askexpert.errors import UserError
from datamodules.datamodule import ImageDataModule

# Stage identities of configs/pipeline/demo.yaml as the code before the calibration split computed them (the
# original code's `plan_stages`, /tmp/askexpert_before at the time; they are also the ones in the stages.json of
# the demo run made by `make demo` before this change). An existing run or ablation store must keep them.
DEMO_IDENTITIES = {
    "generalist": "c3794acf4185b631",
    "base": "f86ee52969a98df0",
    "partition": "0cb7f84649e579f0",
    "experts/progressive/0": "0cbc89b9ddfebc1c",
    "experts/progressive/1": "59699ac38f527abf",
    "experts/progressive/2": "7fb7613c8b4102e3",
    "experts/progressive/3": "a7d55659045b0ce1",
}


# -- the split ------------------------------------------------------------------------------------------
def datamodule(**kwargs) -> ImageDataModule:
    dm = ImageDataModule(synthetic_train_per_class=10, synthetic_test_per_class=1, val_fraction=0.2, **kwargs)
    dm.setup()
    return dm


def keys(images: torch.Tensor) -> set[bytes]:
    return {bytes(image.numpy()) for image in images}


def test_the_calibration_split_is_held_out_of_training_and_validation():
    plain, calib = datamodule(), datamodule(calib_fraction=0.2)
    assert calib.split_sizes() == {"train": 600, "val": 200, "calib": 200, "test": 100}
    assert torch.bincount(calib.tensors("calib")[1], minlength=100).eq(2).all()  # stratified: 2 of each class
    # validation (which selects checkpoints) is the same images with or without it; training gives them up
    assert torch.equal(plain.tensors("val")[0], calib.tensors("val")[0])
    train, held = keys(calib.tensors("train")[0]), keys(calib.tensors("calib")[0])
    assert train.isdisjoint(held) and train | held == keys(plain.tensors("train")[0])
    assert held.isdisjoint(keys(calib.tensors("val")[0]))
    # without one, nothing about the data reads differently from before
    assert "calib" not in plain.split_sizes() and "calib_size" not in plain.describe()
    assert len(plain.tensors("calib")[1]) == 0


@pytest.mark.parametrize("values", [{"calib_fraction": 1.0}, {"calib_fraction": -0.1}, {"calib_fraction": 0.8}])
def test_impossible_fractions_are_refused(values):
    with pytest.raises(UserError, match="--data.calib_fraction must be in"):
        ImageDataModule(**values, val_fraction=0.2)


# -- the router ---------------------------------------------------------------------------------------------
def split(seed: int, sharpness: float, n: int = 400) -> dict:
    """One split of hand-made logits: 6 classes, 3 experts of 2; `sharpness` sets how sure the generalist is."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(6, (n,), generator=g)

    def logits(strength: float, own: int | None = None) -> torch.Tensor:
        out = torch.randn(n, 6, generator=g)
        boost = torch.full((n,), strength)
        if own is not None:
            boost = torch.where(COVER[own][labels], boost, torch.zeros(n))
        out[torch.arange(n), labels] += boost
        return out

    return {"labels": labels, "generalist": logits(sharpness), "experts": [logits(4.0, e) for e in range(3)]}


def system(**splits: dict) -> CollaborativeSystem:
    cost_model = CostModel(profile_from_dict(PROFILE))
    small, big = ModelCost("g", 0.02, 3.0, 3.02, "flops", "flops"), ModelCost("e", 0.5, 51.0, 3.5, "flops", "flops")
    experts = [{name: s["experts"][e] for name, s in splits.items()} for e in range(3)]
    return CollaborativeSystem(
        {name: s["generalist"] for name, s in splits.items()},
        {name: s["labels"] for name, s in splits.items()},
        COVER,
        ExpertSet("progressive", experts, [cost_model.offload(big)] * 3),
        cost_model,
        small,
    )


def test_threshold_and_temperature_come_from_the_calibration_split():
    val, calib, test = split(1, 0.5), split(2, 3.0), split(3, 1.5)
    with_calib = system(val=val, calib=calib, test=test).evaluate(RoutingConfig())
    calib_as_val = system(val=calib, test=test).evaluate(RoutingConfig())
    without = system(val=val, test=test).evaluate(RoutingConfig())
    assert with_calib["selected"]["chosen_on"] == "calib" and without["selected"]["chosen_on"] == "val"
    temperature = with_calib["routing"]["temperature_value"]
    assert temperature == pytest.approx(fit_temperature(calib["generalist"], calib["labels"]))
    assert temperature != pytest.approx(without["routing"]["temperature_value"])
    # everything is what choosing on that split gives; the report is on test either way
    assert with_calib["routing"] == calib_as_val["routing"] and with_calib["sweep"] == calib_as_val["sweep"]
    assert {**with_calib["selected"], "chosen_on": "val"} == calib_as_val["selected"]
    # an empty calibration split (none asked for) leaves the choice to validation
    empty = {
        "labels": calib["labels"][:0],
        "generalist": calib["generalist"][:0],
        "experts": [e[:0] for e in calib["experts"]],
    }
    assert system(val=val, calib=empty, test=test).evaluate(RoutingConfig()) == without


# -- identities and the pipeline ----------------------------------------------------------------------------
def test_demo_stage_identities_are_unchanged(tmp_path, monkeypatch):
    from askexpert.pipeline.settings import explicit_data_keys, parser
    from askexpert.pipeline.stages import plan_stages
    from askexpert.runs.layout import RunLayout

    monkeypatch.chdir(REPO)  # the demo config names its stage files relative to the checkout
    argv = ["--config", "configs/pipeline/demo.yaml", "--out", str(tmp_path / "demo"), "--static_baseline", "false"]
    settings = parser().parse_args(argv)
    assert settings.data.calib_fraction == 0.0  # the default: no calibration split
    stages = plan_stages(settings, RunLayout(settings.out), explicit=explicit_data_keys(argv))
    assert {stage.name: stage.identity for stage in stages} == DEMO_IDENTITIES


def test_a_calibration_split_is_part_of_the_identity_once_set():
    from askexpert.pipeline.settings import DATASET_KEYS
    from askexpert.pipeline.stages import _identity_config

    assert "calib_fraction" in DATASET_KEYS  # every stage of a run sees the same splits
    config = {"model": {"m": 1}, "data": {"batch_size": 64, "calib_fraction": 0.0}}
    assert _identity_config(config) == {"model": {"m": 1}, "data": {"batch_size": 64}}
    changed = {"model": {"m": 1}, "data": {"batch_size": 64, "calib_fraction": 0.1}}
    assert _identity_config(changed) == changed  # trained without those images: another stage


def test_a_stage_file_may_not_set_its_own_calibration_split(tmp_path):
    from askexpert.pipeline.settings import DATASET_KEYS, FitStage
    from askexpert.pipeline.stage_arguments import fit_arguments as _fit_arguments

    stage_file = tmp_path / "stage.yaml"
    stage_file.write_text(yaml.safe_dump({"data": {"calib_fraction": 0.2}}))
    data = {key: None for key in DATASET_KEYS} | {"calib_fraction": 0.0}
    with pytest.raises(UserError, match="sets data.calib_fraction to 0.2 but the pipeline's is 0.0"):
        _fit_arguments(FitStage(config=[str(stage_file)]), "base", data, set(), 0, str(tmp_path / "run"), None)
