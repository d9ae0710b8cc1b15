"""The experts of an export, loaded in ONNX Runtime and kept current: what both server engines run.

- `predict` takes a batch of (expert, image) pairs in any order, groups it by expert and runs the groups side by
  side (experts are independent models: on a multi-core host, or a GPU, they need not wait for each other);
  one version answers the whole batch.
- A watcher thread polls the export's manifest: a new export (e.g. `export --overwrite` into the folder) is
  checked, loaded beside the old models and swapped in between two batches, so no request is dropped and each
  reply names the version that answered it. A new export that cannot be loaded is reported once, and tried
  again only when a file in the folder changes (a copy still in progress finishes; a broken one is not rebuilt
  twice a second). One whose experts, classes, partition or image size differ is refused: clients are
  validated against the export the server started with.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from askexpert.deploy.bundle import load_bundle, manifest_stamp
from askexpert.deploy.metrics import metrics
from askexpert.errors import UserError

log = logging.getLogger("askexpert.serve")


def folder_state(folder: str) -> tuple:
    """(name, size, mtime) of every file in a folder: changes when a copy into it goes on."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
    except OSError:
        return ()


def side_by_side(threads: int, experts: int) -> int:
    """How many experts run at once: the cores over each model's threads (0 = ONNX Runtime's default, all cores)."""
    if threads == 0:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(experts, cores // threads))


class ExpertModels:
    def __init__(
        self,
        export_dir: str,
        threads: int = 1,
        device: str = "cpu",
        contract: dict | None = None,
        reload_poll_s: float = 0.5,
        precision: str = "fp32",
        on_load: Callable[[str], None] | None = None,
    ):
        self.export_dir = export_dir
        self.on_load = on_load  # told each version once it answers (LitServe's HTTP process shows it in /info)
        self.threads = threads
        self.device = device
        self.precision = precision  # "int8": the export's int8 copies (export --int8 true)
        self.contract = contract  # what the HTTP side validates against (the export `serve` checked)
        self.reload_poll_s = reload_poll_s
        self.current = None  # (bundle, {expert: session}), replaced whole on reload
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> ExpertModels:
        self._stamp = manifest_stamp(self.export_dir)  # before reading: a newer export is then seen as new
        bundle = load_bundle(self.export_dir)
        if self.contract is not None and bundle.contract() != self.contract:
            raise UserError(f"{self.export_dir} changed while the server started; start it again")
        self._swap_in(bundle)
        workers = side_by_side(self.threads, len(bundle.expert_names))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="expert") if workers > 1 else None
        threading.Thread(target=self._watch, name="export-watcher", daemon=True).start()
        return self

    @property
    def version(self) -> str:
        return self.current[0].version

    def _swap_in(self, bundle) -> None:
        self.current = self._load(bundle)
        if self.on_load is not None:
            self.on_load(bundle.version)

    def _load(self, bundle):
        sessions = {
            name: bundle.session(name, self.threads, self.device, self.precision) for name in bundle.expert_names
        }
        metrics()["model_loads"].labels(bundle.version).inc()
        return bundle, sessions

    def _watch(self) -> None:
        failed = None
        while True:
            time.sleep(self.reload_poll_s)
            stamp = manifest_stamp(self.export_dir)
            if stamp is None or stamp == self._stamp:
                continue
            state = (stamp, folder_state(self.export_dir))
            if state == failed:
                continue
            try:
                bundle = load_bundle(self.export_dir)
                old = self.current[0]
                if bundle.version == old.version:
                    self._stamp = stamp
                    continue
                if bundle.contract() != old.contract():
                    raise UserError("its experts, classes, partition or image size differ; restart the server")
                self._swap_in(bundle)
                self._stamp = stamp
                log.warning("loaded export version %s (was %s)", bundle.version, old.version)
            except Exception as err:  # noqa: BLE001 (anything ONNX Runtime raises on a bad file included)
                log.error("not reloading %s: %s", self.export_dir, err)
                failed = state

    def predict(self, items: list[tuple[str, np.ndarray]]) -> list[tuple[str, str, np.ndarray]]:
        """(expert, version, logits) for each (expert, image), in order."""
        bundle, sessions = self.current  # one version answers the whole batch
        m = metrics()
        m["batch_size"].observe(len(items))
        groups: dict[str, list[int]] = {}
        for i, (expert, _) in enumerate(items):
            groups.setdefault(expert, []).append(i)

        def run(expert: str) -> np.ndarray:
            start = time.perf_counter()
            try:
                logits = sessions[expert].run(None, {"images": np.stack([items[i][1] for i in groups[expert]])})[0]
            except Exception:
                m["inference_errors"].labels(expert).inc()
                raise
            m["expert_seconds"].labels(expert).observe(time.perf_counter() - start)
            return logits

        if self._pool is not None and len(groups) > 1:
            results = dict(zip(groups, self._pool.map(run, groups), strict=True))
        else:
            results = {expert: run(expert) for expert in groups}
        outputs: list = [None] * len(items)
        for expert, rows in groups.items():
            for j, i in enumerate(rows):
                outputs[i] = (expert, bundle.version, results[expert][j])
        return outputs
