"""The base model: an all-class near-edge ViT that experts start from (`init: base`).

It is also the "offload everything" baseline of the collaborative evaluation: the best a single
near-edge model does without specialization.
"""

from __future__ import annotations

from askexpert.modules.classifier import ClassifierModule


class BaseModule(ClassifierModule):
    """All-class classifier of the expert architecture (default `vit_medium_patch4_32`).

    Same arguments as `ClassifierModule`; a class of its own so configs and checkpoints name its role.
    """

    def __init__(self, model_name: str = "vit_medium_patch4_32", **kwargs) -> None:
        super().__init__(model_name=model_name, **kwargs)
