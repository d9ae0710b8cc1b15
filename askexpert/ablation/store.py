"""Stages shared between the runs of an ablation, kept once under their identity.

A pipeline stage's identity is the hash of its resolved config and its upstream identities (see
`askexpert.pipeline.stages`), independent of the run folder. Two grid cells that train the same
generalist (same data, config and seed) therefore plan a stage with the same identity; the store keeps it once
as `<store>/<stage name>-<identity>` and each cell's run folder links to it. `<name>-<identity>.done` marks a
finished stage; a stage without it is resumed from its last checkpoint or retrained.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

from askexpert.files.atomic import temporary_name, write_json
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

    def key(self, stage: Stage) -> str:
        """The stage's name in the store (`<name>-<identity>`): one stage of every run that shares it."""
        return self._name(stage)

    def is_done(self, stage: Stage) -> bool:
        return os.path.isfile(self._marker(stage))

    def mark_done(self, stage: Stage, trained: dict | None = None) -> None:
        """`trained`: how a job of the submitit launcher trained it ({run, started, resumed}): its seconds go into
        that run's stages.json (`job_record`), its start and end order the jobs."""
        record = {"name": stage.name, "identity": stage.identity, "config": stage.config}
        if trained is not None:
            now = time.time()
            # never negative: the wall clock may step back (NTP) while a stage trains
            record |= {**trained, "finished": now, "seconds": max(0.0, round(now - trained["started"], 1))}
        write_json(self._marker(stage), record, indent=None, default=str)

    def job_record(self, stage: Stage, run_root: str) -> dict:
        """What a run that a job trained the stage through records of it (`seconds`, `resumed`); nothing for the
        other runs that share it (its time is counted once, as the local launcher counts it)."""
        try:
            with open(self._marker(stage), encoding="utf-8") as handle:
                marker = json.load(handle)
        except (OSError, ValueError):
            return {}
        if not isinstance(marker, dict) or os.path.realpath(str(marker.get("run"))) != os.path.realpath(run_root):
            return {}
        found = {"seconds": marker["seconds"]} if isinstance(marker.get("seconds"), (int, float)) else {}
        return found | ({"resumed": True} if marker.get("resumed") else {})

    def _divergence_marker(self, stage: Stage) -> str:
        return os.path.join(self.root, self._name(stage) + ".diverged")

    def mark_diverged(self, stage: Stage, where: dict) -> None:
        """A job whose stage diverged says where ({stage, step, epoch, message}); the driver reads it back."""
        write_json(self._divergence_marker(stage), where, indent=None, default=str)

    def divergence(self, stage: Stage) -> dict | None:
        try:
            with open(self._divergence_marker(stage), encoding="utf-8") as handle:
                found = json.load(handle)
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def clear_divergence(self, stage: Stage) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._divergence_marker(stage))

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
        elif os.path.isdir(link_path):  # a folder of the run's own (e.g. a logits cache made before): replace it
            shutil.rmtree(link_path)
        elif os.path.exists(link_path):
            os.remove(link_path)
        # made under a name of its own, then renamed over: two processes linking one path never collide
        temporary = temporary_name(link_path)
        os.symlink(relative, temporary)
        os.replace(temporary, link_path)
