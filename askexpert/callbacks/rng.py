"""Random-generator states in the checkpoint, so a resumed `fit` draws exactly what the uninterrupted run drew.

What draws random numbers while a model trains, and from which generator:
- the training loader's shuffling (`RandomSampler`) and the base seed every DataLoader iterator draws when it
  starts (validation loaders too): the global torch (CPU) generator, once per epoch;
- random crop + flip (datamodules/augment.py): the global generator of the batch's device (CPU or CUDA);
- dropout and drop-path: the global generator of the model's device;
- timm's Mixup / CutMix: numpy's global generator (python's `random` is saved too, for anything else);
- the strategies' batch sampler (strategies/sampler.py): its own generator, seeded by (seed, epoch), so there
  is nothing to save;
- DataLoader workers (`--data.num_workers` > 0) are seeded from a base seed their iterator draws from the global
  generator; the loaders are not persistent, so every epoch (and every validation) draws it again, in a resumed
  run as in an uninterrupted one.

`RandomStateCheckpoint` (always installed by the CLI) saves the python, numpy, torch and CUDA states in every
resumable checkpoint (`state_dict`, stored under `checkpoint["callbacks"]`) as tensors and plain numbers, which
`torch.load(weights_only=True)` reads. Seeding the shuffling and augmentation with explicit per-epoch generators
would also be exact, but it would change what every fresh run draws (and the published numbers with it);
saving the states changes nothing in an uninterrupted run.

When: `last.ckpt` is written at the end of epoch e (after validation, or at the training epoch's end without
it), and nothing draws a random number between that write and the start of epoch e + 1, whose first draw is
the training loader's iterator. A resumed run is seeded and builds its model (drawing what the uninterrupted
run drew long before), then Lightning restores the checkpoint's callback states and only then creates the
training loader's iterator (while the optimizer's schedule counts the batches, or when training starts); the
sanity check in between runs under `isolate_rng`. So the states are applied when the checkpoint is restored,
and the resumed epoch's iterator, augmentation, Mixup and dropout draw from where the uninterrupted run's did.
Exact for the end-of-epoch checkpoints that `--ckpt_path last` resumes (a mid-epoch checkpoint restarts its
epoch's loader anyway); tests/test_run_safety.py compares every weight of killed-and-resumed runs with
uninterrupted ones.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

STATE_VERSION = 1


def collect_states() -> dict[str, Any]:
    """The global generators' states, as tensors and plain Python values (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "version": STATE_VERSION,
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss_next},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    # only when this process uses CUDA: asking for the states would otherwise create a CUDA context
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_states(states: dict[str, Any]) -> None:
    """Set the global generators to `states` (from `collect_states`)."""
    python = states["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    saved = states["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        # a run resumed on fewer GPUs restores the ones it has
        for index, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device=index)


class RandomStateCheckpoint(Callback):
    """Saves the global random states with every resumable checkpoint and restores them when `fit` resumes
    from one (see the module docstring for why at that moment)."""

    def __init__(self) -> None:
        self._fitting = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning restores callback states for evaluations too; only a resumed fit continues the streams
        self._fitting = stage == "fit"

    def state_dict(self) -> dict[str, Any]:
        return collect_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting and state_dict.get("version") == STATE_VERSION:
            restore_states(state_dict)
