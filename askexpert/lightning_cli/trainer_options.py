"""The Trainer's options Lightning checks too late or not at all, checked before it builds the Trainer.

- Hardware (`--trainer.accelerator`, `strategy`, `devices`, `num_nodes`): Lightning refuses a wrong name or device
  list from deep inside `Trainer.__init__` with a ValueError or TypeError, which a user sees as a traceback. These
  are Lightning's own checks (its registries, its accelerators' parsing of `devices`), said in one line that names
  the valid choices; what only Lightning's reader can tell (a combination) is made one line by
  `lightning_hardware_refusals`. `--trainer.precision` is refused by the parser already.
- The loop (`accumulate_grad_batches`, `val_check_interval`, `check_val_every_n_epoch`, ...): a 0 divides by zero
  in the first epoch, after the run folder is written; a negative clip value or a minimum above the maximum is
  silently ignored.

`AskExpertCLI._instantiate_trainer` runs `check_trainer_options` through `add_house_parts`
(askexpert/lightning_cli/trainer.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import (
    Accelerator,
    AcceleratorRegistry,
    CPUAccelerator,
    CUDAAccelerator,
    MPSAccelerator,
)
from lightning.pytorch.strategies import StrategyRegistry

from askexpert.errors import UserError

# Lightning's reader of --trainer.accelerator, strategy, devices, num_nodes and precision (`_AcceleratorConnector`)
CONNECTOR_FILE = "lightning/pytorch/trainer/connectors/accelerator_connector.py"


class MissingDevice(UserError, MisconfigurationException):
    """An accelerator this machine does not have. Also Lightning's MisconfigurationException, which Lightning raised
    for it before this check existed: callers that treat that case apart keep doing so (a pipeline's early check
    points at `--dry_run true`, askexpert/pipeline/resolve.py)."""


def accelerator_names() -> list[str]:
    """What `--trainer.accelerator` accepts by name (Lightning's registry, plus its `auto` and `gpu`)."""
    return ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]


def strategy_names() -> list[str]:
    """What `--trainer.strategy` accepts by name (Lightning's registry, plus `auto`)."""
    return ["auto", *StrategyRegistry.available_strategies()]


def available_accelerators() -> list[str]:
    """The accelerator names this machine can run (`auto` always can)."""
    names = []
    for name in sorted(AcceleratorRegistry.available_accelerators()):
        try:
            available = AcceleratorRegistry[name]["accelerator"].is_available()
        except Exception:  # an accelerator whose library is missing or broken is not available
            available = False
        names += [name] if available else []
    return ["auto", *names]


def accelerator_kind(accelerator: object) -> type[Accelerator] | None:
    """The accelerator class Lightning will use for `accelerator` where it is the CPU or CUDA (what askexpert runs
    on); None for the others (MPS, TPU), which Lightning checks itself."""
    if isinstance(accelerator, Accelerator):
        kind = type(accelerator)
    elif accelerator in ("gpu", "cuda"):
        kind = CUDAAccelerator
    elif accelerator == "cpu":
        kind = CPUAccelerator
    elif accelerator == "auto" and not MPSAccelerator.is_available():
        kind = CUDAAccelerator if CUDAAccelerator.is_available() else CPUAccelerator
    else:
        return None
    return kind if kind in (CPUAccelerator, CUDAAccelerator) else None


def check_trainer_options(trainer: dict) -> None:
    """Every check of the Trainer's own options (the `trainer` section of the config)."""
    check_hardware_options(trainer)
    check_loop_options(trainer)


def check_hardware_options(trainer: dict) -> None:
    """Refuse an accelerator or strategy Lightning does not know, an accelerator this machine does not have, a node
    count below 1, and devices the accelerator cannot parse (or does not have), each in one line."""
    accelerator, strategy = trainer.get("accelerator", "auto"), trainer.get("strategy", "auto")
    if isinstance(accelerator, str) and accelerator not in accelerator_names():
        raise UserError(f"--trainer.accelerator {accelerator!r} is not one of: {', '.join(accelerator_names())}")
    if isinstance(strategy, str) and strategy.lower() not in strategy_names():
        raise UserError(f"--trainer.strategy {strategy!r} is not one of: {', '.join(strategy_names())}")
    num_nodes = trainer.get("num_nodes", 1)
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise UserError(f"--trainer.num_nodes must be 1 or more, got {num_nodes!r}")
    available = available_accelerators()
    named = {"gpu": "cuda"}.get(accelerator, accelerator) if isinstance(accelerator, str) else None
    if named is not None and named not in available:
        raise MissingDevice(
            f"--trainer.accelerator {accelerator}: this machine has no {named} device; it runs: {', '.join(available)}"
        )
    kind = accelerator_kind(accelerator)
    if kind is None:
        return
    devices = trainer.get("devices", "auto")
    if devices == "auto":
        return
    try:
        parsed = kind.parse_devices(devices)
    except (MisconfigurationException, TypeError, ValueError):
        raise UserError(devices_refusal(kind, devices)) from None
    if not parsed:  # CUDA parses 0 (or an empty list) as "no GPU", which Lightning then refuses
        raise UserError(devices_refusal(kind, devices))


def devices_refusal(kind: type[Accelerator], devices: object) -> str:
    """Why `devices` cannot run on `kind`, with what it accepts."""
    if kind is CPUAccelerator:
        return f"--trainer.devices {devices!r}: on the CPU it is a number of processes (1 or more) or auto"
    count = CUDAAccelerator.auto_device_count()
    return (
        f"--trainer.devices {devices!r}: this machine has {count} GPU{'s' if count != 1 else ''} (ids 0 to "
        f"{count - 1}); give a number of GPUs, ids like 0,1 or [0, 1], -1 (all) or auto"
    )


def check_loop_options(trainer: dict) -> None:
    """Loop options that would divide by zero in the first epoch, or that Lightning ignores without a word."""
    at_least = {"accumulate_grad_batches": 1, "check_val_every_n_epoch": 1, "log_every_n_steps": 0}
    at_least |= {"num_sanity_val_steps": -1}  # -1: every validation batch
    for key, low in at_least.items():
        value = trainer.get(key)
        if value is not None and not (isinstance(value, int) and value >= low):
            raise UserError(f"--trainer.{key} must be a whole number of {low} or more, got {value!r}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not clip >= 0:  # Lightning skips clipping at <= 0: a negative value means "off" silently
        raise UserError(f"--trainer.gradient_clip_val must be 0 (off) or more, got {clip!r}")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (interval >= 1 if isinstance(interval, int) else 0 < interval <= 1):
        raise UserError(
            f"--trainer.val_check_interval must be a number of batches (1 or more) or a fraction of an epoch in "
            f"(0, 1], got {interval!r}"
        )
    for unit in ("epochs", "steps"):
        low, high = trainer.get(f"min_{unit}"), trainer.get(f"max_{unit}")
        if low is not None and high is not None and high != -1 and low > high:
            raise UserError(f"--trainer.min_{unit} {low} is more than --trainer.max_{unit} {high}")


@contextlib.contextmanager
def lightning_hardware_refusals() -> Iterator[None]:
    """Around building the Trainer: what Lightning's reader of the hardware options (its accelerator connector)
    still refuses after `check_hardware_options`, in one line. Those are combinations (a strategy that needs a GPU
    on the CPU, a precision this device cannot run, a strategy or accelerator whose library is not installed), too
    many to repeat here. Only an exception raised inside that reader is the user's: anything else keeps its
    traceback."""
    try:
        yield
    except (MisconfigurationException, ImportError, TypeError, ValueError) as err:
        if not _raised_in(err, CONNECTOR_FILE):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"the trainer's hardware options cannot run: {first}") from None


def _raised_in(err: BaseException, filename_end: str) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(filename_end):
            return True
        tb = tb.tb_next
    return False
