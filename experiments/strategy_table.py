"""Subset test accuracy of experts per specialization strategy, at an equal step budget, over seeds.

    make strategy-table            # = python experiments/strategy_table.py (about 45 min on 2 CPU cores)

For every seed it trains, through the same `python -m askexpert` commands a user runs: the demo
generalist (configs/generalist_demo.yaml), a superclass partition into 4 experts, and then every expert
with every strategy row below (configs/expert_demo.yaml + configs/specialization/<name>.yaml), starting
from the generalist's checkpoint: on CPU the demo base model (configs/base_demo.yaml) has the generalist's
architecture and recipe, so with the same seed it is the same network and is not trained twice. Each
expert is scored with its final weights (all rows train for the same number of optimizer steps) on the
test images of its own classes and on a sample of the other classes' (what a misrouted sample gets); a
`dustbin` expert's "other" answers take the generalist's answer, as in the collaborative system.

It writes `<out>/results.json` and the markdown table `docs/results/strategies_stand_in.md`. The data is
the synthetic STAND-IN, not CIFAR-100, and the tables say so.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from askexpert.cli import cli_main  # noqa: E402
from askexpert.errors import UserError  # noqa: E402
from askexpert.files.atomic import write_json  # noqa: E402
from askexpert.lightning_cli.cli import AskExpertCLI  # noqa: E402
from askexpert.modules.loading import load_classifier  # noqa: E402
from datamodules.partitions import Partition  # noqa: E402

# (row label, strategy, expert init, extra CLI overrides). The scratch row gets a from-scratch learning rate.
ROWS = [
    ("static (same init)", "static", "base", []),
    ("static (scratch)", "static", "scratch", ["--model.lr", "2e-3", "--model.warmup_epochs", "0.5"]),
    ("dustbin", "dustbin", "base", []),
    ("progressive", "progressive", "base", []),
]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit(config: list[str], root: Path, seed: int, extra: list[str]):
    args = ["fit", *config, "--seed_everything", str(seed), "--trainer.default_root_dir", str(root), *QUIET, *extra]
    return cli_main(args)


@torch.no_grad()
def subset_predictions(model, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + 1000]).argmax(-1) for i in range(0, len(images), 1000)])


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def trained(config: str, root: Path, seed: int, tiny: list[str], reuse: bool):
    """The all-class model of `config` for this seed: trained now, or loaded when `reuse` finds it finished."""
    results = root / "eval" / "test_results.json"  # where `test` writes (runs.folder.evaluation_dir)
    if reuse and results.exists():
        return load_classifier(str(root / "checkpoints" / "best.ckpt"))
    model = fit(["--config", config], root, seed, tiny).model
    cli_main(["test", "--config", str(root / "config.yaml"), "--ckpt_path", str(root / "checkpoints" / "best.ckpt")])
    return load_classifier(str(root / "checkpoints" / "best.ckpt")) if model is not None else None


def run_seed(
    seed: int, out: Path, experts: list[int], rows: list[tuple], tiny: list[str], reuse: bool, expert_args: list[str]
) -> dict:
    seed_dir = out / f"seed{seed}"
    generalist = trained("configs/generalist_demo.yaml", seed_dir / "generalist", seed, tiny, reuse)
    # The demo base model is the generalist's network (see the module docstring): experts start from it.
    base_ckpt = seed_dir / "generalist" / "checkpoints" / "best.ckpt"
    datamodule = AskExpertCLI(["--config", "configs/generalist_demo.yaml", *tiny], run=False).datamodule
    partition_file = out / "partition.json"
    cli_main(
        ["partition", "--config", "configs/data/synthetic_demo.yaml", *_data_args(tiny), "--out", str(partition_file)]
    )
    partition = Partition.load(str(partition_file))
    images, labels = datamodule.tensors("test")
    general_pred = subset_predictions(generalist, images)
    result: dict = {"generalist": {}, "rows": {label: {} for label, *_ in rows}}
    result |= {"generalist_misrouted": {}, "misrouted": {label: {} for label, *_ in rows}, "test_images": {}}
    for e in experts:
        inside = torch.isin(labels, torch.tensor(partition.classes_of(e)))
        truth = labels[inside]
        # every third test image of the other experts' classes: what a misrouted sample meets
        outside = torch.nonzero(~inside).flatten()[::3]
        result["generalist"][e] = float((general_pred[inside] == truth).float().mean())
        result["generalist_misrouted"][e] = float((general_pred[outside] == labels[outside]).float().mean())
        result["test_images"][e] = int(inside.sum())
        for label, strategy, init, extra in rows:
            root = seed_dir / strategy / init / f"expert{e}"
            args = ["--config", "configs/expert_demo.yaml", "--config", f"configs/specialization/{strategy}.yaml"]
            args += ["--partition", str(partition_file), "--expert_index", str(e), "--model.init", init]
            args += ["--model.base_path", str(base_ckpt), *extra, *tiny, *expert_args]
            expert = fit(args, root, seed, []).model
            for key, chosen in (("rows", torch.nonzero(inside).flatten()), ("misrouted", outside)):
                pred = subset_predictions(expert, images[chosen])
                other = pred == partition.num_classes  # dustbin's "other": the system asks the generalist
                pred = torch.where(other, general_pred[chosen], pred)
                result[key][label][e] = float((pred == labels[chosen]).float().mean())
            shutil.rmtree(root / "checkpoints", ignore_errors=True)  # weights are not needed for the table
            own, misrouted = 100 * result["rows"][label][e], 100 * result["misrouted"][label][e]
            print(f"seed {seed} expert {e} {label}: {own:.2f} % own classes, {misrouted:.2f} % others", flush=True)
    return result


def _data_args(tiny: list[str]) -> list[str]:
    return [a for i, a in enumerate(tiny) if a.startswith("--data.") or (i > 0 and tiny[i - 1].startswith("--data."))]


def cells(results: dict, experts: list[int], get) -> str:
    """'mean ± std' over seeds for every expert, then the mean over experts (bold)."""
    seeds = sorted(results)
    parts = []
    for e in experts:
        m, s = mean_std([100 * get(results[seed], e) for seed in seeds])
        parts.append(f"{m:.2f} ± {s:.2f}")
    m, s = mean_std([100 * sum(get(results[seed], e) for e in experts) / len(experts) for seed in seeds])
    parts.append(f"**{m:.2f}** ± {s:.2f}")
    return " | ".join(parts)


def render(results: dict[int, dict], experts: list[int], rows: list[tuple], minutes: float) -> str:
    seeds = sorted(results)
    first = results[seeds[0]]
    header = [
        "| row | " + " | ".join(f"expert {e}" for e in experts) + " | mean |",
        "|---|" + "---|" * (len(experts) + 1),
    ]
    lines = [
        "# Specialization strategies on the STAND-IN (not CIFAR-100)",
        "",
        f"Reproduce: `make strategy-table` ({minutes:.0f} min on this machine's 2 CPU cores). Every expert row "
        "trains for the same optimizer-step budget (configs/expert_demo.yaml: 1 epoch = 70 steps of 128) from the "
        "same start (`init: base`: the demo generalist's checkpoint, which on CPU is also the base model, see "
        "configs/base_demo.yaml) except `static (scratch)`. Mean ± std over seeds "
        f'{", ".join(map(str, seeds))} (each seed retrains the generalist too); a dustbin expert\'s "other" '
        "answers take the generalist's answer, as in the collaborative system.",
        "",
        f"## Test accuracy (%) on the expert's own classes ({first['test_images'][experts[0]]} images per expert)",
        "",
        *header,
        "| generalist (all classes) | " + cells(results, experts, lambda r, e: r["generalist"][e]) + " |",
    ]
    for label, *_ in rows:
        lines.append(f"| {label} | " + cells(results, experts, lambda r, e, label=label: r["rows"][label][e]) + " |")
    if "progressive" in {r[0] for r in rows}:
        gains = [
            100 * (results[seed]["rows"]["progressive"][e] - results[seed]["generalist"][e])
            for seed in seeds
            for e in experts
        ]
        n = first["test_images"][experts[0]]
        p = sum(results[s]["generalist"][e] for s in seeds for e in experts) / (len(seeds) * len(experts))
        se = 100 * math.sqrt(p * (1 - p) / n)
        lines += [
            "",
            f"Progressive experts vs the generalist on their own classes: mean gain {sum(gains) / len(gains):+.2f} "
            f"points over {len(gains)} (seed, expert) pairs, worst pair {min(gains):+.2f} points; one standard "
            f"error of a subset accuracy here is {se:.2f} points.",
        ]
    lines += [
        "",
        "## Test accuracy (%) on other experts' classes (what a misrouted sample gets; every third such image)",
        "",
        *header,
        "| generalist (all classes) | " + cells(results, experts, lambda r, e: r["generalist_misrouted"][e]) + " |",
    ]
    for label, *_ in rows:
        get = lambda r, e, label=label: r["misrouted"][label][e]  # noqa: E731
        lines.append(f"| {label} | " + cells(results, experts, get) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experts", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], help="labels of the rows to train")
    parser.add_argument("--out", default="runs/strategy_table")
    parser.add_argument("--doc", default="docs/results/strategies_stand_in.md")
    parser.add_argument("--tiny", action="store_true", help="micro models and data (for the tests)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished generalist/base runs under --out")
    parser.add_argument("--expert-args", default="", help="extra `fit` flags for every expert (quoted), for tuning")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # the in-process CLI runs below must not see this script's options
    os.chdir(REPO)
    rows = [r for r in ROWS if r[0] in args.rows]
    tiny = []
    if args.tiny:
        tiny = [
            "--model.model_name",
            "vit_micro_patch8_32",
            "--trainer.max_epochs",
            "1",
            "--data.synthetic_train_per_class",
            "10",
            "--data.synthetic_test_per_class",
            "4",
            "--data.batch_size",
            "64",
        ]
    out = Path(args.out)
    started = time.time()
    results = {
        seed: run_seed(seed, out, args.experts, rows, tiny, args.reuse, args.expert_args.split()) for seed in args.seeds
    }
    minutes = (time.time() - started) / 60
    write_json(out / "results.json", {"minutes": minutes, "results": results})
    table = render(results, args.experts, rows, minutes)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(table)
    write_json(Path(args.doc).with_suffix(".json"), {"minutes": minutes, "results": results})
    print(table)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"strategy_table: error: {err}", file=sys.stderr)
        sys.exit(2)
