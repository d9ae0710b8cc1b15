"""A finished run's last step, for `pipeline` and `evaluate` alike: evaluate the run (every model once on val and
test, from cached logits where they exist), write report.json, report.md and pareto.png, and print the headline
table after the sanity findings.
"""

from __future__ import annotations

from askexpert.collab.evaluation import evaluate_run
from askexpert.collab.report import headline_table, write_report
from askexpert.collab.system import RoutingConfig
from askexpert.pipeline.settings import expert_count
from askexpert.pipeline.wandb_runs import log_report
from askexpert.runs.layout import RunLayout


def evaluate_and_report(settings, layout: RunLayout, routing: RoutingConfig, out_dir: str | None = None) -> dict:
    """Evaluate a finished run and write its report files (to `out_dir`, default the run); prints the headline."""
    from datamodules.datamodule import ImageDataModule

    routing.check(ImageDataModule(**settings.data.as_dict()).num_classes)  # a bad option fails before any work
    print(f"evaluation: running every model once on val and test (cached in {layout.logits})", flush=True)
    report = evaluate_run(
        layout,
        settings.data.as_dict(),
        settings.specialization,
        settings.static_baseline,
        routing,
        settings.profile,
        settings.seed,
        num_experts=expert_count(settings.partition),
    )
    paths = write_report(report, out_dir or layout.root, run_dir=layout.root)  # its stages' metrics.csv
    log_report(report, paths, out_dir or layout.root, settings, layout)
    print_headline(report, paths)
    return report


def print_headline(report: dict, paths: dict[str, str]) -> None:
    from askexpert.collab.report import findings_lines  # the sanity findings come before any number

    print("\n" + "\n".join(findings_lines(report)))
    data = report["data"]
    label = "STAND-IN synthetic data, not CIFAR-100" if data["stand_in"] else f"{data['source']} data"
    sel = report["selected"]
    print(f"\nCollaborative inference on {data['test_size']} test images ({label}):\n")
    print(headline_table(report))
    print(
        f"\nthreshold {sel['threshold']:.2f} chosen on {sel['chosen_on']}; report: {paths['report.md']}, "
        f"{paths['report.json']}, {paths['pareto.png']}"
    )
