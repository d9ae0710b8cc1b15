"""Evaluation metrics of a classifier: top-1 / top-5, superclass accuracy and per-superclass accuracy.

`superclass_acc` is the accuracy of the superclass of the predicted class; `within_superclass_error_share`
is the share of wrong answers that still named a class of the right superclass (the stand-in's hierarchy
shows in it: chance would be 4 / 99 for CIFAR-100's 5-class superclasses).

All of it is torchmetrics state on the model's device, updated without host syncs; `compute()` flattens
the per-superclass results into scalar entries so they can be logged like any other metric.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy


class ClassificationMetrics(nn.Module):
    """Metrics of one stage (val or test) of a C-class classifier with an optional superclass map."""

    def __init__(
        self,
        num_classes: int,
        class_to_superclass: list[int] | None = None,
        superclass_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        top_k = min(5, num_classes)
        self.scalars = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                f"acc{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            }
        )
        # Per-class recall; grouped into superclasses at compute time.
        self.per_class = MulticlassAccuracy(num_classes, average="none")
        self.has_hierarchy = class_to_superclass is not None
        if self.has_hierarchy:
            num_super = max(class_to_superclass) + 1
            self.superclass_names = list(superclass_names or [str(s) for s in range(num_super)])
            self.register_buffer("class_to_superclass", torch.as_tensor(class_to_superclass, dtype=torch.long))
            self.coarse = MulticlassAccuracy(num_super, average="micro")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.scalars.update(logits, target)
        self.per_class.update(logits, target)
        if self.has_hierarchy:
            # the superclass of the predicted class, so that the error share below is exact
            predicted_super = self.class_to_superclass[logits.argmax(-1)]
            self.coarse.update(predicted_super, self.class_to_superclass[target])

    def compute(self) -> dict[str, torch.Tensor]:
        out = dict(self.scalars.compute())
        if self.has_hierarchy:
            acc, coarse = out["acc"], self.coarse.compute()
            out["superclass_acc"] = coarse
            # Of the wrong answers, the share that at least named the right superclass.
            out["within_superclass_error_share"] = ((coarse - acc) / (1 - acc)).clamp(0, 1) if acc < 1 else acc * 0
            per_class = self.per_class.compute()
            for s, name in enumerate(self.superclass_names):
                members = self.class_to_superclass == s
                if members.any():
                    out[f"superclass/{name}"] = per_class[members].mean()
        return out

    def reset(self) -> None:
        self.scalars.reset()
        self.per_class.reset()
        if self.has_hierarchy:
            self.coarse.reset()
