"""Framework overhead end to end: a pipeline's wall time vs the bare compute of the same work, stage by stage.

Runs `python -m askexpert pipeline --config CONFIG` in this process into a fresh folder, with probes that
change nothing it computes:
* every `fit` stage gets one extra callback (added where the CLI builds its Trainer) that counts the images
  it trained and validated, its model, batch and precision, and timestamps: start-up (from the stage's
  start to its first training step: CLI parse, model build, data, sanity check), training, validation,
  checkpoint writes (timed around `Trainer.save_checkpoint`) and the finish (end of training to the stage's
  end: teardown, an expert's weights-only rewrite of last.ckpt);
* planning (`prepare`: every stage resolved), the partition and the evaluation (each model's logits pass
  counted by `compute_logits`) are timed as wholes.
Bare compute of a stage = trained images / the bare step's img/s (fwd + bwd + AdamW on a batch already on
the device, `benchmarks/train_throughput.py`, at the stage's model, batch and precision) + validated images
/ the plain forward's img/s (`benchmarks/inference.py`, at the stage's eval batch); the evaluation's is its
forward images at forward speed. Those rates are measured afterwards in the same process.
Ratio = wall / bare (the goal: at most 1.3); the table shows where the rest goes. Experts trained as
subprocesses (`parallel_experts` > 1) are timed as one block, their images read from their metrics.csv.

    python benchmarks/pipeline_overhead.py                                          # the CPU demo (~5 min)
    python benchmarks/pipeline_overhead.py --config configs/pipeline/standin_full.yaml --device cuda
    ... --side-by-side 4     # then retrain the strategy's experts N at a time (`--parallel_experts N`) and compare

`--side-by-side N` copies the finished run without its strategy's experts, trains them again N at a time on
the same device (`pipeline --parallel_experts N`, one process each) and reports that wall time against one
expert trained alone in the first run, plus how far each expert's results moved (they train the same
computation; on a GPU only kernel nondeterminism separates them).

Writes benchmarks/results/pipeline_overhead_<device>.json (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from train_throughput import bare_step, use_checkout  # noqa: E402  (imports no askexpert module itself)


class StageProbe(pl.Callback):
    """Counts and timestamps of one `fit` stage (see the module docstring); touches nothing it measures."""

    def __init__(self, record: dict) -> None:
        self.r = record
        self.r.update(train_images=0, val_images=0, sanity_images=0, val_s=0.0, sanity_val_s=0.0)
        self.r.update(ckpt_s=0.0, ckpt_count=0)
        self.r.update(ckpt_mb=0.0, epochs=0)
        self._val_start = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        h, data = pl_module.hparams, trainer.datamodule
        self.r.update(model=h.get("model_name"), precision=str(trainer.precision), setup_t=time.perf_counter())
        self.r.update(batch=data.hparams.batch_size, eval_batch=data.hparams.eval_batch_size)
        save = trainer.save_checkpoint

        def timed_save(filepath, weights_only: bool = False, storage_options=None) -> None:
            start = time.perf_counter()
            save(filepath, weights_only=weights_only, storage_options=storage_options)
            self.r["ckpt_s"] += time.perf_counter() - start
            self.r["ckpt_count"] += 1
            if os.path.isfile(filepath):
                self.r["ckpt_mb"] += os.path.getsize(filepath) / 1e6

        trainer.save_checkpoint = timed_save  # ModelCheckpoint calls trainer.save_checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        self.r["train_start_t"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.r["train_images"] += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.r["epochs"] += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.r["train_end_t"] = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # the sanity check is the framework's own check, not work the pipeline asked for: counted apart
        self.r["sanity_images" if trainer.sanity_checking else "val_images"] += len(batch[1])

    def on_validation_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._val_start
        self.r["sanity_val_s" if trainer.sanity_checking else "val_s"] += seconds


class Probes:
    """Wraps the pipeline's stage functions and the CLI's Trainer construction (restored by `undo`)."""

    def __init__(self) -> None:
        from askexpert.collab import logits
        from askexpert.commands import pipeline
        from askexpert.lightning_cli.cli import AskExpertCLI
        from askexpert.pipeline import runner

        self.stages: list[dict] = []
        self.blocks: dict[str, float] = defaultdict(float)
        self.forward: list[dict] = []
        self._current: dict | None = None
        self._undo: list[tuple[object, str, object]] = []
        probes = self

        def instantiate(cli, config, callbacks):
            trainer = original_instantiate(cli, config, callbacks)
            if probes._current is not None:
                trainer.callbacks.append(StageProbe(probes._current))
            return trainer

        original_instantiate = AskExpertCLI._instantiate_trainer
        self._patch(AskExpertCLI, "_instantiate_trainer", instantiate)

        def run_fit(stage, layout, resume):
            record = {"stage": stage.name, "start_t": time.perf_counter(), "resumed": resume}
            probes._current = record
            try:
                return original_run_fit(stage, layout, resume)
            finally:
                record["end_t"] = time.perf_counter()
                probes._current = None
                probes.stages.append(record)

        # the stage runners where the runner looks them up; planning and evaluation where the command does
        original_run_fit = runner.run_fit
        self._patch(runner, "run_fit", run_fit)
        self._patch(runner, "run_partition", self._timed(runner.run_partition, "partition"))
        side = self._timed(runner._run_side_by_side, "experts side by side (subprocesses)")
        self._patch(runner, "_run_side_by_side", side)
        self._patch(pipeline, "prepare", self._timed(pipeline.prepare, "plan (resolve every stage)"))
        self._patch(pipeline, "evaluate_and_report", self._timed(pipeline.evaluate_and_report, "evaluation"))

        def compute_logits(model, datamodule, split, label=""):
            start = time.perf_counter()
            out = original_logits(model, datamodule, split, label)
            images = len(datamodule.tensors(split)[1])
            batch = datamodule.hparams.eval_batch_size
            entry = {"model": model.hparams.get("model_name"), "split": split, "images": images, "batch": batch}
            probes.forward.append({**entry, "label": label, "seconds": time.perf_counter() - start})
            return out

        original_logits = logits.compute_logits
        self._patch(logits, "compute_logits", compute_logits)

    def _patch(self, owner, name: str, value) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _timed(self, function, label: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.blocks[label] += time.perf_counter() - start

        return timed

    def undo(self) -> None:
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)


def subprocess_stages(run: Path, done: set[str]) -> list[dict]:
    """Expert stages that ran as subprocesses: images from their metrics.csv and resolved config."""
    found = []
    for config_file in sorted(run.glob("experts/*/*/config.yaml")):
        folder = config_file.parent
        name = str(folder.relative_to(run))
        if name in done:
            continue
        config = yaml.safe_load(config_file.read_text())
        batch = config["data"]["batch_size"]
        steps, val_rows = 0, 0
        with open(folder / "metrics.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                steps = max(steps, int(row.get("step") or 0) + 1)
                val_rows += bool(row.get("val/acc"))
        val_size = json.loads((run / "report.json").read_text())["data"]["val_size"]
        trainer = config["trainer"]
        found.append(
            {
                "stage": name,
                "model": config["model"]["init_args"]["model_name"],
                "precision": str(trainer.get("precision")),
                "batch": batch,
                "eval_batch": config["data"]["eval_batch_size"],
                "train_images": steps * batch,
                "val_images": val_rows * val_size,
                "subprocess": True,
            }
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pipeline/demo.yaml")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bare-steps", type=int, default=None, help="timed steps of each bare-step measurement")
    parser.add_argument(
        "--keep", default=None, help="run folder to keep (default: a temporary one; --side-by-side's goes beside it)"
    )
    parser.add_argument("--checkout", default=None, help="run the pipeline of this checkout (its configs too)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--side-by-side", type=int, default=0, help="also retrain the experts N at a time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = (
        Path(args.out).resolve()
        if args.out
        else ROOT / "benchmarks" / "results" / f"pipeline_overhead_{args.device}.json"
    )
    imported = use_checkout(args.checkout)
    if args.threads:
        torch.set_num_threads(args.threads)
    from askexpert.cli import cli_main

    os.chdir(args.checkout or ROOT)  # config paths are relative to the checkout (--out was resolved before)
    probes = Probes()
    with tempfile.TemporaryDirectory() as folder:
        run = Path(args.keep) if args.keep else Path(folder) / "run"
        start = time.perf_counter()
        try:
            cli_main(["pipeline", "--config", args.config, "--out", str(run)])
        finally:
            probes.undo()
        wall = time.perf_counter() - start
        stages = [dict(s) for s in probes.stages]
        stages += subprocess_stages(run, {s["stage"] for s in stages})
        copy = run.parent / f"{run.name}_side_by_side" if args.keep else Path(folder) / "side_by_side"
        if copy.exists():
            shutil.rmtree(copy)
        side = side_by_side(run, copy, args.config, args.side_by_side, stages)

    from inference import throughput  # imports askexpert: only after use_checkout

    # the bare rates, at each stage's own model, batch and precision
    steps = args.bare_steps or (20 if args.device == "cuda" else 5)
    train_rates: dict[tuple, float] = {}
    forward_rates: dict[tuple, float] = {}
    for s in stages:
        key = (s["model"], s["batch"], s["precision"])
        if key not in train_rates:
            train_rates[key] = bare_step(s["model"], args.device, s["batch"], s["precision"], steps, 2, False)
    for model, batch in {(s["model"], s["eval_batch"]) for s in stages} | {
        (f["model"], f["batch"]) for f in probes.forward
    }:
        forward_rates[(model, batch)] = throughput(
            model, args.device, batch, repeats=10 if args.device == "cuda" else 3
        )

    rows = []
    for s in stages:
        train_rate = train_rates[(s["model"], s["batch"], s["precision"])]
        forward_rate = forward_rates[(s["model"], s["eval_batch"])]
        bare = s["train_images"] / train_rate + s["val_images"] / forward_rate
        row = {k: s.get(k) for k in ("stage", "model", "precision", "batch", "eval_batch", "train_images")}
        row.update(val_images=s["val_images"], bare_train_img_s=train_rate, forward_img_s=forward_rate, bare_s=bare)
        if not s.get("subprocess"):
            stage_wall = s["end_t"] - s["start_t"]
            train_loop = s.get("train_end_t", s["end_t"]) - s.get("train_start_t", s["end_t"])
            row.update(
                wall_s=stage_wall,
                startup_s=s.get("train_start_t", s["end_t"]) - s["start_t"] - s["sanity_val_s"],
                train_s=train_loop - s["val_s"] - s["ckpt_s"],
                validation_s=s["val_s"] + s["sanity_val_s"],
                checkpoint_s=s["ckpt_s"],
                checkpoints=s["ckpt_count"],
                checkpoint_mb=s["ckpt_mb"],
                finish_s=s["end_t"] - s.get("train_end_t", s["end_t"]),
                epochs=s["epochs"],
                sanity_images=s["sanity_images"],
                ratio=stage_wall / bare if bare else None,
            )
        rows.append(row)
    evaluation_bare = sum(f["images"] / forward_rates[(f["model"], f["batch"])] for f in probes.forward)
    bare_total = sum(r["bare_s"] for r in rows) + evaluation_bare
    blocks = dict(probes.blocks)
    accounted = sum(r.get("wall_s", 0.0) for r in rows) + sum(blocks.values())
    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "imported": imported,
        "wall_s": wall,
        "bare_s": bare_total,
        "ratio": wall / bare_total,
        "overhead": wall / bare_total - 1,
        "stages": rows,
        "blocks_s": blocks,
        "evaluation": {"bare_s": evaluation_bare, "passes": probes.forward},
        "other_s": wall - accounted,
        "side_by_side": side,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"-> {out}")


def side_by_side(run: Path, copy: Path, config: str, parallel: int, stages: list[dict]) -> dict | None:
    """Retrain the run's strategy experts `parallel` at a time (see the module docstring); None when 0."""
    if parallel < 1:
        return None
    from askexpert.cli import cli_main

    settings = yaml.safe_load((run / "pipeline.yaml").read_text())
    family = settings["specialization"]
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("logits", "report.*"))
    shutil.rmtree(copy / "experts" / family)
    record = json.loads((copy / "stages.json").read_text())
    kept = {name: entry for name, entry in record.items() if not name.startswith(f"experts/{family}/")}
    (copy / "stages.json").write_text(json.dumps(kept))
    probes = Probes()
    try:
        cli_main(["pipeline", "--config", config, "--out", str(copy), "--parallel_experts", str(parallel)])
    finally:
        probes.undo()
    wall = probes.blocks["experts side by side (subprocesses)"]  # the experts only: not planning, evaluation
    alone = [s["end_t"] - s["start_t"] for s in stages if s["stage"].startswith(f"experts/{family}/") and "end_t" in s]
    reports = [json.loads((folder / "report.json").read_text()) for folder in (run, copy)]
    moved = [
        abs(a["subset_test_acc"] - b["subset_test_acc"])
        for a, b in zip(reports[0]["experts"], reports[1]["experts"], strict=True)
    ]
    result = {
        "experts": len(alone),
        "parallel": parallel,
        "wall_s": wall,
        "one_expert_alone_s": sum(alone) / len(alone) if alone else None,
        "sequential_s": sum(alone),
        "ratio_to_one": wall / (sum(alone) / len(alone)) if alone else None,
        "subset_acc_max_abs_diff": max(moved) if moved else None,
        "system_acc": [r["selected"]["acc"] for r in reports],
    }
    print(
        f"\n{len(alone)} {family} experts side by side ({parallel} at a time): {wall:.1f} s (first process start to "
        f"last end) vs {result['one_expert_alone_s']:.1f} s for one alone, {sum(alone):.1f} s one after "
        f"another; ratio to one {result['ratio_to_one']:.2f} (goal <= 1.5); own-class accuracy moved by at most "
        f"{100 * result['subset_acc_max_abs_diff']:.2f} points",
        flush=True,
    )
    return result


def print_table(result: dict) -> None:
    print(
        f"\npipeline {result['config']} on {result['device']}: {result['wall_s']:.1f} s wall, "
        f"{result['bare_s']:.1f} s bare compute, wall / bare = {result['ratio']:.2f}"
    )
    head = f"{'stage':<24} {'wall':>7} {'bare':>7} {'ratio':>6} {'start':>6} {'train':>7} {'val':>6} {'ckpt':>6}"
    print(head + f" {'(n)':>4} {'finish':>6}")
    for r in result["stages"]:
        if "wall_s" not in r:
            print(f"{r['stage']:<24} {'':>7} {r['bare_s']:7.1f}   (subprocess: in the side-by-side block)")
            continue
        print(
            f"{r['stage']:<24} {r['wall_s']:7.1f} {r['bare_s']:7.1f} {r['ratio']:6.2f} {r['startup_s']:6.1f} "
            f"{r['train_s']:7.1f} {r['validation_s']:6.1f} {r['checkpoint_s']:6.1f} {r['checkpoints']:4d} "
            f"{r['finish_s']:6.1f}"
        )
    for label, seconds in result["blocks_s"].items():
        bare = f"{result['evaluation']['bare_s']:7.1f}" if label == "evaluation" else f"{'':>7}"
        print(f"{label:<24} {seconds:7.1f} {bare}")
    print(f"{'other (imports, glue)':<24} {result['other_s']:7.1f}")


if __name__ == "__main__":
    main()
