"""The expert: a near-edge ViT specialised on a subset of the classes, answering over all of them.

It still answers over all C classes (a sample the router sent to the wrong expert can still be answered),
and it reports metrics twice: on every test image (`val/acc`, ...) and on its own classes only
(`val/subset_acc`, ...), which is what it is trained to improve. A `dustbin` expert has one extra output,
"other"; an "other" answer counts as wrong in every metric here (the collaborative system replaces it with
the generalist's answer).

How it starts is its own setting, separate from the specialization strategy:
- `scratch`: random weights;
- `base`: the weights of the base model (`base_path`: a BaseModule checkpoint of the same architecture), which is
  also the "offload everything" baseline; the check refuses another kind of checkpoint (an expert's, the
  generalist's), another architecture or another class set;
- `pretrained`: pretrained weights, from a local file (`pretrained_path`) or timm's published weights
  (`askexpert/models/pretrained.py`), with a new head.
Initial weights are loaded when training starts (not in `__init__`), so loading a trained expert from its
own checkpoint never needs the base file. Unless `mean`/`std` are set, an expert normalises its input as the
model it starts from: the base checkpoint's, or the pretrained weights' own.

Mixup/CutMix mix each image with its mirror in the batch and weigh the strategy's loss of both label sets by
the mixing ratio, so every strategy (dustbin targets, distillation rows) works on mixed batches unchanged.
"""

from __future__ import annotations

import copy

import torch

from askexpert.errors import UserError
from askexpert.files.checkpoints import MODULE_CLASSES, load_checkpoint
from askexpert.models.pretrained import classifier_names
from askexpert.modules.classifier import ClassifierModule
from askexpert.modules.metrics import ClassificationMetrics

INITS = ("scratch", "base", "pretrained")
# what a base checkpoint may record as its class (`askexpert_class`, or LightningCLI's `_class_path`): an all-class
# model. The generalist is one too: experiments/strategy_table.py starts the demo experts from it on purpose (on
# CPU the demo base model has the generalist's network), so only subset models and unknown files are refused.
BASE_CLASS_PATHS = tuple(
    path for name in ("BaseModule", "GeneralistModule") for path in (f"askexpert.modules.{name}", MODULE_CLASSES[name])
)


def check_base_kind(checkpoint: dict, path: str) -> None:
    """An expert starts from (and distils) the base model: an all-class model of the expert's architecture. Another
    expert's weights (trained on a subset) would train without complaint and silently measure something else, so
    the kind the file records must be an all-class one (BaseModule, or GeneralistModule; another architecture
    is refused when the weights are loaded)."""
    kind = checkpoint.get("askexpert_class") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    if kind in BASE_CLASS_PATHS:
        return
    subset = checkpoint.get("hyper_parameters", {}).get("subset")
    if subset is not None:
        what = f"is an expert's checkpoint ({len(subset)} classes), not"
    elif kind:
        what = f"is a {str(kind).rpartition('.')[2]} checkpoint, not"
    else:
        what = "records no askexpert module, so it is not"
    raise UserError(
        f"--model.base_path {path} {what} an all-class model's: give the BaseModule checkpoint "
        "(a pipeline's RUN/base/checkpoints/best.ckpt, or `fit --model askexpert.modules.BaseModule`)"
    )


class ExpertModule(ClassifierModule):
    """Expert of one class subset; `subset` and `expert_index` come from the partition file via the CLI.

    Args:
        subset: the class ids this expert is responsible for (set by `--partition FILE --expert_index I`).
        expert_index: position of this expert in the partition.
        partition: the partition file the subset came from (recorded for reports).
        init: `scratch`, `base` or `pretrained` (see the module docstring).
        base_path: the base model's checkpoint (BaseModule, same architecture), for `init: base` and distillation.
        other_output: one extra "other" output (set by the CLI for the `dustbin` specialization).
        **kwargs: everything `ClassifierModule` takes (model_name, lr, ...).
    """

    def __init__(
        self,
        subset: list[int] | None = None,
        expert_index: int = 0,
        partition: str | None = None,
        init: str = "base",
        base_path: str | None = None,
        other_output: bool = False,
        model_name: str = "vit_medium_patch4_32",
        **kwargs,
    ) -> None:
        if init not in INITS:
            raise UserError(f"unknown expert init {init!r}; inits: {', '.join(INITS)}")
        if init == "pretrained":
            # timm's published weights unless pretrained_path names a file (the CLI always passes pretrained=False
            # from the parent's signature, so this is set, not defaulted)
            kwargs["pretrained"] = True
        elif kwargs.get("pretrained") or kwargs.get("pretrained_path"):
            raise UserError(f"--model.pretrained/--model.pretrained_path need --model.init pretrained, not {init!r}")
        self._other_output = other_output  # read by `num_outputs` while the parent builds the network
        # save_hyperparameters() in the parent also records this __init__'s arguments (Lightning walks the frames)
        super().__init__(model_name=model_name, **kwargs)
        num_classes = self.hparams.num_classes
        if not subset:
            raise UserError("an expert needs its class subset: --partition FILE --expert_index I")
        bad = [c for c in subset if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"expert {expert_index}: class id {bad[0]} is out of range for {num_classes} classes")
        self.register_buffer("subset", torch.as_tensor(sorted(set(subset)), dtype=torch.long), persistent=False)
        # class id -> in the subset: a gather answers membership on the device (`torch.isin` sorts and reads
        # a count back to the host for subsets of more than ~20 classes, a sync on every step)
        in_subset = torch.zeros(num_classes, dtype=torch.bool)
        in_subset[self.subset] = True
        self.register_buffer("in_subset_table", in_subset, persistent=False)
        self.specialization = None  # set by the strategy callback at setup("fit")
        self._initial_state: tuple[dict, str] | None = None
        h = self.hparams
        self.val_subset_metrics = ClassificationMetrics(num_classes, h.class_to_superclass, h.superclass_names)
        self.test_subset_metrics = ClassificationMetrics(num_classes, h.class_to_superclass, h.superclass_names)

    @property
    def num_outputs(self) -> int:
        return self.hparams.num_classes + int(self._other_output)

    # -- initial weights -----------------------------------------------------------------------------
    def prepare_initial_weights(self) -> None:
        """Read and check the `init` weights now (the CLI calls this before a run writes anything)."""
        h = self.hparams
        if h.init == "base" and not h.base_path:
            raise UserError("init: base needs the all-class base checkpoint: --model.base_path FILE")
        if h.init == "pretrained":
            super().prepare_initial_weights()
            return
        if h.init != "base":
            return
        checkpoint = self._base_checkpoint()
        state = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        self._initial_state = (self._fit_head(state), h.base_path)
        base = checkpoint.get("hyper_parameters", {})
        if not getattr(self, "_explicit_normalisation", True) and base.get("mean") and base.get("std"):
            self.set_normalisation(base["mean"], base["std"])
        # shapes are checked now, on a throw-away copy, so a wrong architecture fails before training starts
        try:
            copy.deepcopy(self.net).load_state_dict(self._initial_state[0])
        except RuntimeError as err:
            details = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise UserError(
                f"{self._initial_state[1]} does not fit this expert's network: {' '.join(details[:2])}"
            ) from None

    def setup(self, stage: str) -> None:
        # A resumed run restores its own weights (Lightning sets trainer.ckpt_path only after this hook).
        if stage != "fit" or self.resuming or self.trainer.ckpt_path:
            return
        if self.hparams.init == "scratch":
            return
        if self.hparams.init == "pretrained":
            super().prepare_initial_weights()
            return
        if getattr(self, "_initial_state", None) is None:
            self.prepare_initial_weights()
        state, _ = self._initial_state
        self.net.load_state_dict(state)
        self._initial_state = None  # free the copy

    def _base_checkpoint(self) -> dict:
        path = self.hparams.base_path
        if not path:
            raise UserError("distillation from the base model needs --model.base_path FILE")
        checkpoint = load_checkpoint(path)
        hp = checkpoint.get("hyper_parameters", {})
        check_base_kind(checkpoint, path)
        h = self.hparams
        if hp.get("model_name") != h.model_name:
            raise UserError(
                f"base checkpoint {path} is a {hp.get('model_name')!r} model but this expert is {h.model_name!r}"
            )
        if hp.get("num_classes") != h.num_classes or (
            hp.get("class_names") and h.class_names and list(hp["class_names"]) != list(h.class_names)
        ):
            raise UserError(f"base checkpoint {path} was trained on a different class set than this expert's data")
        return checkpoint

    def _fit_head(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An all-class state dict with, for a dustbin expert, the extra "other" output appended at zero."""
        state = dict(state)
        for name in classifier_names(self.net):  # `head` for ViTs, `fc` for ResNets, ... (timm's config says)
            head_w, head_b = state.get(f"{name}.weight"), state.get(f"{name}.bias")
            if self.hparams.other_output and head_w is not None and head_w.shape[0] == self.hparams.num_classes:
                state[f"{name}.weight"] = torch.cat([head_w, head_w.new_zeros(1, *head_w.shape[1:])])
                if head_b is not None:
                    state[f"{name}.bias"] = torch.cat([head_b, head_b.new_zeros(1)])
        return state

    def base_network(self) -> torch.nn.Module:
        """A frozen copy of the base model's network on this module's device (the distillation teacher)."""
        checkpoint = self._base_checkpoint()
        teacher = copy.deepcopy(self.net)
        if self.hparams.other_output:
            raise UserError("distillation needs an expert without an 'other' output")
        state = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        teacher.load_state_dict(state)
        return teacher.eval().requires_grad_(False).to(self.device)

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        inputs = self.training_inputs(images)
        ratio = 1.0
        if self.mixup is not None and len(labels) % 2 == 0:  # timm's Mixup pairs samples: needs even batches
            # timm's batch mixing: in place, each image with its mirror in the batch; the ratio it drew (CutMix:
            # the area kept) weighs the two label sets' losses
            ratio = float(self.mixup._mix_batch(inputs))
        logits = self.net(inputs)
        loss = self.subset_loss(inputs, logits, labels)
        if ratio < 1.0:
            loss = ratio * loss + (1 - ratio) * self.subset_loss(inputs, logits, labels.flip(0))
        self.log_training_step(loss, self.answer_logits(logits.detach(), labels), labels)
        return loss

    def subset_loss(self, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The strategy's loss for `labels` (plain cross-entropy on all classes without a strategy callback)."""
        if self.specialization is not None:
            return self.specialization.loss(self, inputs, logits, labels, self.in_subset(labels))
        return self.training_loss(logits, labels)

    def in_subset(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which labels are this expert's classes (a table look-up on the device, no host sync)."""
        return self.in_subset_table[labels]

    # -- evaluation ----------------------------------------------------------------------------------
    def answer_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, C) logits for the metrics; rows that answered "other" are made wrong, even in the top-k."""
        if not self.hparams.get("other_output"):
            return logits
        num_classes = self.hparams.num_classes
        other = logits.argmax(-1) == num_classes
        # the row every "other" answer gets, built for all rows and selected with `where` (selecting the rows
        # with `nonzero` or `other.any()` would wait for the GPU on every step)
        wrong = torch.zeros_like(logits[:, :num_classes])
        wrong.scatter_(1, labels[:, None], -1.0)  # the true class ranks last
        wrong.scatter_(1, ((labels + 1) % num_classes)[:, None], 1.0)  # and some other class first
        return torch.where(other[:, None], wrong, logits[:, :num_classes])

    def _eval_step(self, batch, metrics: ClassificationMetrics, prefix: str) -> None:
        images, labels = batch
        raw = self(images)
        inside = self.in_subset(labels)
        # the loss the expert is trained for: a dustbin expert's out-of-subset target is "other"
        targets = torch.where(inside, labels, self.hparams.num_classes) if self._other_output else labels
        loss = torch.nn.functional.cross_entropy(raw, targets)
        self.log(f"{prefix}/loss", loss, on_epoch=True, batch_size=len(labels), sync_dist=True)  # reduced at epoch end
        logits = self.answer_logits(raw, labels)
        metrics.update(logits, labels)
        subset_metrics = self.val_subset_metrics if prefix == "val" else self.test_subset_metrics
        subset_metrics.update(logits, labels, mask=inside)  # a mask, not `logits[inside]`: no host sync

    def _log_subset_metrics(self, metrics: ClassificationMetrics, prefix: str) -> None:
        # no image of the subset in this split: nothing to report. The count is read after `compute()`, which
        # every process calls (it sums the counts across DDP processes), so all of them decide alike; once
        # per epoch, that sync is fine.
        if not metrics.update_called:
            metrics.reset()
            return
        results = metrics.compute()
        if int(results.pop("images")) == 0:
            metrics.reset()
            return
        for name in ("acc", "superclass_acc"):
            if name in results:
                self.log(f"{prefix}/subset_{name}", results[name], prog_bar=name == "acc", sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_subset_metrics(self.val_subset_metrics, "val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_subset_metrics(self.test_subset_metrics, "test")
