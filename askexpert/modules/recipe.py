"""What a training recipe may ask for, checked in one line before any module is built (`check_recipe`)."""

from __future__ import annotations

from askexpert.errors import UserError

SCHEDULES = ("cosine", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_recipe(
    num_classes: int,
    class_names: list[str] | None,
    image_size: int,
    lr: float,
    head_lr: float | None,
    layer_decay: float | None,
    warmup_epochs: float,
    schedule: str,
    label_smoothing: float,
    random_erase: float,
    compile_mode: str,
    ema_decay: float | None = None,
    ema_warmup: bool = False,
    regularisation: dict[str, float] | None = None,
) -> None:
    """Refuse, in one line, a training recipe no module can run (before anything is built)."""
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"unknown compile_mode {compile_mode!r}; modes: {', '.join(COMPILE_MODES)}")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; schedules: {', '.join(SCHEDULES)}")
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise UserError(f"{len(class_names)} class names given for {num_classes} classes")
    if lr <= 0 or warmup_epochs < 0 or not 0 <= label_smoothing < 1:
        raise UserError("lr must be positive, warmup_epochs non-negative and label_smoothing in [0, 1)")
    if (head_lr is not None and head_lr <= 0) or (layer_decay is not None and not 0 < layer_decay <= 1):
        raise UserError("--model.head_lr must be positive and --model.layer_decay in (0, 1]")
    if not 0 <= random_erase <= 1:
        raise UserError(f"--model.random_erase is a probability in [0, 1], got {random_erase}")
    if image_size < 1:
        raise UserError(f"the model's image_size must be a positive number of pixels, got {image_size}")
    if ema_decay is not None and (isinstance(ema_decay, bool) or not 0 < ema_decay < 1):
        raise UserError(f"--model.ema_decay is the weight EMA's decay in (0, 1), e.g. 0.9998, got {ema_decay}")
    if ema_warmup and ema_decay is None:
        raise UserError("--model.ema_warmup needs the weight EMA: set --model.ema_decay too")
    for name, value in (regularisation or {}).items():
        check_regularisation(name, value)


# The valid range of each regularisation setting (`regularisation` above). Out of it, the value is not refused by
# what reads it but silently means something else: Mixup/CutMix below 0 are off, a negative weight decay grows the
# weights, a floor above 1 makes the cosine schedule climb; a drop-path rate of 1 or more fails mid-epoch.
REGULARISATION_RANGES = {  # name: (lowest, highest or None, whether the highest itself is allowed, in words)
    "weight_decay": (0.0, None, True, "0 or more"),
    "min_lr_ratio": (0.0, 1.0, True, "in [0, 1]"),
    "drop_path_rate": (0.0, 1.0, False, "in [0, 1)"),
    "mixup_alpha": (0.0, None, True, "0 (off) or more"),
    "cutmix_alpha": (0.0, None, True, "0 (off) or more"),
}


def check_regularisation(name: str, value: float) -> None:
    low, high, high_allowed, words = REGULARISATION_RANGES[name]
    below_high = high is None or value < high or (high_allowed and value == high)
    if not (value >= low and below_high):  # written so that NaN fails too
        raise UserError(f"--model.{name} must be {words}, got {value}")
