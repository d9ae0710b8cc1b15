"""The batch sampler behind every specialization strategy: each step draws a set share from outside the subset.

A strategy is, on the data side, one function: `out_share(progress) -> fraction of the batch drawn from
outside the expert's subset`, with progress running from 0 (first step) to 1 (last step). This sampler turns
that function into index batches:
- every epoch has the same number of steps (the natural epoch of the whole training split), so all
  strategies train for the same optimizer-step budget whatever their subset size;
- inside and outside the subset, samples come from reshuffled pools (without replacement until a pool is
  used up), so every in-subset image is seen equally often;
- the out-of-subset count of a step is `out_share * batch_size`, stochastically rounded, so the share drawn
  over an epoch follows the schedule exactly in expectation, also for fractional counts;
- batches depend only on (seed, epoch), so a resumed run draws what the uninterrupted one would have.
  The epoch comes from `epoch_fn` when given (Lightning calls `set_epoch` on a DataLoader's sampler, not on
  its batch sampler, so the strategy passes `lambda: trainer.current_epoch`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class _Pool:
    """An endless stream of indices: successive random permutations of `members`."""

    def __init__(self, members: torch.Tensor, generator: torch.Generator) -> None:
        self.members = members
        self.generator = generator
        self.order = members[:0]
        self.position = 0

    def take(self, count: int) -> torch.Tensor:
        taken = []
        while count > 0:
            if self.position >= len(self.order):
                self.order = self.members[torch.randperm(len(self.members), generator=self.generator)]
                self.position = 0
            chunk = self.order[self.position : self.position + count]
            self.position += len(chunk)
            count -= len(chunk)
            taken.append(chunk)
        return torch.cat(taken) if taken else self.members[:0]


class SubsetMixBatchSampler(Sampler[list[int]]):
    """Index batches with a scheduled share of out-of-subset samples (see the module docstring).

    Args:
        in_subset: dataset indices of the expert's classes.
        out_of_subset: dataset indices of every other class.
        batch_size: samples per step.
        steps_per_epoch: steps in one epoch (the same for every strategy).
        total_steps: steps of the whole run; progress of step s is s / (total_steps - 1).
        out_share: progress in [0, 1] -> share of the batch from outside the subset, in [0, 1].
        seed: base seed; epoch e uses seed + 1_000_003 * e (distinct across seeds and epochs).
        epoch_fn: returns the current epoch when each epoch's iteration starts (else `set_epoch` decides).
        batches_run_per_epoch: batches the trainer consumes per epoch when it stops early
            (`limit_train_batches`); progress counts those. Default: `steps_per_epoch`.
    """

    def __init__(
        self,
        in_subset: torch.Tensor,
        out_of_subset: torch.Tensor,
        batch_size: int,
        steps_per_epoch: int,
        total_steps: int,
        out_share: Callable[[float], float],
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        batches_run_per_epoch: int | None = None,
    ) -> None:
        if len(in_subset) == 0:
            raise ValueError("the expert's subset has no training samples")
        self.in_subset = torch.as_tensor(in_subset, dtype=torch.long)
        self.out_of_subset = torch.as_tensor(out_of_subset, dtype=torch.long)
        self.batch_size = batch_size
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = max(1, total_steps)
        self.out_share = out_share
        self.seed = seed
        self.epoch = 0
        self.epoch_fn = epoch_fn
        self.batches_run_per_epoch = batches_run_per_epoch or self.steps_per_epoch
        # out-of-subset count of every batch handed out and not yet trained on, oldest first: the loader
        # fetches ahead, so the count of the batch being trained is the oldest one (see `next_drawn`)
        self.drawn: deque[int] = deque()

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def next_drawn(self) -> int | None:
        """Out-of-subset count of the next batch in training order (None when none was recorded).

        Batches are consumed in the order they were drawn; batches drawn ahead but not trained when an epoch
        stops early (`limit_train_batches`) are dropped when the next epoch's iteration starts.
        """
        return self.drawn.popleft() if self.drawn else None

    def progress(self, step: int) -> float:
        return min(1.0, step / max(1, self.total_steps - 1))

    def __iter__(self) -> Iterator[list[int]]:
        if self.epoch_fn is not None:
            self.epoch = int(self.epoch_fn())
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        self.drawn.clear()
        inside, outside = _Pool(self.in_subset, generator), _Pool(self.out_of_subset, generator)
        for s in range(self.steps_per_epoch):
            step = self.epoch * self.batches_run_per_epoch + s
            share = min(1.0, max(0.0, float(self.out_share(self.progress(step)))))
            if len(self.out_of_subset) == 0:
                share = 0.0
            expected = share * self.batch_size
            n_out = int(expected) + int(torch.rand((), generator=generator).item() < expected - int(expected))
            batch = torch.cat([inside.take(self.batch_size - n_out), outside.take(n_out)])
            self.drawn.append(n_out)
            yield batch[torch.randperm(len(batch), generator=generator)].tolist()
