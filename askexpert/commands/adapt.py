"""`python -m askexpert adapt --run DIR --rounds N`: the edge generalist learns from its experts, round after round.

    python -m askexpert adapt --run runs/demo --rounds 2                         # simulated stream, RUN/adapt
    python -m askexpert adapt --run runs/demo --rounds 3 --record answers.npz    # what `edge --record` kept
    python -m askexpert adapt --run runs/demo --rounds 2 --export exports/demo   # and re-export the generalist

Each round the system answers the round's unlabelled images and keeps the offloaded ones with the experts'
soft labels; the generalist is distilled on them with a replay share of its training data, τ is chosen again on
validation, and the round is measured on the run's test split (adapt.csv, adapt.png). Finished rounds are
skipped when the command runs again; other settings are refused. docs/adapt.md explains every part; the parts
are in askexpert/adapt/.
"""

from __future__ import annotations

import math
import os

from askexpert.errors import UserError, check_output_path

# lr chosen on validation at the evidence scale (docs/results.md, "The edge learns from its experts"): 2e-4 made
# the 20-epoch generalist worse on validation in every round, 5e-5 and 2e-5 kept it level
DEFAULTS = {"epochs": 2, "batch_size": 128, "replay": 0.5, "temperature": 1.0, "lr": 5e-5, "weight_decay": 0.05}


def parser():
    from askexpert.parsers import command_parser

    p = command_parser(
        "adapt", "Fine-tune the edge generalist on its experts' answers, round by round.", with_data=False
    )
    p.add_argument("--run", type=str, required=True, help="finished pipeline run folder (with report.json)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of deployment (a later call may add rounds)")
    p.add_argument("--out", type=str | None, default=None, help="adapt folder (default: RUN/adapt)")
    p.add_argument(
        "--record", type=str | None, default=None, help="a record of `edge --record` instead of a simulated stream"
    )
    p.add_argument(
        "--stream_size",
        type=int | None,
        default=None,
        help="stream images in all, cut into --rounds equal parts (default: 5000 a round for the stand-in; the "
        "whole calibration split or record otherwise)",
    )
    p.add_argument(
        "--point",
        type=str,
        default="selected",
        help="operating point the deployment runs at: selected (the run's) or constrained (under the run's "
        "routing.constrained limits)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffles the stream and seeds the fine-tuning")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="passes over the kept images per round")
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="images per fine-tuning step")
    p.add_argument(
        "--replay", type=float, default=DEFAULTS["replay"], help="share of each batch from the training split"
    )
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="distillation temperature")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="AdamW learning rate (cosine to a tenth per round)")
    p.add_argument("--weight_decay", type=float, default=DEFAULTS["weight_decay"], help="AdamW weight decay")
    p.add_argument("--eval_batch_size", type=int, default=512, help="images per forward pass when measuring")
    p.add_argument("--export", type=str | None, default=None, help="export folder of this run to re-export into")
    p.add_argument("--overwrite", type=bool, default=False, help="discard the adapt folder's rounds and start again")
    return p


def check_args(args) -> None:
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    if not 0.0 <= args.replay <= 1.0:
        raise UserError(f"--replay is the share of each batch from the training split, in [0, 1], got {args.replay}")
    replayed = int(math.floor(args.replay * args.batch_size + 0.5))  # as DistillSettings.replay_count rounds it
    if args.replay < 1.0 and replayed >= args.batch_size:
        raise UserError(
            f"--replay {args.replay} of a batch of {args.batch_size} rounds to {replayed} replay images: no room for "
            "the experts' answers; lower --replay or raise --batch_size (--replay 1 is the replay-only control)"
        )
    if args.stream_size is not None and args.stream_size < 1:
        raise UserError(f"--stream_size must be at least 1, got {args.stream_size}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0 or args.lr <= 0 or args.weight_decay < 0:
        raise UserError("--temperature and --lr must be positive and --weight_decay not negative")
    if args.seed < 0:
        raise UserError(f"--seed must not be negative, got {args.seed}")


def run(argv: list[str]) -> list[dict]:
    from askexpert.adapt.distill import DistillSettings
    from askexpert.adapt.measure import run_routing
    from askexpert.adapt.record import read_record
    from askexpert.adapt.reexport import ExportTools, check_export_of_run, reexport
    from askexpert.adapt.rounds import AdaptJob, run_rounds
    from askexpert.adapt.state import AdaptFolder, adapt_identity, check_identity, start
    from askexpert.adapt.stream import recorded_stream, simulated_stream
    from askexpert.collab.evaluation import load_run
    from askexpert.files.hashing import file_sha256
    from askexpert.pipeline.finished_run import open_finished_run
    from askexpert.pipeline.settings import expert_count, recorded_profile
    from askexpert.runs.lock import check_not_in_use, locked
    from datamodules.datamodule import ImageDataModule

    args = parser().parse_args(argv)
    check_args(args)
    # everything is checked and loaded before the adapt folder is written: a refusal leaves nothing behind
    finished = open_finished_run(args.run)
    routing = run_routing(args.run, args.point)
    check_not_in_use(args.run)  # a pipeline or evaluate still writing the run would change what adapt reads
    out = args.out or os.path.join(args.run, "adapt")
    check_output_path(out, "--out", "folder")
    settings, layout = finished.settings, finished.layout
    # the inputs a user hands in (a record, an export) are checked against the run's metadata before any image loads
    data = ImageDataModule(**settings.data.as_dict())
    partition, family = finished.partition(), settings.specialization
    record = read_record(args.record, data.class_names, data.stored_image_size) if args.record else None
    generalist_ckpt = layout.best(layout.stage_dir("generalist"))
    experts = [file_sha256(layout.best(layout.expert_dir(family, i))) for i in range(partition.num_experts)]
    bundle = None
    if args.export:
        bundle = check_export_of_run(args.export, data.class_names, partition, data.stored_image_size, experts, routing)
    run = load_run(
        layout, settings.data.as_dict(), family, False, recorded_profile(args.run, settings.profile),
        expert_count(settings.partition),
    )  # fmt: skip
    datamodule = run.datamodule
    if record is not None:
        stream = recorded_stream(args.record, record, args.rounds, args.stream_size, args.seed)
    else:
        stream = simulated_stream(datamodule, args.rounds, args.stream_size, args.seed)
    distill = DistillSettings(**{key: getattr(args, key) for key in DEFAULTS})
    identity = adapt_identity(file_sha256(generalist_ckpt), experts, routing, stream, distill)
    folder = AdaptFolder(out)
    check_identity(folder, identity, args.overwrite)
    label = "STAND-IN synthetic data, not CIFAR-100" if datamodule.stand_in else f"{datamodule.hparams.source} data"
    print(f"adapt: {args.rounds} round(s) of the {stream.description} ({label}) -> {out}", flush=True)
    described = {"run": os.path.abspath(args.run), "stream": stream.description, "stand_in": datamodule.stand_in}
    title = f"adapt: {stream.description}" + (" (STAND-IN data)" if datamodule.stand_in else "")
    with locked(out):
        start(folder, identity, args.overwrite, described)
        job = AdaptJob(run, routing, stream, distill, folder, args.rounds, args.seed, args.eval_batch_size, title)
        rows = run_rounds(job)
    print(f"adapt: rounds 0..{rows[-1]['round']} -> {folder.csv}, {folder.plot}", flush=True)
    if bundle is not None:
        from askexpert.commands import export

        last = rows[-1]
        from askexpert.collab.report_file import read_report

        tools = ExportTools(
            export.export_model, export.compare, export.onnx_logits, export.MIN_AGREEMENT, report=read_report(args.run)
        )
        point = {"threshold": last["tau"], "temperature_value": last["temperature"]}
        checkpoint = folder.checkpoint(last["round"])
        # read again: the rounds may have taken hours, and the export may have been replaced meanwhile
        bundle = check_export_of_run(args.export, data.class_names, partition, data.stored_image_size, experts, routing)
        new = reexport(bundle, checkpoint, point, datamodule.tensors("test"), tools, args.eval_batch_size)
        if new == bundle.version:
            print(f"export {args.export}: already holds round {last['round']}'s generalist (version {new})")
        else:
            print(
                f"export {args.export}: generalist of round {last['round']} (τ {last['tau']:.3f}), version "
                f"{bundle.version} -> {new}; the edge client uses it from its next start",
                flush=True,
            )
    return rows
