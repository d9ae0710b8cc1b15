"""`progressive` (ours, the default): move the data mix step by step from natural toward the subset.

Why each piece exists:
- **Schedule.** The out-of-subset share of each batch starts at its natural value (the expert first sees the
  data its `base` init was trained on, so nothing is forgotten abruptly) and decays on `schedule` to `floor`
  by `decay_end` of the run. The expert spends more and more of its step budget on its own classes, where
  it has to beat the generalist, while its features move gradually instead of all at once.
- **Floor, true labels.** Out-of-subset samples never vanish and keep their true labels: routing sends some
  foreign samples to every expert (the generalist's top-k is not always right), and an expert that still
  answers them well turns a routing mistake into a correct answer instead of a guaranteed error. The floor
  also keeps the expert's prior calibrated so it does not assign every image to its own classes.
- **Distillation (optional, `distill_weight`).** On out-of-subset samples, part of the loss matches the
  frozen base model's softened predictions, which carry the base's knowledge of all classes at a fraction of
  the samples; it needs `init: base`.
- **Progressive unfreezing (optional, `unfreeze_until`).** Early in the run only the top blocks (and head)
  train, then the blocks below unfreeze one by one until `unfreeze_until` of the run; it protects the base's
  low-level features while the head adapts to the new mix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from askexpert.errors import UserError
from strategies.base import SpecializationStrategy

SCHEDULES = ("linear", "cosine", "exponential", "step")


def decay(schedule: str, start: float, floor: float, t: float, steps: int = 4) -> float:
    """Value at `t` in [0, 1] of a decay from `start` (t = 0) to `floor` (t = 1)."""
    t = min(1.0, max(0.0, t))
    if schedule == "linear":
        w = t
    elif schedule == "cosine":
        w = 0.5 * (1.0 - math.cos(math.pi * t))
    elif schedule == "step":
        w = min(steps, math.floor(t * steps + 1e-9)) / steps
    else:  # exponential: geometric interpolation, fast early and slow near the floor
        if floor <= 0.0 or start <= 0.0:
            raise UserError("the exponential schedule needs a positive start and floor")
        return start * (floor / start) ** t
    return start + (floor - start) * w


class ProgressiveSpecialization(SpecializationStrategy):
    """Args:
    start: out-of-subset share at the start; null means the natural share of the training split.
    floor: out-of-subset share from `decay_end` of the run on.
    decay_end: fraction of the run (0-1] at which the share reaches `floor`.
    schedule: shape of the decay: linear, cosine, exponential or step.
    steps: number of drops of the `step` schedule (steps + 1 levels from start to floor).
    distill_weight: weight in [0, 1] of distillation from the base model on out-of-subset samples.
    temperature: softmax temperature of the distillation.
    unfreeze_until: fraction of the run over which ViT blocks unfreeze top-down (0 trains all from the start).
    """

    name = "progressive"

    def __init__(
        self,
        start: float | None = None,
        floor: float = 0.05,
        decay_end: float = 0.3,
        schedule: str = "cosine",
        steps: int = 4,
        distill_weight: float = 0.0,
        temperature: float = 2.0,
        unfreeze_until: float = 0.0,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise UserError(f"unknown progressive schedule {schedule!r}; schedules: {', '.join(SCHEDULES)}")
        if not 0.0 <= floor <= 1.0 or (start is not None and not 0.0 <= start <= 1.0):
            raise UserError("progressive start and floor are shares of a batch: they must be in [0, 1]")
        if start is not None and floor > start:
            raise UserError(f"progressive floor ({floor}) exceeds its start ({start}): the share would grow")
        if not 0.0 < decay_end <= 1.0 or steps < 1:
            raise UserError("progressive decay_end must be in (0, 1] and steps at least 1")
        if not 0.0 <= distill_weight <= 1.0 or temperature <= 0:
            raise UserError("progressive distill_weight must be in [0, 1] and temperature positive")
        if schedule == "exponential" and (floor <= 0.0 or (start is not None and start <= 0.0)):
            raise UserError("the exponential schedule needs a positive start and floor")
        if not 0.0 <= unfreeze_until <= 1.0:
            raise UserError("progressive unfreeze_until must be in [0, 1]")
        self.start = start
        self.floor = floor
        self.decay_end = decay_end
        self.schedule = schedule
        self.steps = steps
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.unfreeze_until = unfreeze_until
        self.teacher: torch.nn.Module | None = None
        self._unfrozen: tuple[int, int] | None = None  # (module id, trainable blocks) last applied

    def check(self, natural: float) -> None:
        start = natural if self.start is None else self.start
        if self.schedule == "exponential" and start <= 0.0:
            raise UserError("the exponential schedule needs a positive start (this expert covers every class)")
        if self.floor > start:
            raise UserError(
                f"progressive floor ({self.floor}) exceeds its start ({start:.3f}, the natural out-of-subset "
                "share of this expert): lower the floor or set start"
            )

    def out_share(self, progress: float, natural: float) -> float:
        start = natural if self.start is None else self.start
        return decay(self.schedule, start, self.floor, progress / self.decay_end, self.steps)

    # -- optional pieces -----------------------------------------------------------------------------
    def validate(self, pl_module, datamodule):
        in_mask = super().validate(pl_module, datamodule)
        if self.distill_weight > 0:
            if not pl_module.hparams.get("base_path"):
                raise UserError(
                    "progressive distillation (distill_weight > 0) needs the base model: --model.base_path FILE"
                )
            pl_module._base_checkpoint()  # the teacher's architecture and classes, checked before the run
        return in_mask

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._unfrozen = None
        if stage == "fit" and self.distill_weight > 0:
            self.teacher = pl_module.base_network()  # frozen copy of the base model (raises without one)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.teacher = None

    def on_progress(self, module, progress: float) -> None:
        if self.unfreeze_until <= 0:
            return
        blocks = getattr(module.net, "blocks", None)
        if blocks is None:
            raise UserError("progressive unfreezing needs a ViT with `blocks` (set unfreeze_until: 0)")
        depth = len(blocks)
        trainable = depth if progress >= self.unfreeze_until else 1 + int((depth - 1) * progress / self.unfreeze_until)
        if (id(module), trainable) == self._unfrozen:  # unchanged since the last step: nothing to walk
            return
        self._unfrozen = (id(module), trainable)
        for i, block in enumerate(blocks):
            block.requires_grad_(i >= depth - trainable)
        everything = trainable == depth
        for name in ("patch_embed", "pos_embed", "cls_token", "reg_token"):
            part = getattr(module.net, name, None)
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(everything)
            elif isinstance(part, torch.nn.Parameter):
                part.requires_grad_(everything)

    def loss(self, module, inputs, logits, labels, in_subset):
        per_sample = F.cross_entropy(logits, labels, label_smoothing=module.hparams.label_smoothing, reduction="none")
        if self.teacher is None or self.distill_weight == 0:
            return per_sample.mean()
        outside = ~in_subset
        rows = self._outside_rows(outside)
        if rows is not None and len(rows) == 0:
            return per_sample.mean()
        if rows is None:  # not drawn by our sampler: find the rows from the mask (waits for the GPU)
            if not outside.any():
                return per_sample.mean()
            rows = torch.nonzero(outside).flatten()
        t = self.temperature
        with torch.no_grad():
            teacher_logits = self.teacher(inputs[rows])
        distill = F.kl_div(
            F.log_softmax(logits[rows] / t, -1),
            F.log_softmax(teacher_logits / t, -1),
            log_target=True,
            reduction="none",
        ).sum(-1) * (t * t)
        mixed = per_sample.clone()
        mixed[rows] = (1 - self.distill_weight) * per_sample[rows] + self.distill_weight * distill
        return mixed.mean()

    def _outside_rows(self, outside: torch.Tensor) -> torch.Tensor | None:
        """Indices (ascending, like a boolean mask's) of the out-of-subset rows, without a host sync.

        The teacher runs on those rows only, so their number must be known on the host: the sampler drew it
        (`batch_out_count`). `nonzero_static` with that size never waits for the GPU, unlike `nonzero` or
        boolean indexing; an asynchronous device assert checks that the count matches the batch.
        """
        count = self.batch_out_count
        if count is None:
            return None
        torch._assert_async(outside.sum() == count, "sampler's out-of-subset count differs from the batch")
        return torch.nonzero_static(outside, size=count).flatten()
