"""How often must routing be wrong before progressive experts beat static ones? Measured from cached logits.

    python experiments/misrouting.py --ablation runs/ablations/evidence      # after `make evidence`

Progressive experts keep part of the other classes; static experts know almost only their own. Which is better
for the system depends on how often an image reaches an expert that does not own its class. For every finished
run with static experts beside its own, every test image is sent to an expert: its owner, or, with probability
r, another expert drawn at random (the same draws for both families). The accuracy of both families' answers is
computed for r from 0 to 0.5; the crossover is the smallest r at which progressive experts are at least as
accurate. No model runs: the experts' cached test logits are reused. Next to it, the routing error the real
router makes at the run's operating point (1 - routing accuracy). Writes OUT.json and OUT.md (default
docs/results/evidence_misrouting.*).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiments.finished_runs import arguments, finished_cells, load_compared_run, write_tables  # noqa: E402

RATES = [round(0.01 * i, 2) for i in range(51)]  # 0 .. 0.5 in steps of 1 %


def accuracy_by_misrouting(logits: list, labels, coverage, rates: list[float], seed: int = 0) -> list[float]:
    """Accuracy of one family of experts when each image goes to its owner, or with probability r to a random
    other expert. `logits`: per expert, (N, C) test logits; `coverage`: (E, C) bool, one owner per class."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    owner = coverage.float().argmax(0)[labels]  # (N,) the expert of each image's class
    experts = len(logits)
    draw = torch.rand(len(labels), generator=generator)
    # another expert than the owner, uniformly: owner + 1 .. owner + E - 1 (mod E)
    other = (owner + 1 + torch.randint(experts - 1, (len(labels),), generator=generator)) % experts
    right = torch.stack([e.argmax(-1) == labels for e in logits], dim=1)  # (N, E)
    found = []
    for rate in rates:
        chosen = torch.where(draw < rate, other, owner)
        found.append(float(right.gather(1, chosen[:, None]).double().mean()))
    return found


def at_the_router(system, config, report: dict) -> dict:
    """Both families on the images the run's own router offloads at its chosen threshold, split by whether the
    router reached an owner of the image's class: the measured counterpart of the uniform curves (the router's
    mistakes fall on hard images and on experts of similar classes, not at random)."""
    from askexpert.collab.routing import NO_EXPERT

    temperature, threshold = report["routing"]["temperature_value"], report["selected"]["threshold"]
    ours, chosen, *_ = system.route("test", config, temperature)
    static, *_ = system.route("test", config, temperature, system.static_experts)
    labels = system.labels["test"]
    offloaded = ours.confidence < threshold
    to_owner = system.coverage[chosen.clamp_min(0), labels] & (chosen != NO_EXPERT)
    found = {"offloaded": int(offloaded.sum())}
    for name, mask in (("to_owner", offloaded & to_owner), ("misrouted", offloaded & ~to_owner)):
        n = int(mask.sum())
        found[name] = {
            "images": n,
            "progressive": float(ours.offload_correct[mask].double().mean()) if n else None,
            "static": float(static.offload_correct[mask].double().mean()) if n else None,
        }
    # what the misrouted images are worth to the system: progressive's gain there, per 100 test images
    n_test = len(labels)
    gains = {}
    for name in ("to_owner", "misrouted"):
        part = found[name]
        if part["images"]:
            gains[name] = 100 * part["images"] * (part["progressive"] - part["static"]) / n_test
    found["points_of_system_accuracy"] = gains
    return found


def run_curves(folder: Path) -> dict | None:
    """Both families' accuracy against the misrouting rate for one run (None without static experts beside)."""
    from askexpert.pipeline.settings import routing_config
    from askexpert.runs.layout import STATIC

    opened = load_compared_run(folder)
    if opened is None:
        return None
    settings, run = opened
    owners = run.partition.coverage().sum(0)
    if owners.max() > 1 or owners.min() < 1:
        return None  # overlapping experts or uncovered classes: "the owner" is not exactly one expert
    labels = run.generalist["labels"]["test"]
    coverage = run.partition.coverage().bool()
    curves = {
        family: accuracy_by_misrouting([m["logits"]["test"] for m in run.families[family]], labels, coverage, RATES)
        for family in (settings.specialization, STATIC)
    }
    report = json.loads((folder / "report.json").read_text())
    routing_acc = report["selected"].get("routing_acc")
    return {
        "progressive": curves[settings.specialization],
        "static": curves[STATIC],
        "router_error": None if routing_acc is None else 1.0 - routing_acc,
        "router": at_the_router(run.system, routing_config(settings.routing), report),
    }


def crossover(progressive: list[float], static: list[float]) -> float | None:
    """The smallest misrouting rate at which progressive experts are at least as accurate as static ones."""
    return next((rate for rate, p, s in zip(RATES, progressive, static, strict=True) if p >= s), None)


def router_summary(found: list[dict]) -> dict:
    """Means over seeds of `at_the_router` (accuracies over the seeds where such images exist)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    out = {"offloaded": mean(f["offloaded"] for f in found)}
    for part in ("to_owner", "misrouted"):
        out[part] = {key: mean(f[part][key] for f in found) for key in ("images", "progressive", "static")}
        out[part]["points"] = mean(f["points_of_system_accuracy"].get(part, 0.0) for f in found)
    return out


def router_markdown(summary: dict) -> str:
    """What the run's own router did: the offloaded test images it sent to an owner and the ones it misrouted,
    each family's accuracy there, and what each part adds to the system accuracy."""

    def pct(value):
        return "–" if value is None else f"{100 * value:.1f}"

    lines = [
        "| setting | seeds | offloaded images | to an owner: images, progressive / static % | misrouted: images, "
        "progressive / static % | progressive - static, points of system accuracy: to an owner / misrouted |",
        "|---|---:|---:|---|---|---|",
    ]
    for name, entry in summary.items():
        router = entry["router"]
        owner, wrong = router["to_owner"], router["misrouted"]
        lines.append(
            f"| {name} | {entry['seeds']} | {router['offloaded']:.0f} "
            f"| {owner['images']:.0f}, {pct(owner['progressive'])} / {pct(owner['static'])} "
            f"| {wrong['images']:.0f}, {pct(wrong['progressive'])} / {pct(wrong['static'])} "
            f"| {owner['points']:+.2f} / {wrong['points']:+.2f} |"
        )
    lines += [
        "",
        "The run's own router at its chosen threshold, on the test split (means over seeds): each family's answers on "
        "the offloaded images that reached an expert owning their class, and on those that did not. The last "
        "column splits the progressive-minus-static difference of system accuracy between the two groups.",
    ]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    shown = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    lines = [
        "| setting | seeds | router's error % | "
        + " | ".join(f"r = {int(100 * r)} %: progressive / static" for r in shown)
        + " | crossover r % |",
        "|---|---:|---:|" + "---|" * len(shown) + "---:|",
    ]
    for name, entry in summary.items():
        cells = [
            f"{100 * entry['progressive'][RATES.index(r)]:.1f} / {100 * entry['static'][RATES.index(r)]:.1f}"
            for r in shown
        ]
        cross = "–" if entry["crossover"] is None else f"{100 * entry['crossover']:.0f}"
        error = "–" if entry["router_error"] is None else f"{100 * entry['router_error']:.1f}"
        lines.append(f"| {name} | {entry['seeds']} | {error} | " + " | ".join(cells) + f" | {cross} |")
    lines += [
        "",
        "Accuracy (%) of the experts' answers when every test image is offloaded and a share r of them reaches a "
        "random other expert instead of its owner, means over seeds; the crossover is the smallest r (in steps of "
        "1 %) at which progressive experts are at least as accurate as static ones; the router's error is 1 - "
        "routing accuracy at the run's operating point. A uniform model: the router's own mistakes fall on hard "
        "images and on experts of similar classes; the table below measures them.",
        "",
        router_markdown(summary),
    ]
    return "\n".join(lines)


def main() -> None:
    args = arguments(__doc__, "evidence_misrouting")
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for cell, _, folder in finished_cells(Path(args.ablation)):
        found = run_curves(folder)
        if found is not None:
            name = ", ".join(f"{k}={v}" for k, v in cell.items()) or "default"
            by_setting[name].append(found)
            print(f"{folder}: crossover {crossover(found['progressive'], found['static'])}", flush=True)
    if not by_setting:
        raise SystemExit(f"no finished run with static experts beside its own in {args.ablation}")
    summary = {}
    for name, runs in by_setting.items():
        progressive = [statistics.fmean(r["progressive"][i] for r in runs) for i in range(len(RATES))]
        static = [statistics.fmean(r["static"][i] for r in runs) for i in range(len(RATES))]
        errors = [r["router_error"] for r in runs if r["router_error"] is not None]
        summary[name] = {
            "seeds": len(runs),
            "rates": RATES,
            "progressive": progressive,
            "static": static,
            "crossover": crossover(progressive, static),
            "router_error": statistics.fmean(errors) if errors else None,
            "router": router_summary([r["router"] for r in runs]),
        }
    write_tables(args.out, summary, markdown(summary))


if __name__ == "__main__":
    main()
