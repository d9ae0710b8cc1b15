"""Bad inputs tried as a user would, beyond the tests: each must end in one `askexpert: error:` line, a non-zero
exit and no traceback.

    python experiments/bad_inputs_probe.py runs/demo     # a finished demo run; about 4 min on 2 CPU cores

Each case runs `python -m askexpert ...` in its own process from the repository root; scratch files go to a
temporary folder. Prints one line per case and the counts (issue 13's note quotes them).
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = os.path.abspath(sys.argv[1])
PY = sys.executable
T = tempfile.mkdtemp(prefix="askexpert-probe-")
os.makedirs(T, exist_ok=True)
open(f"{T}/empty.yaml", "w").close()
open(f"{T}/bad.yaml", "w").write("trainer: [unclosed\n")
open(f"{T}/list.yaml", "w").write("- 1\n- 2\n")
zipfile.ZipFile(f"{T}/empty.zip", "w").close()
os.makedirs(f"{T}/imgs", exist_ok=True)
open(f"{T}/imgs/x.png", "wb").write(b"not a png")
os.makedirs(f"{T}/emptydir", exist_ok=True)
open(f"{T}/garbage.ckpt", "wb").write(os.urandom(3000))
gen = f"{RUN}/generalist"
exp = f"{RUN}/experts/progressive/0/checkpoints/best.ckpt"
M = [
    "--model.model_name",
    "vit_micro_patch8_32",
    "--data.source",
    "synthetic",
    "--data.synthetic_train_per_class",
    "5",
    "--data.synthetic_test_per_class",
    "2",
    "--trainer.max_epochs",
    "1",
    "--trainer.default_root_dir",
    f"{T}/fitrun",
]
# Not a bad input: `test --config RUN/generalist/config.yaml --ckpt_path EXPERT.ckpt` tests the ExpertModule the
# checkpoint names (LightningCLI builds the checkpoint's class) and says so in its accuracy line.
cases = {
    "unknown source": ["fit", *M, "--data.source", "nosuch"],
    "unknown model": ["fit", *M, "--model.model_name", "nosuch"],
    "batch 0": ["fit", *M, "--data.batch_size", "0"],
    "val_fraction 1.5": ["fit", *M, "--data.val_fraction", "1.5"],
    "calib_fraction too big": ["fit", *M, "--data.calib_fraction", "0.95"],
    "image_size 0": ["fit", *M, "--data.image_size", "0"],
    "max_epochs -5": ["fit", *M, "--trainer.max_epochs", "-5"],
    "root dir unwritable (/proc)": ["fit", *M, "--trainer.default_root_dir", "/proc/askexpert"],
    "root dir is a file": ["fit", *M, "--trainer.default_root_dir", "/etc/hostname"],
    "ckpt missing": ["fit", *M, "--ckpt_path", "/nonexistent.ckpt"],
    "ckpt is text": ["fit", *M, "--ckpt_path", str(REPO / "README.md")],
    "ckpt empty zip": ["fit", *M, "--ckpt_path", f"{T}/empty.zip"],
    "ckpt random bytes": ["fit", *M, "--ckpt_path", f"{T}/garbage.ckpt"],
    "config empty": ["fit", "--config", f"{T}/empty.yaml", *M],
    "config invalid yaml": ["fit", "--config", f"{T}/bad.yaml", *M],
    "config a list": ["fit", "--config", f"{T}/list.yaml", *M],
    "config missing": ["fit", "--config", f"{T}/nope.yaml", *M],
    "cifar root is a file": ["fit", *M, "--data.source", "cifar100", "--data.root", "/etc/hostname"],
    "imagefolder empty": ["fit", *M, "--data.source", "imagefolder", "--data.root", f"{T}/emptydir"],
    "predict: output is a folder": [
        "predict",
        "--config",
        f"{gen}/config.yaml",
        "--ckpt_path",
        f"{gen}/checkpoints/best.ckpt",
        "--prediction_writer.output",
        "/tmp",
    ],
    "predict: output unwritable": [
        "predict",
        "--config",
        f"{gen}/config.yaml",
        "--ckpt_path",
        f"{gen}/checkpoints/best.ckpt",
        "--prediction_writer.output",
        "/proc/x.csv",
    ],
    "partition: 0 experts": ["partition", "--method", "superclass", "--num_experts", "0", "--out", f"{T}/p.json"],
    "partition: 1000 experts": ["partition", "--method", "superclass", "--num_experts", "1000", "--out", f"{T}/p.json"],
    "partition: confusion from expert": [
        "partition",
        "--method",
        "confusion",
        "--num_experts",
        "4",
        "--generalist",
        exp,
        "--out",
        f"{T}/p.json",
    ],
    "partition: class 500": ["partition", "--method", "explicit", "--experts", "[[0, 500]]", "--out", f"{T}/p.json"],
    "partition: out is a folder": ["partition", "--method", "superclass", "--num_experts", "4", "--out", "/tmp"],
    "pipeline: config missing": ["pipeline", "--config", f"{T}/nope.yaml", "--out", f"{T}/pipe"],
    "pipeline: config is README": ["pipeline", "--config", str(REPO / "README.md"), "--out", f"{T}/pipe"],
    "pipeline: out /dev/null": ["pipeline", "--config", "configs/pipeline/demo.yaml", "--out", "/dev/null"],
    "evaluate: run missing": ["evaluate", "--run", f"{T}/nope"],
    "evaluate: run is a file": ["evaluate", "--run", str(REPO / "README.md")],
    "evaluate: top_k 0": ["evaluate", "--run", RUN, "--out", f"{T}/ev", "--routing.top_k", "0"],
    "evaluate: gate unknown": ["evaluate", "--run", RUN, "--out", f"{T}/ev", "--routing.gate", "nosuch"],
    "evaluate: profile missing": ["evaluate", "--run", RUN, "--out", f"{T}/ev", "--profile", "nosuch.yaml"],
    "evaluate: profile is README": ["evaluate", "--run", RUN, "--out", f"{T}/ev", "--profile", str(REPO / "README.md")],
    "evaluate: budget 2": ["evaluate", "--run", RUN, "--out", f"{T}/ev", "--routing.budget.offload_ratio", "2"],
    "evaluate: out unwritable": ["evaluate", "--run", RUN, "--out", "/proc/ev"],
    "route: images missing": ["route", "--run", RUN, "--images", f"{T}/nope", "--out", f"{T}/r.csv"],
    "route: broken image": ["route", "--run", RUN, "--images", f"{T}/imgs", "--out", f"{T}/r.csv"],
    "route: out is a folder": ["route", "--run", RUN, "--images", f"{T}/imgs", "--out", "/tmp"],
    "ablate: config missing": ["ablate", "--config", f"{T}/nope.yaml", "--out", f"{T}/abl"],
    "experts: partition missing": ["experts", "--partition", f"{T}/nope.json", "--root", f"{T}/ex"],
    "profile: role unknown": ["profile", "--role", "nosuch"],
    "unknown command": ["nosuch"],
}
bad = 0
for name, args in cases.items():
    p = subprocess.run([PY, "-m", "askexpert", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("askexpert: error:")]
    ok = p.returncode != 0 and "Traceback" not in p.stderr and len(errors) == 1
    bad += not ok
    shown = errors[0][:200] if errors else (lines[-1][:300] if lines else "")
    print(f"{'ok ' if ok else 'BAD'} {name}: rc={p.returncode} {shown}", flush=True)
print(f"{len(cases)} tried, {len(cases) - bad} clean, {bad} not")
