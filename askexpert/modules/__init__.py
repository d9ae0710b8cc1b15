"""LightningModules of askexpert: one per role a model plays in the system."""

from askexpert.modules.classifier import ClassifierModule
from askexpert.modules.generalist import GeneralistModule

__all__ = ["ClassifierModule", "GeneralistModule"]
