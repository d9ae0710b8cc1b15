"""Evaluation metrics of a classifier: top-1 / top-5, superclass accuracy and per-superclass accuracy.

`superclass_acc` is the accuracy of the superclass of the predicted class; `within_superclass_error_share`
is the share of wrong answers that still named a class of the right superclass (the stand-in's hierarchy
shows in it: chance would be 4 / 99 for CIFAR-100's 5-class superclasses).

Everything is a count in a torchmetrics state on the model's device (summed across DDP processes), updated
with fixed-shape tensor operations only, so an evaluation step never waits for the GPU. torchmetrics'
`MulticlassAccuracy` would: its per-class variant counts with `torch.bincount`, and it validates integer
predictions (the superclass metric) with `torch.unique`, both of which read values back to the host on a
GPU. The values are those `MulticlassAccuracy` gives (micro top-1 / top-k, per-class recall with 0 for an
unseen class). An optional mask restricts an update to some samples (an expert's own classes) without
boolean indexing, which would also need the host to learn how many samples were selected.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ClassificationMetrics(Metric):
    """Metrics of one stage (val or test) of a C-class classifier with an optional superclass map."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        class_to_superclass: list[int] | None = None,
        superclass_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.top_k = min(5, num_classes)
        scalar = torch.zeros((), dtype=torch.long)
        self.add_state("total", scalar.clone(), dist_reduce_fx="sum")
        self.add_state("correct", scalar.clone(), dist_reduce_fx="sum")
        self.add_state("correct_top_k", scalar.clone(), dist_reduce_fx="sum")
        self.add_state("coarse_correct", scalar.clone(), dist_reduce_fx="sum")
        # per-class recall; grouped into superclasses at compute time
        self.add_state("class_total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.has_hierarchy = class_to_superclass is not None
        if self.has_hierarchy:
            num_super = max(class_to_superclass) + 1
            self.superclass_names = list(superclass_names or [str(s) for s in range(num_super)])
            # a persistent buffer, as before: checkpoints keep the key `*_metrics.class_to_superclass`
            self.register_buffer("class_to_superclass", torch.as_tensor(class_to_superclass, dtype=torch.long))

    def update(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Count one batch of (N, C) logits against (N,) class ids; `mask` (N,) bool keeps only some samples."""
        weight = torch.ones_like(target) if mask is None else mask.to(target.dtype)
        predicted = logits.argmax(-1)
        hit = (predicted == target).long() * weight
        top_k = logits.topk(self.top_k, dim=-1).indices
        self.total += weight.sum()
        self.correct += hit.sum()
        self.correct_top_k += ((top_k == target[:, None]).any(-1).long() * weight).sum()
        # per-class counts by comparison with every class id: fixed shape, deterministic (no bincount)
        of_class = (target[:, None] == torch.arange(self.num_classes, device=target.device)).long()
        self.class_total += (of_class * weight[:, None]).sum(0)
        self.class_correct += (of_class * hit[:, None]).sum(0)
        if self.has_hierarchy:
            # the superclass of the predicted class, so that the error share below is exact
            same_super = self.class_to_superclass[predicted] == self.class_to_superclass[target]
            self.coarse_correct += (same_super.long() * weight).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics as scalars (logged) plus `images`, the number of samples counted (not logged: callers
        pop it, e.g. to skip a split without any image of an expert's classes)."""
        total = self.total.clamp(min=1).float()  # no sample at all: every accuracy is 0, as torchmetrics says
        acc = self.correct.float() / total
        out = {"acc": acc, f"acc{self.top_k}": self.correct_top_k.float() / total, "images": self.total.clone()}
        if self.has_hierarchy:
            coarse = self.coarse_correct.float() / total
            out["superclass_acc"] = coarse
            # Of the wrong answers, the share that at least named the right superclass.
            share = ((coarse - acc) / (1 - acc)).clamp(0, 1)
            out["within_superclass_error_share"] = torch.where(acc < 1, share, torch.zeros_like(acc))
            seen = self.class_total > 0
            per_class = torch.where(seen, self.class_correct.float() / self.class_total.clamp(min=1), 0.0)
            for s, name in enumerate(self.superclass_names):
                members = self.class_to_superclass == s
                if members.any():
                    out[f"superclass/{name}"] = per_class[members].mean()
        return out
