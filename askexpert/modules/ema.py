"""The exponential moving average of a classifier's weights (`--model.ema_decay`, timm's `ModelEmaV3`): kept
beside the network, updated after every optimizer step, swapped in for validation, test and prediction, and
saved so that best.ckpt holds the EMA weights as the model's own and last.ckpt resumes exactly.

A mixin of `ClassifierModule` (askexpert/modules/classifier.py), which checks the settings and calls
`_save_ema` / `_load_ema` from its checkpoint hooks.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3


class WeightEma:
    """The EMA hooks of a LightningModule with a `net` and `ema_decay` / `ema_warmup` hyperparameters."""

    _raw_weights: dict[str, torch.Tensor] | None = None  # while evaluation uses the EMA weights: the raw ones

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            # as timm's train script: after every optimizer step, `step` counting the steps taken (this one too;
            # the first update copies the weights); global_step is restored on resume, so the decay is too
            self.ema.update(self.net, step=self.trainer.global_step)

    @property
    def ema(self) -> ModelEmaV3 | None:
        """The EMA of the network's weights (`--model.ema_decay`), once fitting starts or a checkpoint brings it.

        Not a registered submodule: the module's state dict stays that of the network (best.ckpt holds the EMA
        weights under the network's own keys), DDP does not see it, and precision plugins do not cast it."""
        return self.__dict__.get("_ema")

    def _new_ema(self) -> ModelEmaV3:
        h = self.hparams
        ema = ModelEmaV3(self.net, decay=h.ema_decay, use_warmup=bool(h.get("ema_warmup")), dtype=torch.float32)
        return ema.requires_grad_(False)

    def on_fit_start(self) -> None:
        if self.hparams.get("ema_decay") is None:
            object.__setattr__(self, "_ema", None)
        elif self.ema is None:  # a fresh run (or one resumed from a checkpoint without an EMA): the weights now
            object.__setattr__(self, "_ema", self._new_ema())
        else:  # restored by `on_load_checkpoint` before the model moved to its device
            self.ema.to(device=self.device)

    def _use_ema_weights(self) -> None:
        """Evaluate with the EMA weights: copy them into the network, keeping the raw ones (an exact swap)."""
        if self.ema is None or self._raw_weights is not None:
            return
        self.ema.to(device=self.device)
        current = self.net.state_dict()
        self._raw_weights = {name: value.detach().clone() for name, value in current.items()}
        with torch.no_grad():
            for name, value in self.ema.module.state_dict().items():
                current[name].copy_(value)

    def _use_raw_weights(self) -> None:
        if self._raw_weights is None:
            return
        current = self.net.state_dict()
        with torch.no_grad():
            for name, value in self._raw_weights.items():
                current[name].copy_(value)
        self._raw_weights = None

    def on_validation_start(self) -> None:
        self._use_ema_weights()

    def on_validation_end(self) -> None:
        self._use_raw_weights()

    def on_test_start(self) -> None:
        self._use_ema_weights()

    def on_test_end(self) -> None:
        self._use_raw_weights()

    def on_predict_start(self) -> None:
        self._use_ema_weights()

    def on_predict_end(self) -> None:
        self._use_raw_weights()

    def _save_ema(self, checkpoint: dict) -> None:
        """A resumable checkpoint (last.ckpt) gets the raw weights and the EMA (`ema_state_dict`); a weights-only
        one (best.ckpt) the EMA weights as the network's own. Tensors in plain dicts only (weights_only loads)."""
        if self.ema is None:
            return
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            return
        ema = {name: value.detach() for name, value in self.ema.module.state_dict().items()}
        if "optimizer_states" in checkpoint:  # Lightning adds it to every checkpoint but weights-only ones
            checkpoint["ema_state_dict"] = ema
            weights = self._raw_weights or {}  # saved during an evaluation: the raw weights are set aside
        else:
            weights = ema
        for name, value in weights.items():
            if f"net.{name}" in state:
                state[f"net.{name}"] = value

    def _load_ema(self, checkpoint: dict) -> None:
        saved = checkpoint.get("ema_state_dict")
        if saved is None or self.hparams.get("ema_decay") is None:
            # no EMA (a best.ckpt's weights already are the EMA's): evaluate the weights the checkpoint brings
            object.__setattr__(self, "_ema", None)
            return
        ema = self._new_ema()
        ema.module.load_state_dict(saved)
        object.__setattr__(self, "_ema", ema)
