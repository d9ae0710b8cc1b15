"""Where a pipeline run keeps each artefact: the fixed layout that `pipeline` trains into and every command that
reads a finished run (evaluate, route, export, profile, ablate) agrees on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

STATIC = "static"  # the static experts' family (folder experts/static/): the baseline a run trains beside its own


@dataclass(frozen=True)
class RunLayout:
    """Where a pipeline run keeps each artefact (`shared_logits`: its logits cache is shared by many runs)."""

    root: str
    shared_logits: bool = False

    def stage_dir(self, stage: str) -> str:
        """Where the stage named `stage` keeps its artefact: a folder (`generalist`, `experts/progressive/0`), or
        the partition's JSON file. The one place a stage name becomes a path."""
        return self.partition if stage == "partition" else os.path.join(self.root, *stage.split("/"))

    def best(self, stage_dir: str) -> str:
        return os.path.join(stage_dir, "checkpoints", "best.ckpt")

    @property
    def partition(self) -> str:
        return os.path.join(self.root, "partition.json")

    def expert_dir(self, family: str, index: int) -> str:
        return self.stage_dir(f"experts/{family}/{index}")

    @property
    def logits(self) -> str:
        return os.path.join(self.root, "logits")

    @property
    def settings(self) -> str:
        return os.path.join(self.root, "pipeline.yaml")


def expert_families(specialization: str, static_baseline: bool) -> list[str]:
    """The expert folders a run trains: its strategy's, and static ones for the baseline."""
    families = [specialization]
    if static_baseline and specialization != STATIC:
        families.append(STATIC)
    return families
