"""`python -m askexpert profile`: time each model on this machine and write a device profile that uses it.

    python -m askexpert profile --run runs/demo --out configs/profiles/my_device.yaml
    python -m askexpert profile --models vit_edge_patch4_32 vit_medium_patch4_32 --role edge --out edge.yaml

Each model is timed at batch 1 (what one classified image costs), in eval mode without gradients: torch's
benchmark Timer warms up, then repeats for at least `--min_run_time` seconds, and the median is kept.
Weights do not change the time, so models are built from their names (a run's checkpoints give the names
and head widths). The output is `--base_profile` with `measured_ms` added to the `--role` device(s), each time
under `MODEL/OUTPUTS/INPUT_SIDE` (a dustbin head is another model), and those devices renamed to this machine
(the times are its; the header says which fields still come from the base profile); `evaluate --profile OUT`
then uses these times instead of the FLOP estimate and its report says so.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform

import timm
import torch
import yaml

from askexpert.callbacks import atomic_write_text
from askexpert.collab.costs import load_profile, measured_key
from askexpert.errors import UserError, check_output_path

ROLES = ("edge", "near_edge", "both")


def parser():
    from askexpert.commands import command_parser
    from askexpert.commands.pipeline import DEFAULT_PROFILE

    p = command_parser(
        "profile", "Time each model at batch 1 on this machine; write a device profile.", with_data=False
    )
    p.add_argument("--run", type=str | None, default=None, help="pipeline run whose models to time")
    p.add_argument("--models", nargs="+", type=str, default=None, help="model names to time (instead of --run)")
    p.add_argument("--num_classes", type=int, default=100, help="head width for --models")
    p.add_argument("--image_size", type=int, default=32, help="input side for --models")
    p.add_argument("--base_profile", type=str, default=DEFAULT_PROFILE, help="profile to copy the other fields from")
    p.add_argument(
        "--role", type=str, default="both", help="which device this machine stands for: edge, near_edge, both"
    )
    p.add_argument("--out", type=str, required=True, help="profile YAML to write")
    p.add_argument("--min_run_time", type=float, default=1.0, help="seconds of timing per model")
    p.add_argument("--device", type=str, default="cpu", help="torch device to time on (cpu, cuda)")
    return p


def run_models(run_dir: str) -> list[tuple[str, int, int]]:
    """(model name, head width, image size) of every model of a pipeline run, without duplicates."""
    import glob

    from askexpert.checkpoints import load_checkpoint
    from askexpert.commands.evaluate import saved_settings

    settings = saved_settings(run_dir)
    found = []
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "checkpoints", "best.ckpt"), recursive=True)):
        h = load_checkpoint(path, mmap=True).get("hyper_parameters", {})
        size = int(h.get("image_size") or settings.data.image_size)  # the size the model computes at
        entry = (h["model_name"], int(h["num_classes"]) + int(bool(h.get("other_output"))), size)
        if entry not in found:
            found.append(entry)
    if not found:
        raise UserError(f"{run_dir} holds no trained model yet (no checkpoints/best.ckpt)")
    return found


@torch.no_grad()
def time_model(model_name: str, num_outputs: int, image_size: int, device: str, min_run_time: float) -> float:
    """Median milliseconds of one batch-1 forward pass."""
    from askexpert.modules.classifier import create_network

    model = create_network(model_name, num_outputs, 0.0, image_size).eval().to(device)
    image = torch.rand(1, 3, image_size, image_size, device=device)
    try:
        model(image)
    except (AssertionError, RuntimeError) as err:
        raise UserError(
            f"{model_name} cannot take {image_size}x{image_size} images: {str(err).splitlines()[0]}"
        ) from None
    for _ in range(5):  # warm-up: first calls allocate and pick kernels
        model(image)
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")  # warns about CUDA_HOME on CPU-only machines
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        cpp_logger.setLevel(level)
    timer = benchmark.Timer(stmt="model(image)", globals={"model": model, "image": image})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def machine_name(device: str) -> str:
    """What this machine's measured times are named after: the GPU, or the host's CPU and thread count."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))} ({platform.node()})"
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} ({cpu}, {torch.get_num_threads()} threads)"


def check_arguments(args) -> None:
    """Everything about the arguments, before anything is timed or written."""
    import askexpert.models

    if args.role not in ROLES:
        raise UserError(f"unknown role {args.role!r}; roles: {', '.join(ROLES)}")
    if (args.run is None) == (args.models is None):
        raise UserError("give either --run DIR or --models NAME ...")
    for name in args.models or []:
        if not timm.is_model(name):
            raise UserError(f"unknown model {name!r}; askexpert models: {', '.join(askexpert.models.model_names())}")
    if args.num_classes < 1 or args.image_size < 1 or args.min_run_time <= 0:
        raise UserError("--num_classes and --image_size must be at least 1 and --min_run_time positive")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"unknown --device {args.device!r}; e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: profile times cpu or cuda")
    check_output_path(args.out, "--out", "file")


def run(argv: list[str]) -> dict:
    from askexpert.commands.pipeline import find_config_file

    args = parser().parse_args(argv)
    check_arguments(args)
    args.base_profile = find_config_file(args.base_profile, "base profile")
    load_profile(args.base_profile)  # checked before timing anything
    with open(args.base_profile, encoding="utf-8") as f:
        profile = yaml.safe_load(f)
    models = run_models(args.run) if args.run else [(m, args.num_classes, args.image_size) for m in args.models]
    measured = {}
    for name, width, size in models:
        ms = time_model(name, width, size, args.device, args.min_run_time)
        measured[measured_key(name, width, size)] = round(ms, 4)
        print(f"{name} ({width} outputs, {size}x{size}): {ms:.3f} ms per image at batch 1 on {args.device}", flush=True)
    roles = ("edge", "near_edge") if args.role == "both" else (args.role,)
    machine = machine_name(args.device)
    renamed = []
    for role in roles:
        section = profile[role]
        # earlier times of this device stay (models timed one by one); another device's would be mixed in: not kept
        earlier = (section.get("measured_ms") or {}) if section.get("name") == machine else {}
        section["measured_ms"] = {**earlier, **measured}
        if section.get("name") != machine:
            renamed.append(f"{role} was {section.get('name')!r}")
            section["name"] = machine
    profile["name"] = os.path.splitext(os.path.basename(args.out))[0]
    header = (
        f"# Written by `python -m askexpert profile` on {datetime.date.today()}: measured_ms of the {', '.join(roles)} "
        f"device(s) timed on {machine}{' (' + '; '.join(renamed) + ')' if renamed else ''};\n"
        f"# every other field (rates, powers, link) copied from {args.base_profile}.\n"
    )
    atomic_write_text(args.out, header + yaml.safe_dump(profile, sort_keys=False))
    print(f"profile written to {args.out}")
    return profile
