"""LightningModules of askexpert: one per role a model plays in the system."""

from askexpert.modules.base_model import BaseModule
from askexpert.modules.classifier import ClassifierModule
from askexpert.modules.expert import ExpertModule
from askexpert.modules.generalist import GeneralistModule

__all__ = ["BaseModule", "ClassifierModule", "ExpertModule", "GeneralistModule"]
