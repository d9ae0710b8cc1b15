"""Stages shared between the runs of an ablation, kept once under their identity.

A pipeline stage's identity is the hash of its resolved config and its upstream identities (see
`askexpert.pipeline.stages`), independent of the run folder. Two grid cells that train the same
generalist (same data, config and seed) therefore plan a stage with the same identity; the store keeps it once
as `<store>/<stage name>-<identity>` and each cell's run folder links to it. `<name>-<identity>.done` marks a
finished stage; a stage without it is resumed from its last checkpoint or retrained.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from askexpert.files.atomic import write_json
from askexpert.pipeline.stages import Stage, StageKind
from askexpert.runs.lock import locked


class StageStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def path(self, stage: Stage) -> str:
        """Where the store keeps a stage's artefact: a folder, or the partition's JSON file."""
        suffix = ".json" if stage.kind is StageKind.PARTITION else ""
        return os.path.join(self.root, self._name(stage) + suffix)

    def _marker(self, stage: Stage) -> str:
        return os.path.join(self.root, self._name(stage) + ".done")

    @staticmethod
    def _name(stage: Stage) -> str:
        """`<stage name, / as ->-<identity>`: the names of stores written before stay valid."""
        return f"{stage.name.replace('/', '-')}-{stage.identity}"

    @property
    def logits(self) -> str:
        """One logits cache for every run: it is keyed by checkpoint hash, so sharing it is safe."""
        return os.path.join(self.root, "logits")

    def is_done(self, stage: Stage) -> bool:
        return os.path.isfile(self._marker(stage))

    def mark_done(self, stage: Stage) -> None:
        record = {"name": stage.name, "identity": stage.identity, "config": stage.config}
        write_json(self._marker(stage), record, indent=None, default=str)

    def mark_not_done(self, stage: Stage) -> None:
        """Before a stage (re)trains: a crash must not leave it marked done with a missing or older artefact."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._marker(stage))

    @contextlib.contextmanager
    def locked(self):
        """Hold the store for this process (askexpert/runs/lock.py): two ablations training into one store would
        delete each other's unfinished stages. A second process gets one line naming the holder."""
        with locked(self.root):
            yield

    @staticmethod
    def link(target: str, link_path: str) -> None:
        """Point `link_path` at `target` with a relative link, so a folder holding both can be moved whole."""
        parent = os.path.dirname(os.path.abspath(link_path))
        os.makedirs(parent, exist_ok=True)
        # real paths on both sides: a folder reached through a symlink would make a relative link wrong
        relative = os.path.relpath(os.path.realpath(target), os.path.realpath(parent))
        if os.path.islink(link_path):
            if os.readlink(link_path) == relative:
                return
            os.unlink(link_path)
        elif os.path.isdir(link_path):  # a folder of the run's own (e.g. a logits cache made before): replace it
            shutil.rmtree(link_path)
        elif os.path.exists(link_path):
            os.remove(link_path)
        os.symlink(relative, link_path)
