"""The generalist: the lightweight all-class ViT that runs on the edge device and sees every image."""

from __future__ import annotations

from askexpert.modules.classifier import ClassifierModule


class GeneralistModule(ClassifierModule):
    """Edge-size all-class classifier (default `vit_edge_patch4_32`).

    Same training recipe and arguments as `ClassifierModule`; a class of its own so configs, checkpoints
    and reports say which role a model plays. Load a trained one with
    `GeneralistModule.load_from_checkpoint(path, map_location="cpu")` and call it on uint8 images.
    """
