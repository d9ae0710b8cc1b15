"""The LightningModule shared by every image classifier in askexpert (generalist, base model, experts).

It takes plain typed arguments only, so `save_hyperparameters()` records everything needed to rebuild it
and `load_from_checkpoint(path)` works without a config. The network itself comes from timm's registry
(our 32-px ViTs live in `askexpert.models`). The module owns its input normalisation: it accepts uint8
images (or floats in [0, 1]) exactly as the DataModule or a user's own pipeline produces them.
"""

from __future__ import annotations

import math
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR
from torchmetrics.classification import MulticlassAccuracy

from askexpert.errors import UserError
from askexpert.models import create_network
from askexpert.models.pretrained import file_normalisation, load_file_weights, load_published_weights
from askexpert.modules.ema import WeightEma
from askexpert.modules.metrics import ClassificationMetrics
from askexpert.modules.recipe import check_recipe

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class ClassifierModule(WeightEma, pl.LightningModule):
    """Image classifier with AdamW + warmup/cosine, label smoothing, optional Mixup/CutMix, and metrics.

    Args:
        model_name: timm registry name (`vit_edge_patch4_32`, `vit_medium_patch4_32`, ... see
            `askexpert.models`).
        num_classes: number of output classes (linked from the DataModule by the CLI).
        class_to_superclass: superclass index of every class, for superclass metrics (linked from the data).
        superclass_names: names for the per-superclass metrics (linked from the data).
        class_names: the dataset's class names (linked from the data), so a checkpoint records which classes
            it answers and models trained on different class sets are never combined.
        image_size: side of the images the network sees (linked from `--data.image_size` by the CLI). Images of
            another size (the stored size, see the DataModule) are resized to it on the device, batched, here in
            the model, so training, evaluation, prediction and routing all see the same input.
        img_size: the architecture's own input size, for timm models that take one; leave it unset (the model
            is built at `image_size`). Set, it must equal `image_size`.
        pretrained: start from timm's published weights (downloaded when online, else the local cache), or
            from `pretrained_path` when that is given (see `askexpert/models/pretrained.py`).
        pretrained_path: local weights file (safetensors, a state dict, or a timm or Lightning checkpoint);
            setting it implies `pretrained`.
        lr: peak learning rate of AdamW (of the backbone when `head_lr` is set).
        head_lr: learning rate of the classifier head (fine-tuning: a new head learns faster than a pretrained
            backbone); unset: `lr`.
        layer_decay: layer-wise learning-rate decay of the backbone (timm's `param_groups_layer_decay`: block i
            of n gets `lr * layer_decay ** (n - i)`); unset: none.
        weight_decay: AdamW weight decay (not applied to norms, biases and position embeddings).
        warmup_epochs: linear warm-up length, in (possibly fractional) epochs.
        schedule: `cosine` (decay to `min_lr_ratio * lr` by the last step) or `constant` after warm-up.
        min_lr_ratio: final learning rate as a fraction of `lr` for the cosine schedule.
        label_smoothing: label smoothing of the cross-entropy loss.
        drop_path_rate: stochastic depth of the ViT blocks.
        mixup_alpha: Mixup strength (0 disables).
        cutmix_alpha: CutMix strength (0 disables).
        random_erase: probability of random erasing per training image (timm's RandomErasing, per-pixel noise,
            applied to the normalised input on the device; 0 disables).
        mean: per-channel input mean, for images scaled to [0, 1]; unset: the pretrained weights' own
            normalisation when starting from pretrained weights, else CIFAR-100's statistics.
        std: per-channel input standard deviation (unset: as `mean`).
        compile: compile the network with `torch.compile` when the Trainer sets the model up (pays off on
            GPUs for the medium models; costs ~50 s of compilation per model on a 2-core CPU for no gain).
        compile_mode: `torch.compile` mode: default, reduce-overhead, max-autotune or
            max-autotune-no-cudagraphs.
        ema_decay: keep an exponential moving average of the weights (timm's `ModelEmaV3`, fp32, on the model's
            device, updated after every optimizer step) with this decay in (0, 1), e.g. 0.9998; unset: no EMA.
            Validation, test and prediction evaluate the EMA weights, and best.ckpt holds them as the model's
            own weights (every consumer gets them); last.ckpt holds the raw weights and the EMA (`ema_state_dict`),
            so a resume is exact.
        ema_warmup: ramp the EMA's decay up from 0 (timm's warm-up, `1 - (1 + step) ** -2/3`, capped at
            `ema_decay`): for short runs, where a high decay would keep the EMA near the initial weights.
    """

    def __init__(
        self,
        model_name: str = "vit_edge_patch4_32",
        num_classes: int = 100,
        class_to_superclass: list[int] | None = None,
        superclass_names: list[str] | None = None,
        class_names: list[str] | None = None,
        image_size: int = 32,
        img_size: int | None = None,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        lr: float = 1e-3,
        head_lr: float | None = None,
        layer_decay: float | None = None,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        drop_path_rate: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        random_erase: float = 0.0,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        compile: bool = False,
        compile_mode: str = "default",
        ema_decay: float | None = None,
        ema_warmup: bool = False,
    ) -> None:
        super().__init__()
        check_recipe(
            num_classes,
            class_names,
            image_size,
            lr,
            head_lr,
            layer_decay,
            warmup_epochs,
            schedule,
            label_smoothing,
            random_erase,
            compile_mode,
            ema_decay,
            ema_warmup,
            regularisation={
                "weight_decay": weight_decay,
                "min_lr_ratio": min_lr_ratio,
                "drop_path_rate": drop_path_rate,
                "mixup_alpha": mixup_alpha,
                "cutmix_alpha": cutmix_alpha,
            },
        )
        self.save_hyperparameters()
        self.net = create_network(model_name, self.num_outputs, drop_path_rate, image_size, img_size)
        # the weights' own normalisation when starting from pretrained weights (recorded, so a checkpoint
        # predicts with what it was trained with, whatever timm's defaults become)
        pretrained_cfg = getattr(self.net, "pretrained_cfg", {}) if self.loads_pretrained else {}
        self._explicit_normalisation = mean is not None or std is not None
        self.set_normalisation(
            mean or pretrained_cfg.get("mean") or CIFAR100_MEAN, std or pretrained_cfg.get("std") or CIFAR100_STD
        )
        self.resuming = False  # set by the CLI for `fit --ckpt_path`: the checkpoint brings the weights
        self._weights_loaded = False
        self.eraser = None
        if random_erase > 0:
            self.eraser = RandomErasing(probability=random_erase, mode="pixel", device="cpu")
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            self.soft_loss = SoftTargetCrossEntropy()
        # validate_args=False: the value checks run `torch.unique` (a host sync) on every update; torchmetrics
        # 1.9 happens to skip them for float predictions, but nothing promises that it will keep doing so
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_metrics = ClassificationMetrics(num_classes, class_to_superclass, superclass_names)
        self.test_metrics = ClassificationMetrics(num_classes, class_to_superclass, superclass_names)
        # the weight EMA (see `ema`) and, while evaluation uses the EMA weights, the raw ones it displaced
        object.__setattr__(self, "_ema", None)
        self._raw_weights: dict[str, torch.Tensor] | None = None

    @property
    def num_outputs(self) -> int:
        """Width of the network's head (experts with an "other" output have one more than num_classes)."""
        return self.hparams.num_classes

    def set_normalisation(self, mean, std) -> None:
        """Input mean/std, recorded in the hyper-parameters so a checkpoint predicts with what it trained with."""
        self.hparams.mean, self.hparams.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.hparams.mean) != 3 or len(self.hparams.std) != 3 or min(self.hparams.std) <= 0:
            raise UserError(f"mean and std need 3 values each (std positive), got {list(mean)} and {list(std)}")
        self.register_buffer("mean", torch.tensor(self.hparams.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.hparams.std).view(1, 3, 1, 1), persistent=False)

    @property
    def loads_pretrained(self) -> bool:
        return bool(self.hparams.get("pretrained") or self.hparams.get("pretrained_path"))

    # -- initial weights -----------------------------------------------------------------------------
    def prepare_initial_weights(self) -> None:
        """Load the pretrained weights now, checked against the architecture (the CLI calls this before a run
        writes anything). Never in `__init__`: a trained model reloads from its own checkpoint without the
        weights file or a network."""
        if self._weights_loaded or not self.loads_pretrained:
            return
        h = self.hparams
        if h.pretrained_path:
            note = load_file_weights(self.net, h.model_name, h.pretrained_path, self.num_outputs)
            recorded = file_normalisation(h.pretrained_path)
            if recorded and not self._explicit_normalisation:  # an askexpert checkpoint: the statistics it used
                self.set_normalisation(*recorded)
        else:
            note = load_published_weights(self.net, h.model_name, self.num_outputs)
        print(f"askexpert: {note}", file=sys.stderr)
        self._weights_loaded = True

    def setup(self, stage: str) -> None:
        # A resumed run restores its own weights (Lightning sets trainer.ckpt_path only after this hook).
        if stage == "fit" and not self.resuming and not self.trainer.ckpt_path:
            self.prepare_initial_weights()

    def configure_model(self) -> None:
        # In place (nn.Module.compile): the state-dict keys stay those of the plain network, so checkpoints
        # of compiled and eager runs are interchangeable.
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            self.net.compile(mode=self.hparams.compile_mode)
            self._compiled = True

    # -- inference -----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images of any size -> normalised float input of the network's size."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        size = self.hparams.get("image_size", 32)
        if images.shape[-2:] != (size, size):
            # bilinear, with antialiasing when shrinking (torchvision's Resize on tensors does the same)
            shrink = images.shape[-1] > size or images.shape[-2] > size
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        # in the module's own float type: `--trainer.precision 16-true`/`bf16-true` converts the weights and these
        # buffers, not the images, and float32 images would not run through a half-precision network
        return ((images - self.mean) / self.std).to(self.mean.dtype)

    def training_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The network's training input: `preprocess`, then random erasing when enabled."""
        inputs = self.preprocess(images)
        if self.eraser is not None:
            self.eraser.device = inputs.device  # timm draws its noise on this device
            inputs = self.eraser(inputs)
        return inputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for uint8 or [0, 1] float images (N, 3, H, W)."""
        return self.net(self.preprocess(images))

    # -- training ------------------------------------------------------------------------------------
    def training_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one training batch; `targets` are class ids, or soft targets after Mixup/CutMix."""
        if targets.ndim == 2:
            return self.soft_loss(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        inputs, targets = self.training_inputs(images), labels
        if self.mixup is not None and len(labels) % 2 == 0:  # timm's Mixup pairs samples: needs even batches
            inputs, targets = self.mixup(inputs, labels)
        logits = self.net(inputs)
        loss = self.training_loss(logits, targets)
        self.log_training_step(loss, logits.detach(), labels)
        return loss

    def log_training_step(self, loss: torch.Tensor, answers: torch.Tensor, labels: torch.Tensor) -> None:
        """Log the step's loss and accumulate the epoch's training accuracy, without a host sync.

        Not `prog_bar=True`: Lightning converts every progress-bar value with `.item()` after every training
        batch, even with the bar off, which makes the CPU wait for the GPU on every step.
        `askexpert.callbacks.progress.IntervalProgressBar` shows `train/loss` at the logging interval instead.
        Every `self.log` costs ~0.5-1 ms of Python (Lightning walks the logged entry to move it to the
        device each time), so the loss is logged only on the steps whose step metrics the loggers write, on
        an epoch's last batch (for the progress bar) and on its first (the first `self.log` of a run pays
        one-off costs, ~0.25 s here: better in the first step than in the middle of a timed stretch): the
        written rows are the same. The accuracy is only accumulated here (`update`: no per-batch value is
        needed) and logged once per epoch.
        """
        self.train_acc.update(answers, labels)
        if self.writes_step_metrics():
            self.log("train/loss", loss)

    def writes_step_metrics(self) -> bool:
        """Whether the loggers write this training batch's step metrics (Lightning's own test, as its
        LearningRateMonitor uses it), or it is an epoch's first or last batch; True outside a Trainer."""
        trainer = self._trainer
        if trainer is None:
            return True
        first = trainer.fit_loop.epoch_loop.batch_idx == 0
        return trainer._logger_connector.should_update_logs or trainer.is_last_batch or first

    def on_train_epoch_end(self) -> None:
        # the epoch's accuracy (torchmetrics reduces it over DDP processes), as `self.log(metric)` would give;
        # sync_dist only averages equal copies (and keeps Lightning from warning under DDP)
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc.compute(), sync_dist=True)
        self.train_acc.reset()

    def _eval_step(self, batch, metrics: ClassificationMetrics, prefix: str) -> None:
        images, labels = batch
        logits = self(images)
        # sync_dist: the epoch's mean over every DDP process's batches, reduced once at the epoch's end
        loss = F.cross_entropy(logits, labels)
        self.log(f"{prefix}/loss", loss, on_epoch=True, batch_size=len(labels), sync_dist=True)
        metrics.update(logits, labels)

    def _log_metrics(self, metrics: ClassificationMetrics, prefix: str) -> None:
        results = metrics.compute()
        results.pop("images")
        main = {"acc", "superclass_acc"}
        for name, value in results.items():
            # torchmetrics already reduced the value over DDP processes; sync_dist only averages equal copies
            self.log(f"{prefix}/{name}", value, prog_bar=name in main, sync_dist=True)
        metrics.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(images).softmax(-1)
        confidence, prediction = probs.max(-1)
        out = {"prediction": prediction, "confidence": confidence, "probs": probs}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out["label"] = batch[1]
        return out

    # -- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        fused = self.device.type == "cuda"  # fused AdamW kernels exist for CUDA tensors only
        grouped = h.get("head_lr") is not None or h.get("layer_decay") is not None
        params = self.fine_tuning_groups() if grouped else self.net
        optimizer = create_optimizer_v2(params, opt="adamw", lr=h.lr, weight_decay=h.weight_decay, fused=fused)
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise UserError("the learning-rate schedule needs a finite run: set --trainer.max_epochs or max_steps")
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(int(h.warmup_epochs * total_steps / epochs), max(0, int(total_steps) - 1))
        if h.schedule == "cosine" and grouped:
            # every group decays by the same factor to min_lr_ratio of its own rate (CosineAnnealingLR's floor is
            # one absolute rate for all groups: it would raise a deep layer's small rate instead)
            span, floor = max(1, int(total_steps) - warmup), h.min_lr_ratio
            after = LambdaLR(optimizer, lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / span)))
        elif h.schedule == "cosine":
            after = CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps) - warmup), eta_min=h.lr * h.min_lr_ratio)
        else:
            after = LambdaLR(optimizer, lambda step: 1.0)
        scheduler = after
        if warmup > 0:
            start = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
            scheduler = SequentialLR(optimizer, [start, after], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def fine_tuning_groups(self) -> list[dict]:
        """AdamW parameter groups with their own learning rates: layer-wise decay (timm's grouping of the
        backbone into layers) and the head at `head_lr`; weight decay as timm's default groups apply it."""
        h = self.hparams
        no_decay = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else set()
        if h.get("layer_decay") is not None:
            groups = param_groups_layer_decay(self.net, h.weight_decay, no_decay, layer_decay=h.layer_decay)
        else:
            groups = param_groups_weight_decay(self.net, h.weight_decay, no_decay)
        head = {id(p) for p in self.net.get_classifier().parameters()} if h.get("head_lr") is not None else set()
        result = []
        for group in groups:
            scale = group.pop("lr_scale", 1.0)
            group.pop("param_names", None)
            params = list(group.pop("params"))
            body = [p for p in params if id(p) not in head]
            top = [p for p in params if id(p) in head]
            if body:
                result.append({**group, "params": body, "lr": h.lr * scale})
            if top:
                result.append({**group, "params": top, "lr": h.head_lr})
        return result

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `askexpert.modules.loading.load_classifier` rebuild the right class from the file alone.
        checkpoint["askexpert_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        self._save_ema(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._load_ema(checkpoint)
