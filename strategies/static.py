"""`static`: the expert's own classes only, for the whole run (the "static expert" baseline).

With `init: base` this is plain fine-tuning on the subset; with `init: scratch` it is the naive expert.
It never sees an out-of-subset image, so it learns to answer every input with one of its own classes.
"""

from __future__ import annotations

from strategies.base import SpecializationStrategy


class StaticSpecialization(SpecializationStrategy):
    name = "static"

    def out_share(self, progress: float, natural: float) -> float:
        return 0.0
