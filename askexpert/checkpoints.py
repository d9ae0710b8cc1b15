"""Kept for scripts written against the README before the house was rebuilt (2026-12): `load_classifier` lives in
askexpert/modules/loading.py, the checkpoint checks in askexpert/files/checkpoints.py."""

from askexpert.modules.loading import load_classifier

__all__ = ["load_classifier"]
