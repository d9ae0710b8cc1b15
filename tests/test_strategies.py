"""Specialization strategies do what they say, measured from what the sampler actually draws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import strategies
from askexpert.errors import UserError
from askexpert.modules import ExpertModule
from strategies.base import SpecializationStrategy
from strategies.dustbin import DustbinSpecialization
from strategies.progressive import ProgressiveSpecialization, decay
from strategies.sampler import SubsetMixBatchSampler

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 10
SUBSET = [2, 5, 7]


def make_labels(per_class: int = 40) -> torch.Tensor:
    return torch.arange(NUM_CLASSES).repeat(per_class)


def sampler_for(strategy: SpecializationStrategy, labels: torch.Tensor, epochs: int, batch_size: int = 32, seed=0):
    inside = torch.isin(labels, torch.tensor(SUBSET))
    natural = float(1 - inside.float().mean())
    steps_per_epoch = len(labels) // batch_size
    return SubsetMixBatchSampler(
        torch.nonzero(inside).flatten(),
        torch.nonzero(~inside).flatten(),
        batch_size,
        steps_per_epoch,
        steps_per_epoch * epochs,
        lambda p: strategy.out_share(p, natural),
        seed=seed,
    ), natural


def drawn_out_share_per_epoch(sampler: SubsetMixBatchSampler, labels: torch.Tensor, epochs: int) -> list[float]:
    shares = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        drawn = torch.tensor([i for batch in sampler for i in batch])
        shares.append(float((~torch.isin(labels[drawn], torch.tensor(SUBSET))).float().mean()))
    return shares


def scheduled_share_per_epoch(sampler: SubsetMixBatchSampler, epochs: int) -> list[float]:
    n = sampler.steps_per_epoch
    return [sum(sampler.out_share(sampler.progress(e * n + s)) for s in range(n)) / n for e in range(epochs)]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential", "step"])
def test_progressive_draws_follow_the_schedule(schedule):
    labels = make_labels(200)  # 2000 samples, 62 steps of 32 per epoch
    strategy = ProgressiveSpecialization(floor=0.1, decay_end=0.6, schedule=schedule)
    sampler, natural = sampler_for(strategy, labels, epochs=5)
    measured = drawn_out_share_per_epoch(sampler, labels, 5)
    planned = scheduled_share_per_epoch(sampler, 5)
    for got, want in zip(measured, planned, strict=True):
        assert got == pytest.approx(want, abs=0.02)
    assert measured[0] > 0.5 and measured[-1] == pytest.approx(0.1, abs=0.02)  # natural share 0.7 -> floor 0.1
    assert all(a >= b - 0.02 for a, b in zip(measured, measured[1:], strict=False))  # never grows


def test_static_never_draws_an_out_of_subset_sample():
    labels = make_labels()
    sampler, _ = sampler_for(strategies.strategy_class("static")(), labels, epochs=3)
    assert drawn_out_share_per_epoch(sampler, labels, 3) == [0.0, 0.0, 0.0]


def test_full_draws_the_natural_mix():
    labels = make_labels(200)
    sampler, natural = sampler_for(strategies.strategy_class("full")(), labels, epochs=2)
    for share in drawn_out_share_per_epoch(sampler, labels, 2):
        assert share == pytest.approx(natural, abs=0.02)


def test_dustbin_draws_its_fixed_mix():
    labels = make_labels(200)
    sampler, _ = sampler_for(DustbinSpecialization(other_share=0.3), labels, epochs=2)
    for share in drawn_out_share_per_epoch(sampler, labels, 2):
        assert share == pytest.approx(0.3, abs=0.02)


def test_every_strategy_takes_the_same_number_of_steps():
    labels = make_labels()
    lengths = {len(sampler_for(cls(), labels, epochs=2)[0]) for cls in strategies.REGISTRY.values()}
    assert lengths == {len(labels) // 32}


def test_batches_depend_only_on_seed_and_epoch():
    labels = make_labels()
    a, _ = sampler_for(ProgressiveSpecialization(), labels, epochs=2, seed=3)
    b, _ = sampler_for(ProgressiveSpecialization(), labels, epochs=2, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(0)
    assert list(a) != list(b)


def test_static_sees_every_subset_sample_equally_often():
    labels = make_labels()
    sampler, _ = sampler_for(strategies.strategy_class("static")(), labels, epochs=1)
    counts = torch.bincount(torch.tensor([i for batch in sampler for i in batch]), minlength=len(labels))
    inside = torch.isin(labels, torch.tensor(SUBSET))
    assert counts[~inside].sum() == 0
    assert counts[inside].max() - counts[inside].min() <= 1


# -- losses -------------------------------------------------------------------------------------------
@pytest.fixture
def expert():
    return ExpertModule(subset=SUBSET, init="scratch", model_name="vit_micro_patch8_32", num_classes=NUM_CLASSES)


def batch(n: int = 16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % NUM_CLASSES
    return images, labels, torch.isin(labels, torch.tensor(SUBSET))


def test_dustbin_maps_out_of_subset_labels_to_other():
    _, labels, inside = batch()
    targets = DustbinSpecialization.dustbin_targets(labels, inside, NUM_CLASSES)
    assert torch.equal(targets[inside], labels[inside])
    assert (targets[~inside] == NUM_CLASSES).all()


def test_dustbin_loss_is_cross_entropy_against_other():
    expert = ExpertModule(
        subset=SUBSET, init="scratch", model_name="vit_micro_patch8_32", num_classes=NUM_CLASSES, other_output=True
    )
    images, labels, inside = batch()
    inputs = expert.preprocess(images)
    logits = expert.net(inputs)
    assert logits.shape == (16, NUM_CLASSES + 1)
    loss = DustbinSpecialization().loss(expert, inputs, logits, labels, inside)
    targets = torch.where(inside, labels, torch.full_like(labels, NUM_CLASSES))
    expected = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=expert.hparams.label_smoothing)
    assert loss.item() == pytest.approx(expected.item())


def test_distillation_changes_the_loss_on_out_of_subset_samples_only(expert):
    images, labels, inside = batch()
    inputs = expert.preprocess(images)
    logits = expert.net(inputs)
    plain = ProgressiveSpecialization(distill_weight=0.0).loss(expert, inputs, logits, labels, inside)
    distilling = ProgressiveSpecialization(distill_weight=0.5)
    torch.manual_seed(1)
    distilling.teacher = ExpertModule(
        subset=SUBSET, init="scratch", model_name="vit_micro_patch8_32", num_classes=NUM_CLASSES
    ).net.eval()
    with_teacher = distilling.loss(expert, inputs, logits, labels, inside)
    assert with_teacher.item() != pytest.approx(plain.item())
    # with only in-subset samples, the teacher has nothing to say
    only_inside = distilling.loss(expert, inputs[inside], logits[inside], labels[inside], inside[inside])
    plain_inside = ProgressiveSpecialization().loss(
        expert, inputs[inside], logits[inside], labels[inside], inside[inside]
    )
    assert only_inside.item() == pytest.approx(plain_inside.item())


def test_distillation_toward_an_identical_teacher_adds_nothing(expert):
    images, labels, inside = batch()
    inputs = expert.preprocess(images)
    strategy = ProgressiveSpecialization(distill_weight=1.0)
    strategy.teacher = expert.net  # a teacher equal to the student: the KL term is zero at this point
    logits = expert.net(inputs)
    ce_only = torch.nn.functional.cross_entropy(
        logits[inside], labels[inside], label_smoothing=expert.hparams.label_smoothing, reduction="sum"
    ) / len(labels)
    assert strategy.loss(expert, inputs, logits, labels, inside).item() == pytest.approx(ce_only.item(), rel=1e-4)


def test_progressive_unfreezing_goes_top_down(expert):
    strategy = ProgressiveSpecialization(unfreeze_until=0.5)
    blocks = expert.net.blocks
    strategy.on_progress(expert, 0.0)
    assert [b.weight.requires_grad for b in (blk.norm1 for blk in blocks)] == [False, True]
    assert not expert.net.patch_embed.proj.weight.requires_grad and expert.net.head.weight.requires_grad
    strategy.on_progress(expert, 0.5)
    assert all(p.requires_grad for p in expert.net.parameters())


# -- schedules and parameters -------------------------------------------------------------------------
def test_decay_shapes_start_and_end_where_asked():
    for schedule in ("linear", "cosine", "exponential", "step"):
        assert decay(schedule, 0.8, 0.1, 0.0) == pytest.approx(0.8)
        assert decay(schedule, 0.8, 0.1, 1.0) == pytest.approx(0.1)
    assert decay("step", 0.8, 0.0, 0.3, steps=4) == pytest.approx(0.6)


def test_a_floor_above_the_start_is_refused():
    with pytest.raises(UserError, match=r"floor \(0.5\) exceeds its start \(0.2\)"):
        ProgressiveSpecialization(start=0.2, floor=0.5)
    strategy = ProgressiveSpecialization(floor=0.9)  # start = natural share, known only with the data
    with pytest.raises(UserError, match="exceeds its start"):
        strategy.check(natural=0.7)


def test_bad_parameters_are_refused():
    with pytest.raises(UserError, match="unknown progressive schedule 'sigmoid'"):
        ProgressiveSpecialization(schedule="sigmoid")
    with pytest.raises(UserError, match="other_share"):
        DustbinSpecialization(other_share=1.5)


# -- the registry -------------------------------------------------------------------------------------
def test_the_shipped_strategies_are_registered():
    assert {"full", "static", "dustbin", "progressive"} <= set(strategies.strategy_names())
    assert strategies.DEFAULT_STRATEGY == "progressive"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UserError, match="unknown specialization 'greedy'; specializations: dustbin, full"):
        strategies.strategy_class("greedy")


def test_a_subclass_with_a_name_registers_itself():
    class Halfway(SpecializationStrategy):
        name = "test-halfway"

        def out_share(self, progress, natural):
            return natural / 2

    try:
        assert strategies.strategy_class("test-halfway") is Halfway
    finally:
        strategies.REGISTRY.pop("test-halfway")


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_every_strategy_has_a_yaml_with_its_defaults(name):
    import inspect

    path = REPO / "configs" / "specialization" / f"{name}.yaml"
    assert path.is_file(), f"strategy {name!r} needs {path.relative_to(REPO)}"
    slot = yaml.safe_load(path.read_text())["specialization"]
    cls = strategies.strategy_class(name)
    assert slot["class_path"] == f"{cls.__module__}.{cls.__qualname__}"
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    assert slot.get("init_args", {}) == defaults


def test_distillation_moves_out_of_subset_predictions_toward_the_teacher(expert):
    images, labels, inside = batch()
    inputs = expert.preprocess(images)
    strategy = ProgressiveSpecialization(distill_weight=1.0, temperature=2.0)
    torch.manual_seed(5)
    strategy.teacher = ExpertModule(
        subset=SUBSET, init="scratch", model_name="vit_micro_patch8_32", num_classes=NUM_CLASSES
    ).net.eval()
    logits = expert.net(inputs).detach().requires_grad_(True)
    strategy.loss(expert, inputs, logits, labels, inside).backward()
    with torch.no_grad():
        teacher = strategy.teacher(inputs[~inside]).div(2).log_softmax(-1)

        def kl(z):
            return torch.nn.functional.kl_div(
                z[~inside].div(2).log_softmax(-1), teacher, log_target=True, reduction="sum"
            )

        assert kl(logits - 0.5 * logits.grad) < kl(logits)
        assert logits.grad[inside].abs().sum() > 0  # in-subset samples still learn from their labels


def test_the_sampler_reads_the_trainer_epoch_when_given_one():
    labels = make_labels()
    strategy = ProgressiveSpecialization()
    manual, _ = sampler_for(strategy, labels, epochs=3)
    manual.set_epoch(2)
    driven, _ = sampler_for(strategy, labels, epochs=3)
    driven.epoch_fn = lambda: 2  # what the strategy passes: lambda: trainer.current_epoch
    assert list(driven) == list(manual) and driven.epoch == 2
