"""What every specialization strategy is: a Lightning callback that decides the data mix and the loss.

A strategy answers two questions about training an expert on its class subset:
1. which samples each step draws, as a function of training progress: `out_share(progress, natural)`, the
   share of a batch drawn from outside the subset (`natural` is that share in the training split);
2. how the loss treats in- and out-of-subset samples: `loss(...)`.
How the expert's weights start (`init`), the optimizer and checkpointing belong to `ExpertModule` and
Lightning. At `setup("fit")` the strategy hands the DataModule a `SubsetMixBatchSampler`, so every strategy
trains for the same number of optimizer steps (the natural epoch of the whole split) whatever it draws.

A subclass with a `name` registers itself: a new strategy is one file in `strategies/` (discovered by the
package) plus its parameters in `configs/specialization/<name>.yaml`; `--specialization <name>` selects it.
"""

from __future__ import annotations

import os
from typing import ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from askexpert.errors import UserError
from strategies.sampler import SubsetMixBatchSampler

REGISTRY: dict[str, type[SpecializationStrategy]] = {}


def batches_per_epoch(trainer: pl.Trainer, natural_steps: int) -> int:
    """Training batches Lightning will run per epoch (`limit_train_batches` may cut the natural epoch)."""
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return max(1, min(natural_steps, limit))
    return max(1, int(natural_steps * limit)) if limit is not None else natural_steps


def planned_batches(trainer: pl.Trainer, per_epoch: int) -> int:
    """Training batches of the whole run (what progress 1.0 means); `max_steps` counts optimizer steps."""
    by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    by_steps = None
    if trainer.max_steps and trainer.max_steps > 0:
        by_steps = trainer.max_steps * trainer.accumulate_grad_batches
    candidates = [s for s in (by_epochs, by_steps) if s]
    if not candidates:
        raise UserError("a specialization schedule needs a finite run: set --trainer.max_epochs or max_steps")
    return min(candidates)


class SpecializationStrategy(Callback):
    """Base class: subclasses set `name` and implement `out_share`; they may override `loss`."""

    name: ClassVar[str] = ""
    # True for strategies whose expert has one extra "other" output (C + 1 logits).
    other_output: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in REGISTRY and REGISTRY[cls.name].__qualname__ != cls.__qualname__:
                raise TypeError(f"two specialization strategies are named {cls.name!r}")
            REGISTRY[cls.name] = cls

    def __init__(self) -> None:
        super().__init__()
        self.sampler: SubsetMixBatchSampler | None = None
        self.total_steps = 1
        self.batches_per_epoch = 1
        self.natural_out_share = 0.0
        self.batch_out_count: int | None = None  # out-of-subset samples of the current batch, when known

    # -- what subclasses define ----------------------------------------------------------------------
    def out_share(self, progress: float, natural: float) -> float:
        """Share of each batch drawn from outside the subset at `progress` in [0, 1]."""
        raise NotImplementedError

    def loss(
        self, module, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, in_subset: torch.Tensor
    ) -> torch.Tensor:
        """Training loss of one batch; the default is cross-entropy on the true labels of all samples."""
        return F.cross_entropy(logits, labels, label_smoothing=module.hparams.label_smoothing)

    def check(self, natural: float) -> None:
        """Validate parameters that depend on the data (e.g. a schedule's start); raise UserError."""

    def on_progress(self, module, progress: float) -> None:
        """Called before every training step (e.g. to unfreeze layers as training advances)."""

    # -- wiring into Lightning -----------------------------------------------------------------------
    def validate(self, pl_module: pl.LightningModule, datamodule) -> torch.Tensor:
        """Check that this strategy can train `pl_module` on `datamodule`; returns the in-subset mask of the
        training labels. The CLI calls it before a run writes anything, `setup` again at fit time."""
        subset = getattr(pl_module, "subset", None)
        if subset is None:
            raise UserError(f"the {self.name!r} specialization trains experts only (model class ExpertModule)")
        if bool(pl_module.hparams.get("other_output")) != self.other_output:
            raise UserError(
                f"the {self.name!r} specialization needs an expert with other_output={self.other_output} "
                "(the CLI sets it from --specialization)"
            )
        if datamodule is None or not hasattr(datamodule, "tensors"):
            raise UserError("specialization strategies need askexpert's ImageDataModule")
        labels = datamodule.tensors("train")[1]
        in_mask = torch.isin(labels, subset.cpu())
        if not in_mask.any():
            raise UserError(f"expert {pl_module.hparams.expert_index}: no training images of its classes")
        self.natural_out_share = float(1.0 - in_mask.float().mean())
        self.check(self.natural_out_share)
        return in_mask

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        in_mask = self.validate(pl_module, datamodule)
        labels = datamodule.tensors("train")[1]
        batch_size = datamodule.hparams.batch_size
        steps_per_epoch = max(1, len(labels) // batch_size)  # the natural epoch, the same for every strategy
        self.batches_per_epoch = batches_per_epoch(trainer, steps_per_epoch)
        self.total_steps = planned_batches(trainer, self.batches_per_epoch)
        self.sampler = SubsetMixBatchSampler(
            in_subset=torch.nonzero(in_mask).flatten(),
            out_of_subset=torch.nonzero(~in_mask).flatten(),
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            total_steps=self.total_steps,
            out_share=lambda progress: self.out_share(progress, self.natural_out_share),
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            epoch_fn=lambda: trainer.current_epoch,
            batches_run_per_epoch=self.batches_per_epoch,
        )
        datamodule.train_batch_sampler = self.sampler
        pl_module.specialization = self

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.datamodule is not None and hasattr(trainer.datamodule, "train_batch_sampler"):
            trainer.datamodule.train_batch_sampler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # progress counted in batches, like the sampler's (global_step counts optimizer steps)
        done = trainer.current_epoch * self.batches_per_epoch + batch_idx
        self.on_progress(pl_module, min(1.0, done / max(1, self.total_steps - 1)))
        # this batch's out-of-subset count as the sampler drew it (host side), for losses that need a shape
        self.batch_out_count = self.sampler.next_drawn() if self.sampler is not None else None
        labels = batch[1]
        # measured on the device (a look-up, not `torch.isin`, which syncs for large subsets); logging a host
        # number instead would copy it to the GPU with a blocking copy, a sync of its own
        drawn = (~pl_module.in_subset(labels)).float().mean()
        pl_module.log("specialization/out_share", drawn, on_step=True, on_epoch=True, batch_size=len(labels))
