"""Bad inputs tried as a user would, beyond the tests: each must end in one `askexpert: error:` line, a non-zero
exit and no traceback.

    python experiments/bad_inputs_probe.py runs/demo     # a finished demo run; about 13 min on 2 CPU cores

Each case runs `python -m askexpert ...` in its own process from the repository root; scratch files go to a
temporary folder. Prints one line per case and the counts (issue 13's note quotes them).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

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
PREDICT = ["predict", "--config", f"{gen}/config.yaml", "--ckpt_path", f"{gen}/checkpoints/best.ckpt"]
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
    "predict: output is a folder": [*PREDICT, "--prediction_writer.output", "/tmp"],
    "predict: output unwritable": [*PREDICT, "--prediction_writer.output", "/proc/x.csv"],
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

DEMO = (REPO / "configs/pipeline/demo.yaml").read_text()


def copy_run(name):
    dst = f"{T}/{name}"
    shutil.copytree(RUN, dst, symlinks=True)
    return dst


def write(path, text):
    open(path, "w").write(text)
    return path


prof = (REPO / "configs/profiles/pi4_wifi_orin.yaml").read_text()
neg = write(f"{T}/neg.yaml", prof.replace("gflops: 10.0", "gflops: -10.0"))
zero = write(f"{T}/zero.yaml", prof.replace("uplink_mbps: 25.0", "uplink_mbps: 0"))
nolink = write(f"{T}/nolink.yaml", prof.split("link:")[0])
strk = write(f"{T}/str.yaml", prof.replace("rtt_ms: 3.7", "rtt_ms: fast"))
nanp = write(f"{T}/nan.yaml", prof.replace("rtt_ms: 3.7", "rtt_ms: .nan"))
saved = json.load(open(f"{RUN}/partition.json"))


def part(name, change):
    q = json.loads(json.dumps(saved))
    change(q)
    return write(f"{T}/{name}.json", json.dumps(q))


p_str = part("strclasses", lambda q: q["experts"][0].__setitem__("classes", ["a", "b"]))
p_neg = part("negclass", lambda q: q["experts"][0]["classes"].__setitem__(0, -1))
p_empty = part("noexperts", lambda q: q.__setitem__("experts", []))
p_ver = part("version", lambda q: q.__setitem__("format_version", 99))
p_dup = part("dup", lambda q: q["experts"][0]["classes"].append(q["experts"][0]["classes"][0]))
p_float = part("float", lambda q: q["experts"][0]["classes"].__setitem__(0, 1.5))
r_stages = copy_run("stages")
write(f"{r_stages}/stages.json", "{not json")
r_stages2 = copy_run("stages2")
write(f"{r_stages2}/stages.json", "[1, 2]")
r_part = copy_run("part")
write(f"{r_part}/partition.json", json.dumps({"experts": "x"}))
r_cache = copy_run("cache")
for f in os.listdir(f"{r_cache}/logits"):
    open(f"{r_cache}/logits/{f}", "wb").write(b"\x00" * 10)
r_prof = copy_run("prof")
for f in os.listdir(f"{r_prof}/profile"):
    write(f"{r_prof}/profile/{f}", "name: [")
r_noexp = copy_run("noexp")
shutil.rmtree(f"{r_noexp}/experts/progressive/1")
r_ro = copy_run("ro")
os.makedirs(f"{T}/imgs2", exist_ok=True)
Image.new("RGB", (5000, 3), (1, 2, 3)).save(f"{T}/imgs2/wide.png")
Image.new("L", (40, 40), 7).save(f"{T}/imgs2/gray.png")
Image.new("RGBA", (40, 40), (1, 2, 3, 4)).save(f"{T}/imgs2/rgba.png")
pipe_unknown = write(f"{T}/pipe_unknown.yaml", DEMO + "\nnot_a_key: 1\n")
pipe_stage = write(
    f"{T}/pipe_stage.yaml",
    DEMO.replace("configs/trainer/cpu.yaml, configs/model/generalist_edge_p8.yaml", "configs/trainer/nope.yaml"),
)
pipe_spec = write(f"{T}/pipe_spec.yaml", DEMO.replace("specialization: progressive", "specialization: nosuch"))
cases |= {
    "evaluate: negative gflops": ["evaluate", "--run", RUN, "--out", f"{T}/e1", "--profile", neg],
    "evaluate: zero uplink": ["evaluate", "--run", RUN, "--out", f"{T}/e2", "--profile", zero],
    "evaluate: profile without link": ["evaluate", "--run", RUN, "--out", f"{T}/e3", "--profile", nolink],
    "evaluate: rtt a string": ["evaluate", "--run", RUN, "--out", f"{T}/e4", "--profile", strk],
    "evaluate: rtt NaN": ["evaluate", "--run", RUN, "--out", f"{T}/e5", "--profile", nanp],
    "evaluate: stages.json not JSON": ["evaluate", "--run", r_stages],
    "evaluate: stages.json a list": ["evaluate", "--run", r_stages2],
    "evaluate: partition.json wrong shape": ["evaluate", "--run", r_part],
    "evaluate: run's profile damaged": ["evaluate", "--run", r_prof],
    "evaluate: an expert folder deleted": ["evaluate", "--run", r_noexp],
    "experts: class names strings": [
        "experts",
        "--partition",
        p_str,
        "--root",
        f"{T}/x1",
        "--",
        "--model.model_name",
        "vit_micro_patch8_32",
    ],
    "experts: negative class": ["experts", "--partition", p_neg, "--root", f"{T}/x2"],
    "experts: no experts": ["experts", "--partition", p_empty, "--root", f"{T}/x3"],
    "experts: future format": ["experts", "--partition", p_ver, "--root", f"{T}/x4"],
    "experts: duplicate class": ["experts", "--partition", p_dup, "--root", f"{T}/x5"],
    "experts: float class": ["experts", "--partition", p_float, "--root", f"{T}/x6"],
    "pipeline: unknown key": ["pipeline", "--config", pipe_unknown, "--out", f"{T}/p1"],
    "pipeline: stage config missing": ["pipeline", "--config", pipe_stage, "--out", f"{T}/p2"],
    "pipeline: unknown specialization": ["pipeline", "--config", pipe_spec, "--out", f"{T}/p3"],
    "ablate: out is a file": ["ablate", "--config", "configs/ablations/strategies.yaml", "--out", "/etc/hostname"],
    "route: threshold 2": ["route", "--run", RUN, "--images", f"{T}/imgs2", "--out", f"{T}/r.csv", "--threshold", "2"],
}
ok_cases = {
    "evaluate: cache files zeroed (recomputed)": ["evaluate", "--run", r_cache],
    "route: wide, gray and RGBA images": ["route", "--run", RUN, "--images", f"{T}/imgs2", "--out", f"{T}/r2.csv"],
}
bad = 0
for name, args in cases.items():
    p = subprocess.run([PY, "-m", "askexpert", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("askexpert: error:")]
    ok = p.returncode != 0 and "Traceback" not in p.stderr and len(errors) == 1
    bad += not ok
    shown = errors[0][:200] if errors else (lines[-1][:300] if lines else "")
    print(f"{'ok ' if ok else 'BAD'} {name}: rc={p.returncode} {shown}", flush=True)
unexpected = 0
for name, args in ok_cases.items():  # odd but valid: must succeed
    p = subprocess.run([PY, "-m", "askexpert", *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    unexpected += p.returncode != 0
    print(f"{'ok ' if p.returncode == 0 else 'BAD'} {name}: rc={p.returncode}", flush=True)
print(
    f"{len(cases)} bad inputs: {len(cases) - bad} clean, {bad} not; {len(ok_cases)} odd-but-valid: {unexpected} failed"
)
