"""What `validate` and `test` leave behind: `<root>/eval/{val,test}_results.json` with every metric, the data
described and the checkpoint read, and one headline line that says when the data was a synthetic stand-in."""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from askexpert.files.atomic import write_json
from askexpert.runs.folder import evaluation_dir


def report_results(stage: str, trainer: Trainer, model: LightningModule, datamodule: LightningDataModule) -> None:
    """Print the headline metric (labelled stand-in where it is) and save all metrics as JSON."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
    data = datamodule.describe()
    result = {"stage": stage, "metrics": metrics, "data": data, "ckpt_path": trainer.ckpt_path}
    write_json(os.path.join(evaluation_dir(trainer.default_root_dir), f"{stage}_results.json"), result)
    label = "STAND-IN synthetic data, not CIFAR-100" if data["stand_in"] else f"{data['source']} data"
    acc = metrics.get(f"{stage}/acc")
    if acc is not None:
        name = type(model).__name__
        line = f"\n{name} {stage} accuracy: {100 * acc:.2f} % on {data[f'{stage}_size']} images"
        subset_acc = metrics.get(f"{stage}/subset_acc")
        if subset_acc is not None:
            line += f", {100 * subset_acc:.2f} % on the images of its {len(model.hparams.subset)} classes"
        print(f"{line} ({label})")
