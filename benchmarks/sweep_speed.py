"""How long the threshold sweep takes from cached logits (the acceptance figure: 10 000 samples x 101
thresholds, well under a second).

Times two things on random logits shaped like a CIFAR-100 system (100 classes, 4 experts of 25 classes):
* `sweep`: the vectorised sweep alone, from the per-sample summary (confidence, correctness, costs);
* `route + sweep`: everything from logits: temperature-scaled softmax, gate, top-k expert choice, fusion
  for every expert, then the sweep - what `evaluate` does per split;
and, as a reference, the naive loop that masks the samples once per threshold. With the second expert:
* `sweep_two`: τ x margin (101 x 21 settings) from the per-sample summary;
* `route + sweep_two`: the same from logits, the two-expert fusion of every sample included;
against the naive loop over every (τ, margin). Medians of several repeats.
Writes `benchmarks/results/sweep_<device>.json` and prints a one-line summary.

    python benchmarks/sweep_speed.py [--samples 10000] [--thresholds 101] [--out PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from askexpert.collab.costs import CostModel, ModelCost, profile_from_dict  # noqa: E402
from askexpert.collab.second_expert import SecondExpert, pair_mask  # noqa: E402
from askexpert.collab.sweep import at_mask, default_margins, sweep, sweep_two  # noqa: E402
from askexpert.collab.system import CollaborativeSystem, ExpertSet, RoutingConfig  # noqa: E402
from askexpert.deploy.timing import time_calls  # noqa: E402
from askexpert.files.atomic import write_json  # noqa: E402
from datamodules.partitions import Partition, superclass_partition  # noqa: E402

PROFILE = {
    "edge": {"name": "edge", "gflops": 10.0, "overhead_ms": 1.0, "active_power_w": 5.4, "idle_power_w": 2.2},
    "near_edge": {"name": "near", "gflops": 1000.0, "overhead_ms": 3.0, "active_power_w": 30.0, "idle_power_w": 15.0},
    "link": {"name": "wifi", "uplink_mbps": 25.0, "rtt_ms": 3.7, "radio_w_per_mbps": 0.283, "radio_base_w": 0.133},
}


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(time_calls(fn, repeats, warmups=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--thresholds", type=int, default=101)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    n, classes = args.samples, 100
    coarse = [c // 5 for c in range(classes)]
    partition = Partition(superclass_partition(coarse, 4), [f"c{i}" for i in range(classes)])
    labels = {s: torch.randint(classes, (n,)) for s in ("val", "test")}

    def logits():
        return {s: torch.randn(n, classes) * 3 for s in ("val", "test")}

    cost_model = CostModel(profile_from_dict(PROFILE))
    small = ModelCost("g", 0.02, 3.0, 3.02, "flops", "flops")
    big = ModelCost("e", 0.5, 51.0, 3.5, "flops", "flops")
    experts = ExpertSet("progressive", [logits() for _ in range(4)], [cost_model.offload(big)] * 4, [big] * 4)
    system = CollaborativeSystem(logits(), labels, partition.coverage(), experts, cost_model, small)
    config = RoutingConfig(threshold=0.5, temperature=False)
    thresholds = torch.linspace(0, 1, args.thresholds, dtype=torch.float64)
    samples, *_ = system.route("test", config, 1.0)

    sweep_s = median_seconds(lambda: sweep(samples, thresholds), args.repeats)
    full_s = median_seconds(lambda: sweep(system.route("test", config, 1.0)[0], thresholds), args.repeats)
    naive_s = median_seconds(lambda: [at_mask(samples, samples.confidence < t) for t in thresholds], 3)

    pair_config = RoutingConfig(threshold=0.5, temperature=False, second_expert=SecondExpert(enabled=True))
    margins = default_margins()
    paired, *_ = system.route("test", pair_config, 1.0)
    pair_s = median_seconds(lambda: sweep_two(paired, thresholds, margins), args.repeats)
    pair_full_s = median_seconds(
        lambda: sweep_two(system.route("test", pair_config, 1.0)[0], thresholds, margins), args.repeats
    )

    def naive_pairs():
        for t in thresholds.tolist():
            for m in margins.tolist():
                offloaded, both = pair_mask(paired, t, m)
                at_mask(paired, offloaded, paired=both)

    pair_naive_s = median_seconds(naive_pairs, 1)
    result = {
        "samples": n,
        "thresholds": args.thresholds,
        "classes": classes,
        "experts": 4,
        "sweep_s": sweep_s,
        "route_and_sweep_s": full_s,
        "naive_loop_s": naive_s,
        "speedup_vs_naive": naive_s / sweep_s,
        "margins": len(margins),
        "sweep_two_s": pair_s,
        "route_and_sweep_two_s": pair_full_s,
        "naive_pair_loop_s": pair_naive_s,
        "pair_speedup_vs_naive": pair_naive_s / pair_s,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "sweep_cpu.json"
    write_json(out, result)
    print(
        f"sweep of {n} samples x {args.thresholds} thresholds: {1e3 * sweep_s:.2f} ms "
        f"(route + sweep from logits: {1e3 * full_s:.1f} ms; naive loop: {1e3 * naive_s:.1f} ms); "
        f"x {len(margins)} margins: {1e3 * pair_s:.1f} ms (from logits {1e3 * pair_full_s:.1f} ms; naive loop "
        f"{1e3 * pair_naive_s:.0f} ms) -> {out}"
    )


if __name__ == "__main__":
    main()
