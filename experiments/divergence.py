"""Why the medium ViT diverged: a reduced-size reproduction on one CPU core, and the data for docs/divergence.md.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/divergence.py            # every group (~55 min on 1 core)
    OMP_NUM_THREADS=1 .venv/bin/python experiments/divergence.py --groups lr_sweep,clip
    .venv/bin/python experiments/divergence.py --list                       # the planned runs, nothing trained
    .venv/bin/python experiments/divergence.py --plot        # only redraw docs/divergence_*.png, print the table

Each run trains a reduced copy of the registered ViTs (`vit_edge_patch8_32` = width 192, `vit_medium_patch8_32`
= width 384, with the depth cut to `DEPTH`: 16 tokens instead of 64) on the synthetic STAND-IN data (not
CIFAR-100) with the project's recipe, copied from `ClassifierModule`: timm `create_optimizer_v2("adamw")`
(no decay on norms / biases / pos-embed), linear warm-up from 1e-3 * lr then cosine to 0.01 * lr stepped per
optimizer step, label smoothing 0.1, drop_path 0.1, Mixup 0.8 / CutMix 1.0 via `timm.data.Mixup` with
`SoftTargetCrossEntropy`, random crop (pad 4) + flip. Per step it logs the loss, the total gradient norm
(before clipping) and the learning rate; every `PROBE_EVERY` steps it measures, on 32 fixed test images, the
largest attention logit q.k / sqrt(head_dim) of every block, the lowest attention entropy, the largest
|output logit| and the parameter norm. A run stops at the first non-finite loss or gradient.

Results go to experiments/results/divergence_cpu.json, keyed by run name; a run already there with the same
config is not trained again, so the command can be interrupted and resumed. Fine-tuning runs (the experts'
case) start from a weight snapshot of another run, kept under --cache (re-trained when missing).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import askexpert.models  # noqa: E402, F401  (registers the 32-px ViTs with timm)
from askexpert.files.atomic import write_json  # noqa: E402
from askexpert.modules.classifier import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402
from datamodules.augment import random_crop_flip  # noqa: E402
from datamodules.synthetic import make_synthetic  # noqa: E402

RESULTS = REPO / "experiments" / "results" / "divergence_cpu.json"
DOCS = REPO / "docs"
MODELS = {192: "vit_edge_patch8_32", 384: "vit_medium_patch8_32"}  # head_dim 64 in both, as at full size
DEPTH = 4  # both widths at the same depth, so width is the only architectural difference
TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 10
PROBE_EVERY = 10
SPIKE_NATS = 1.0  # a smoothed loss this far above its running minimum counts as a divergence
SUBSET_SUPERCLASSES = range(5)  # the experts' case trains on 25 classes (5 superclasses) with the 100-way head


@dataclass(frozen=True)
class RunConfig:
    """One training run; `name` is derived from the fields, so results are cached by configuration."""

    group: str
    width: int
    lr: float
    seed: int = 0
    batch: int = 32
    steps: int = 300
    warmup: int = 30  # steps of linear warm-up (10 % of the run, like the base model's 3 of 30 epochs)
    precision: str = "fp32"  # fp32 or bf16 (torch.autocast on the CPU)
    clip: float | None = None  # max total gradient norm; None = no clipping (the failing recipe)
    qk_norm: bool = False
    mixup: bool = True
    subset: bool = False  # train on the 25 classes of SUBSET_SUPERCLASSES only (an expert's data)
    init_from: str | None = None  # name of the run whose snapshot this run fine-tunes (fresh AdamW)
    snapshot_step: int | None = None  # keep the weights after this many steps, for runs that fine-tune them

    @property
    def name(self) -> str:
        parts = [self.group, f"w{self.width}", f"lr{self.lr:g}", self.precision, f"wu{self.warmup}"]
        parts += [f"clip{self.clip:g}"] if self.clip else []
        parts += ["qknorm"] if self.qk_norm else []
        parts += [] if self.mixup else ["nomix"]
        parts += ["subset"] if self.subset else []
        parts += [f"from[{self.init_from}]"] if self.init_from else []
        return "_".join(parts) + f"_s{self.seed}"


def plan() -> list[RunConfig]:
    """Every run of the study, in the order they are trained (snapshot sources before their fine-tunes)."""
    runs: list[RunConfig] = []
    seeds = (0, 1, 2)
    # 1. Where does each width become unstable? Same recipe, lr swept upwards. The edge width also runs at twice
    #    each medium lr, so equal lr * width pairs can be compared. Medium seed-0 runs keep their final weights.
    edge_lrs = {1e-3: 2, 2e-3: 2, 3e-3: 1, 6e-3: 2, 1e-2: 1, 2e-2: 2}  # lr: number of seeds
    medium_lrs = {5e-4: 2, 1e-3: 2, 3e-3: 2, 1e-2: 1}
    runs += [RunConfig("lr_sweep", 192, lr, seed) for lr, n in edge_lrs.items() for seed in seeds[:n]]
    runs += [
        RunConfig("lr_sweep", 384, lr, seed, snapshot_step=300 if seed == 0 else None)
        for lr, n in medium_lrs.items()
        for seed in seeds[:n]
    ]
    hot, calm, very_hot = (RunConfig("lr_sweep", 384, lr, 0, snapshot_step=300).name for lr in (3e-3, 5e-4, 1e-2))
    # 2. Fixes applied to hot settings (6x and 20x the medium proxy's calm 5e-4; 2x that lr at width 192).
    runs += [RunConfig("clip", 384, 3e-3, seed, clip=1.0) for seed in seeds[:2]]
    runs += [RunConfig("clip", 192, lr, 0, clip=1.0) for lr in (6e-3, 2e-2)]
    runs += [RunConfig("warmup", 192, 6e-3, seed, warmup=150) for seed in seeds[:2]]
    runs += [RunConfig("qk_norm", 384, lr, 0, qk_norm=True) for lr in (5e-4, 3e-3, 1e-2)]
    runs += [RunConfig("qk_norm", 192, 2e-2, 0, qk_norm=True)]
    # 3. Batch: does a larger batch at the same lr and step count grow the logits faster? (width 192: cheap)
    runs += [RunConfig("batch", 192, 3e-3, 0, batch=64)]
    # 4. bf16 autocast vs fp32 from the same hot weights (bf16 matmuls are ~15x slower on this CPU: 20 steps).
    runs += [
        RunConfig("bf16", 384, 2e-3, 0, steps=20, warmup=2, precision=p, init_from=very_hot) for p in ("fp32", "bf16")
    ]
    # 5. The experts' case: fine-tune with a fresh AdamW at 6e-4 (the hot base's lr / 5), no Mixup, on a
    #    25-class subset, from the hot base and from the calm one; and the hot one with clipping.
    finetune = dict(steps=200, warmup=20, mixup=False, subset=True)
    runs += [RunConfig("finetune", 384, 6e-4, 0, init_from=base, **finetune) for base in (hot, calm)]
    runs += [RunConfig("finetune", 384, 6e-4, 0, init_from=hot, clip=1.0, **finetune)]
    # 6. Does the saturated regime end in a spike or NaN when it lasts longer? (4x the steps, width 192: cheap)
    runs += [RunConfig("long", 192, 2e-2, 0, steps=1200, warmup=120)]
    # 7. Margin of the calm proxy setting: a third seed, and 3x its lr with clipping.
    runs += [RunConfig("margin", 384, 5e-4, 2, clip=1.0), RunConfig("margin", 384, 1.5e-3, 0, clip=1.0)]
    return runs


# -- training ----------------------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    # timm's Mixup draws from numpy and `random`, the model init and data order from torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(net: torch.nn.Module, cfg: RunConfig) -> tuple[torch.optim.Optimizer, SequentialLR]:
    """`ClassifierModule.configure_optimizers`, with steps instead of epochs."""
    optimizer = create_optimizer_v2(net, opt="adamw", lr=cfg.lr, weight_decay=0.05)
    after = CosineAnnealingLR(optimizer, T_max=max(1, cfg.steps - cfg.warmup), eta_min=cfg.lr * 0.01)
    start = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=cfg.warmup)
    return optimizer, SequentialLR(optimizer, [start, after], milestones=[cfg.warmup])


class AttentionProbe:
    """Records q and k after their (optional) norm in every block, through hooks on `q_norm` / `k_norm`.

    Those modules are `nn.Identity` without qk_norm, and hooks fire on them too, so the same code measures
    both architectures without re-implementing timm's attention.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.blocks = list(net.blocks)
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.enabled = False
        for i, block in enumerate(self.blocks):
            block.attn.q_norm.register_forward_hook(self._keep(self.q, i))
            block.attn.k_norm.register_forward_hook(self._keep(self.k, i))

    def _keep(self, store: dict[int, torch.Tensor], index: int):
        def hook(module, inputs, output):
            if self.enabled:
                store[index] = output.detach().float()

        return hook

    @torch.no_grad()
    def measure(self, net: torch.nn.Module, inputs: torch.Tensor) -> dict:
        """Largest attention logit per block, lowest mean attention entropy, largest |output logit|."""
        was_training = net.training
        net.eval()
        self.enabled = True
        try:
            logits = net(inputs)
        finally:
            self.enabled = False
            net.train(was_training)
        attn_max, entropy_min = [], math.inf
        for i, block in enumerate(self.blocks):
            scores = self.q[i] @ self.k[i].transpose(-2, -1) * block.attn.scale  # (B, heads, N, N)
            attn_max.append(scores.max().item())
            probs = scores.softmax(-1)
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean((0, 2))  # per head
            entropy_min = min(entropy_min, entropy.min().item())
        param_norm = torch.sqrt(sum(p.detach().float().pow(2).sum() for p in net.parameters())).item()
        return {
            "attn_max": attn_max,
            "entropy_min": entropy_min,
            "out_logit_max": logits.abs().max().item(),
            "param_norm": param_norm,
        }


def load_data() -> dict[str, torch.Tensor]:
    splits = make_synthetic(train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS, seed=0)
    in_subset = torch.tensor([s in SUBSET_SUPERCLASSES for s in splits.class_to_superclass])
    return {
        "train_images": splits.train_images,
        "train_labels": splits.train_labels,
        "test_images": splits.test_images,
        "test_labels": splits.test_labels,
        "in_subset": in_subset,
    }


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """`ClassifierModule.preprocess`: uint8 -> CIFAR-normalised float."""
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def train(cfg: RunConfig, data: dict[str, torch.Tensor], cache: Path) -> dict:
    seed_all(cfg.seed)
    net = timm.create_model(MODELS[cfg.width], num_classes=100, depth=DEPTH, drop_path_rate=0.1, qk_norm=cfg.qk_norm)
    if cfg.init_from:
        net.load_state_dict(torch.load(cache / f"{safe(cfg.init_from)}.pt", weights_only=True))
    probe = AttentionProbe(net)
    optimizer, scheduler = build_optimizer(net, cfg)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=100) if cfg.mixup else None
    soft_loss = SoftTargetCrossEntropy()
    images, labels = data["train_images"], data["train_labels"]
    if cfg.subset:
        keep = data["in_subset"][labels]
        images, labels = images[keep], labels[keep]
    probe_inputs = preprocess(data["test_images"][:32])
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(labels), generator=gen)
    cursor = 0
    log: dict[str, list] = {"loss": [], "grad_norm": [], "lr": [], "probe_step": [], "probes": []}
    nonfinite_step = None
    snapshot = None
    start = time.perf_counter()
    net.train()
    for step in range(cfg.steps):
        if step % PROBE_EVERY == 0:
            log["probe_step"].append(step)
            log["probes"].append(probe.measure(net, probe_inputs))
        if cursor + cfg.batch > len(order):  # a new epoch: reshuffle
            order, cursor = torch.randperm(len(labels), generator=gen), 0
        idx = order[cursor : cursor + cfg.batch]
        cursor += cfg.batch
        inputs, targets = preprocess(random_crop_flip(images[idx], generator=gen)), labels[idx]
        if mixup is not None:
            inputs, targets = mixup(inputs, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits = net(inputs)
        logits = logits.float()
        if targets.ndim == 2:
            loss = soft_loss(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # clip_grad_norm_ with an infinite bound only measures the norm, so both cases log the same thing
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip or math.inf).item()
        log["loss"].append(loss.item())
        log["grad_norm"].append(grad_norm)
        log["lr"].append(optimizer.param_groups[0]["lr"])
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
            nonfinite_step = step  # the next optimizer step would write NaN/inf into the weights
            break
        optimizer.step()
        scheduler.step()
        if cfg.snapshot_step is not None and step + 1 == cfg.snapshot_step:
            snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    if nonfinite_step is None:
        log["probe_step"].append(cfg.steps)
        log["probes"].append(probe.measure(net, probe_inputs))
    if snapshot is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(snapshot, cache / f"{safe(cfg.name)}.pt")
    result = {"config": asdict(cfg), "seconds": round(time.perf_counter() - start, 1), "log": compact(log)}
    result["summary"] = summarize(log, nonfinite_step, evaluate(net, data, cfg) if nonfinite_step is None else None)
    return result


@torch.no_grad()
def evaluate(net: torch.nn.Module, data: dict[str, torch.Tensor], cfg: RunConfig) -> float:
    """Top-1 accuracy on the stand-in test images (of the subset's classes for subset runs)."""
    net.eval()
    images, labels = data["test_images"], data["test_labels"]
    if cfg.subset:
        keep = data["in_subset"][labels]
        images, labels = images[keep], labels[keep]
    predictions = torch.cat([net(preprocess(images[i : i + 250])).argmax(-1) for i in range(0, len(labels), 250)])
    return (predictions == labels).float().mean().item()


def summarize(log: dict[str, list], nonfinite_step: int | None, accuracy: float | None) -> dict:
    """Stable or not, and when: the first non-finite step, or the first loss spike of SPIKE_NATS nats."""
    losses = [x for x in log["loss"] if math.isfinite(x)]
    smooth, best, spike_step = None, math.inf, None
    for step, loss in enumerate(losses):
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss  # ~10-step average: Mixup losses are noisy
        if step >= 20 and smooth > best + SPIKE_NATS and spike_step is None:
            spike_step = step
        best = min(best, smooth) if step >= 10 else best
    probes = log["probes"]
    attn_max = [max(p["attn_max"]) for p in probes]
    final_loss = sum(losses[-50:]) / len(losses[-50:]) if nonfinite_step is None else None
    return {
        "nonfinite_step": nonfinite_step,
        "spike_step": spike_step,
        "diverged": nonfinite_step is not None or spike_step is not None,
        "final_loss": final_loss,
        "min_smoothed_loss": best,
        "max_attn_logit": max(attn_max),
        "last_attn_logit": attn_max[-1],
        "max_out_logit": max(p["out_logit_max"] for p in probes),
        "min_entropy": min(p["entropy_min"] for p in probes),
        "max_grad_norm": max(log["grad_norm"]),
        "test_acc": accuracy,
    }


def compact(log: dict[str, list]) -> dict[str, list]:
    """4 significant digits: the JSON stays small and is still plenty for plots."""

    def r(x):
        if isinstance(x, dict):
            return {k: r(v) for k, v in x.items()}
        if isinstance(x, list):
            return [r(v) for v in x]
        return float(f"{x:.4g}") if isinstance(x, float) and math.isfinite(x) else x

    return {k: r(v) for k, v in log.items()}


def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# -- results -----------------------------------------------------------------------------------------------


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"meta": {}, "runs": {}}


def save_results(results: dict) -> None:
    # json writes NaN / Infinity for non-finite floats; keep that (the non-finite step is the point here)
    write_json(RESULTS, results, indent=1)


def run_plan(runs: list[RunConfig], cache: Path) -> dict:
    results = load_results()
    results["meta"] = {
        "data": f"synthetic STAND-IN (not CIFAR-100): {TRAIN_PER_CLASS} train / {TEST_PER_CLASS} test per class",
        "models": {str(w): f"{m} with depth={DEPTH} (16 tokens)" for w, m in MODELS.items()},
        "probe": f"every {PROBE_EVERY} steps on 32 fixed test images, eval mode",
        "spike_nats": SPIKE_NATS,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
    }
    data = load_data()
    by_name = {cfg.name: cfg for cfg in runs}
    for cfg in runs:
        done = results["runs"].get(cfg.name)
        if done and done["config"] == asdict(cfg):
            continue
        if cfg.init_from and not (cache / f"{safe(cfg.init_from)}.pt").exists():
            print(f"re-training {cfg.init_from} for its snapshot", flush=True)
            train(by_name[cfg.init_from], data, cache)
        result = train(cfg, data, cache)
        results["runs"][cfg.name] = result
        save_results(results)
        s = result["summary"]
        print(
            f"{cfg.name:60s} {result['seconds']:6.0f}s nonfinite={s['nonfinite_step']} spike={s['spike_step']} "
            f"loss={s['final_loss'] and round(s['final_loss'], 3)} attn={s['max_attn_logit']:.1f} "
            f"out={s['max_out_logit']:.1f} acc={s['test_acc']}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", help="comma-separated groups to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the planned runs and exit")
    parser.add_argument("--plot", action="store_true", help="only redraw the plots and print the table")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/askexpert_divergence"), help="weight snapshots")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the machine is shared (set OMP_NUM_THREADS=1 too, before start)
    runs = plan()
    if args.groups:
        wanted = set(args.groups.split(","))
        sources = {r.init_from for r in runs if r.group in wanted and r.init_from}
        runs = [r for r in runs if r.group in wanted or r.name in sources]
    if args.list:
        for cfg in runs:
            print(cfg.name)
        return
    results = load_results() if args.plot else run_plan(runs, args.cache)
    plot(results)
    print(table(results))


# -- report ----------------------------------------------------------------------------------------------


def status(summary: dict) -> str:
    """What the table says about a run: non-finite, spike, or stable (the attention columns say how hot)."""
    if summary["nonfinite_step"] is not None:
        return f"NaN at step {summary['nonfinite_step']}"
    if summary["spike_step"] is not None:
        return f"loss spike at step {summary['spike_step']}"
    return "finite, no spike"


def table(results: dict) -> str:
    """One markdown row per run, grouped as in `plan()` (the table of docs/divergence.md)."""
    head = "| group | width | lr | prec. | clip | warm-up | other | seed | outcome | max attn logit | min entropy "
    head += "| max out logit | final loss | stand-in acc |\n" + "|---" * 14 + "|"
    rows = [head]
    order = {cfg.name: i for i, cfg in enumerate(plan())}  # plan order; runs no longer planned go last
    for _, run in sorted(results["runs"].items(), key=lambda item: order.get(item[0], len(order))):
        c, s = run["config"], run["summary"]
        other = ", ".join(
            x
            for x, on in (
                ("qk_norm", c["qk_norm"]),
                ("no Mixup", not c["mixup"]),
                ("25-class subset", c["subset"]),
                (f"batch {c['batch']}", c["batch"] != 32),
                (f"{c['steps']} steps", c["steps"] != 300),
                (f"from {c['init_from']}", c["init_from"]),
            )
            if on
        )
        final = "-" if s["final_loss"] is None else f"{s['final_loss']:.3f}"
        acc = "-" if s["test_acc"] is None else f"{100 * s['test_acc']:.1f} %"
        rows.append(
            f"| {c['group']} | {c['width']} | {c['lr']:g} | {c['precision']} | {c['clip'] or '-'} | {c['warmup']} "
            f"| {other} | {c['seed']} | {status(s)} | {s['max_attn_logit']:.0f} | {s['min_entropy']:.3f} "
            f"| {s['max_out_logit']:.1f} | {final} | {acc} |"
        )
    return "\n".join(rows)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    sweep = [r for r in runs.values() if r["config"]["group"] == "lr_sweep"]
    if not sweep:
        return
    colours = {192: "C0", 384: "C3"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for width in colours:
        mine = [r for r in sweep if r["config"]["width"] == width]
        lrs = np.array([r["config"]["lr"] for r in mine])
        attn = np.array([r["summary"]["last_attn_logit"] for r in mine])
        entropy = np.array([r["summary"]["min_entropy"] for r in mine])
        label = f"width {width}"
        axes[0].scatter(lrs, attn, color=colours[width], s=14, label=label)
        axes[1].scatter(lrs * width / 192, attn, color=colours[width], s=14, label=label)
        axes[2].scatter(lrs, entropy, color=colours[width], s=14, label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="peak lr", title="max attention logit after 300 steps")
    axes[1].set(xscale="log", yscale="log", xlabel="peak lr x width / 192", title="... against lr x width")
    axes[2].set(xscale="log", yscale="log", xlabel="peak lr", title="lowest head attention entropy (nats)")
    axes[2].axhline(math.log(16), color="grey", lw=0.6, ls=":")  # uniform attention over 16 tokens
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("Reduced ViTs (depth 4, 16 tokens) on the synthetic stand-in, fp32, no clipping", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "divergence_lr_sweep.png", dpi=80)
    plt.close(fig)

    # Trajectories: the medium width at a hot lr with each fix, and the experts' fine-tuning case.
    panels = {
        "width 384, lr 3e-3 / 1e-2: fixes": lambda c: (
            c["width"] == 384
            and c["seed"] == 0
            and c["lr"] in (3e-3, 1e-2)
            and c["group"] in ("lr_sweep", "clip", "qk_norm")
        ),
        "width 192, lr 6e-3 / 2e-2: fixes": lambda c: (
            c["width"] == 192
            and c["seed"] == 0
            and c["lr"] in (6e-3, 2e-2)
            and c["group"] in ("lr_sweep", "clip", "qk_norm", "warmup")
        ),
        "fine-tuning at 6e-4 (fresh AdamW)": lambda c: c["group"] == "finetune",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.4))
    for ax, (title, wanted) in zip(axes, panels.items(), strict=True):
        for i, run in enumerate(r for r in runs.values() if wanted(r["config"])):
            c = run["config"]
            label = f"lr {c['lr']:g}" + (" clip 1" if c["clip"] else "") + (" qk_norm" if c["qk_norm"] else "")
            label += f" warm-up {c['warmup']}" if c["group"] == "warmup" else ""
            label += " from hot base" if "0.003" in (c["init_from"] or "") else ""
            label += " from calm base" if "0.0005" in (c["init_from"] or "") else ""
            attn = [max(p["attn_max"]) for p in run["log"]["probes"]]
            ax.plot(run["log"]["probe_step"], attn, color=f"C{i}", lw=1.2, label=label)
        ax.set(yscale="log", xlabel="step", title=title)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("max attention logit")
    fig.tight_layout()
    fig.savefig(DOCS / "divergence_fixes.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
