"""The rounds themselves: collect what the experts answered, fine-tune, choose τ again, measure, save.

Round r (1-based) runs with what round r-1 left: its generalist (round 0: the run's) and its τ and temperature.
(a) The round's stream images go through the edge decision (`decide(...).routes(τ)`, the one router of
    evaluation, `route`, `export` and `edge`); each offloaded image keeps the class probabilities of the expert
    it went to (`class_probs`), except where a dustbin expert answered "other". A record instead brings the
    answers a real deployment received: all of its round's images are kept.
(b) The generalist is fine-tuned on every image kept so far with replay of its training split (`distill.py`).
(c) Its new val and test logits make the round's system with the run's cached experts (`measure.py`).
The round's files are written in that order, metrics.json last (`state.py`), then adapt.csv and adapt.png.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from askexpert.adapt.distill import DistillSettings, fine_tune
from askexpert.adapt.measure import measure, system_with
from askexpert.adapt.state import (
    AdaptFolder,
    finished_round,
    load_kept,
    save_generalist,
    save_kept,
    save_round,
)
from askexpert.adapt.stream import RoundImages, Stream
from askexpert.adapt.table import write_csv, write_plot
from askexpert.collab.evaluation import LoadedRun, check_expert_classes
from askexpert.collab.logits import batched_logits, in_batches
from askexpert.collab.routing import NO_EXPERT, class_probs, decide
from askexpert.collab.system import RoutingConfig
from askexpert.modules.loading import load_classifier


@dataclass
class AdaptJob:
    """Everything the rounds need, checked and loaded before anything is written."""

    run: LoadedRun
    routing: RoutingConfig
    stream: Stream
    distill: DistillSettings
    folder: AdaptFolder
    rounds: int
    seed: int
    eval_batch_size: int
    title: str
    experts: dict[int, Any] | None = None  # loaded once per process, when a round first needs them

    @property
    def device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def generalist_checkpoint(self, r: int) -> str:
        """The generalist round r starts from: the run's for round 1, else the one round r-1 saved."""
        layout = self.run.layout
        return layout.best(layout.stage_dir("generalist")) if r == 1 else self.folder.checkpoint(r - 1)

    def expert(self, e: int):
        if self.experts is None:
            self.experts = {}
        if e not in self.experts:
            layout, family = self.run.layout, self.run.specialization
            model = load_classifier(layout.best(layout.expert_dir(family, e)), map_location=self.device)
            check_expert_classes(model.hparams.get("subset"), self.run.partition, e, f"{family}_{e}", layout.partition)
            self.experts[e] = model
        return self.experts[e]


def run_rounds(job: AdaptJob) -> list[dict]:
    """Every round up to `job.rounds`, finished ones read back, the others run; returns adapt.csv's rows."""
    folder = job.folder
    rows = [finished_round(folder, 0) or _round_zero(job)]
    redone = False  # once a round is trained again, every later round stands on other weights: train them too
    for r in range(1, job.rounds + 1):
        done = None if redone else finished_round(folder, r)
        if done is not None:
            print(f"round {r}: finished earlier, skipped ({folder.metrics(r)})", flush=True)
            rows.append(done)
            continue
        redone = True
        rows.append(_one_round(job, r, rows[-1], rows[0]["val_acc"]))
        _write_tables(job, rows)
    # rounds a longer earlier call finished stay in the table (a shorter --rounds only stops sooner), unless a
    # round before them was trained again: then they were built on weights that no longer exist
    while os.path.exists(folder.metrics(len(rows))):
        later = None if redone else finished_round(folder, len(rows))
        if later is None:
            _remove_rounds_from(folder, len(rows))
            break
        rows.append(later)
    _write_tables(job, rows)
    return rows


def _remove_rounds_from(folder, first: int) -> None:
    """Delete rounds `first`, `first + 1`, ... (stale: an earlier round was trained again)."""
    r = first
    while os.path.isdir(round_dir := folder.round_dir(r)):
        print(f"round {r}: built on a round trained again, removed", flush=True)
        shutil.rmtree(round_dir)
        r += 1


def _round_zero(job: AdaptJob) -> dict:
    start = time.perf_counter()
    logits = job.run.generalist["logits"]
    metrics = measure(system_with(job.run, logits), job.routing, None)
    metrics.update(kept_total=0, seconds=round(time.perf_counter() - start, 2))
    save_round(job.folder, 0, metrics)
    _print_round(0, {"round": 0, **metrics})
    return {"round": 0, **metrics}


def _one_round(job: AdaptJob, r: int, previous: dict, target_val_acc: float) -> dict:
    start = time.perf_counter()
    generalist = load_classifier(job.generalist_checkpoint(r), map_location=job.device)
    images = job.stream.round(r)
    kept_images, soft, labels, collected = _collect(job, generalist, images, previous)
    save_kept(job.folder, r, kept_images, soft, labels)
    kept = [load_kept(job.folder, i) for i in range(1, r + 1)]  # everything kept so far, as saved
    all_images, all_soft = torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
    trained = {"steps": 0, "stream_images_seen": 0, "replay_images_seen": 0}
    if len(all_images):  # nothing offloaded yet: the generalist stays as it was
        h = job.run.datamodule.hparams
        replay = job.run.datamodule.tensors("train")
        augment = (int(h.crop_padding), bool(h.flip))
        trained = fine_tune(
            generalist, (all_images, all_soft), replay, job.distill, job.seed * 1_000 + r, augment, job.folder.root
        )
    generalist.to(job.device).eval()
    datamodule = job.run.datamodule
    logits = {
        split: batched_logits(generalist, in_batches(datamodule.tensors(split)[0], job.eval_batch_size))
        for split in ("val", "test")
    }
    metrics = {
        **collected,
        "kept_total": len(all_images),
        **{key: trained[key] for key in ("steps", "stream_images_seen", "replay_images_seen")},
        **measure(system_with(job.run, logits), job.routing, target_val_acc),
    }
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    info = {"distill": asdict(job.distill), "tau": metrics["tau"], "temperature": metrics["temperature"]}
    save_generalist(job.folder, r, generalist, job.generalist_checkpoint(1), info)
    save_round(job.folder, r, metrics)
    _print_round(r, {"round": r, **metrics})
    return {"round": r, **metrics}


def _collect(job: AdaptJob, generalist, images: RoundImages, previous: dict):
    """(kept images, their soft labels, their true labels or None, the round's counts) of one round's images."""
    n = len(images.images)
    if images.soft_labels is not None:  # a record: the deployment already offloaded these and kept the answers
        stats = {"stream_images": n, "offloaded": n, "kept": n, "kept_label_acc": None}
        return images.images, images.soft_labels, None, stats
    run, routing = job.run, job.routing
    logits = batched_logits(generalist, in_batches(images.images, job.eval_batch_size))
    decision = decide(logits, run.partition.coverage(), previous["temperature"], routing.gate, routing.top_k)
    routes = decision.routes(previous["tau"])
    rows, soft = [], []
    for e in routes[routes != NO_EXPERT].unique().tolist():
        chosen = torch.nonzero(routes == e).flatten()
        answers = batched_logits(job.expert(e), in_batches(images.images[chosen], job.eval_batch_size))
        probs, said_other = class_probs(answers, run.datamodule.num_classes)
        rows.append(chosen[~said_other])
        soft.append(probs[~said_other])
    order = torch.cat(rows).argsort() if rows else torch.empty(0, dtype=torch.long)
    kept_rows = torch.cat(rows)[order] if rows else order
    kept_soft = torch.cat(soft)[order] if soft else torch.empty(0, run.datamodule.num_classes)
    labels = images.labels[kept_rows] if images.labels is not None else None
    right = None
    if labels is not None and len(labels):
        right = float((kept_soft.argmax(-1) == labels).double().mean())
    stats = {
        "stream_images": n,
        "offloaded": int((routes != NO_EXPERT).sum()),
        "kept": len(kept_rows),
        "kept_label_acc": right,
    }
    return images.images[kept_rows], kept_soft, labels, stats


def _write_tables(job: AdaptJob, rows: list[dict]) -> None:
    write_csv(job.folder.csv, rows)
    write_plot(job.folder.plot, rows, job.title)


def _print_round(r: int, m: dict) -> None:
    what = ""
    if r > 0:
        what = (
            f"kept {m['kept']} of {m['stream_images']} stream images ({m['offloaded']} offloaded), "
            f"{m['kept_total']} in all; {m['steps']} fine-tuning steps; "
        )
    eq = "" if m["eq_reached"] else " (round 0's validation accuracy not reached)"
    print(
        f"round {r}: {what}test accuracy {100 * m['acc']:.2f} % with {100 * m['offload_ratio']:.1f} % offloaded "
        f"(τ {m['tau']:.3f}); at round 0's accuracy: {100 * m['eq_acc']:.2f} % with "
        f"{100 * m['eq_offload_ratio']:.1f} % offloaded (τ {m['eq_tau']:.3f}){eq}; generalist alone "
        f"{100 * m['generalist_acc']:.2f} %",
        flush=True,
    )
