"""Stages shared between the runs of an ablation, kept once under their identity.

A pipeline stage's identity is the hash of its resolved config and its upstream identities (see
`askexpert.commands.pipeline.plan_stages`), independent of the run folder. Two grid cells that train the same
generalist (same data, config and seed) therefore plan a stage with the same identity; the store keeps it once
as `<store>/<stage name>-<identity>` and each cell's run folder links to it. `<name>-<identity>.done` marks a
finished stage; a stage without it is resumed from its last checkpoint or retrained.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from askexpert.files.atomic import atomic_write_text
from askexpert.runs.lock import locked


class StageStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def path(self, stage) -> str:
        name = f"{stage.name.replace('/', '-')}-{stage.identity}"
        return os.path.join(self.root, name + (".json" if stage.fit_args is None else ""))

    def _marker(self, stage) -> str:
        return os.path.join(self.root, f"{stage.name.replace('/', '-')}-{stage.identity}.done")

    @property
    def logits(self) -> str:
        """One logits cache for every run: it is keyed by checkpoint hash, so sharing it is safe."""
        return os.path.join(self.root, "logits")

    def is_done(self, stage) -> bool:
        return os.path.isfile(self._marker(stage))

    def mark_done(self, stage) -> None:
        text = json.dumps({"name": stage.name, "identity": stage.identity, "config": stage.config}, default=str)
        atomic_write_text(self._marker(stage), text + "\n")

    def mark_not_done(self, stage) -> None:
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
