"""`full`: every class at its natural frequency for the whole run (the control: no specialization)."""

from __future__ import annotations

from strategies.base import SpecializationStrategy


class FullSpecialization(SpecializationStrategy):
    """Trains on the whole training split, so the expert differs from the base only by extra steps."""

    name = "full"

    def out_share(self, progress: float, natural: float) -> float:
        return natural
