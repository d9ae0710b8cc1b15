#!/usr/bin/env bash
# The one device check, sized for a lent GPU machine (about 6 minutes on one H100, the install included):
#     bash benchmarks/gpu_check.sh
# The machine has torch, timm, lightning and torchmetrics but not jsonargparse / omegaconf / wandb: copy the
# checked wheels into the ignored folder .whl/ first and carry it (see ../shared/device-wheels/README.md).
# 1. training throughput of the two GPU models at the stand-in pipeline's batch (256): bare vs full step, the
#    edge model's per-step overhead and CUDA syncs per step (want 0);
# 2. configs/pipeline/standin_full.yaml, one seed: every stage timed against its bare compute (goal: wall / bare
#    <= 1.3), the headline table and the sanity findings; then its 4 progressive experts trained again side by
#    side (goal: <= 1.5x the time of one alone).
# 3. the fine-tuning input path's cost and syncs (benchmarks/augment_speed.py, ~20 s).
# 4. optional, when time allows: `bash benchmarks/gpu_check.sh --evidence SECONDS` then runs seed 0 of the evidence
#    grid on the GPU recipes (configs/ablations/evidence_gpu.yaml: 2 partitions x {progressive, static}) for at most
#    SECONDS. Its results.md/csv and every cell's report.json and cell.json go to $OUT as evidence_gpu.tgz; the
#    checkpoints stay on the lent machine, so a stopped grid resumes only on the same warm machine.
# JSON: benchmarks/results/{train_throughput,pipeline_overhead,augment_speed}_cuda.json (docs/performance.md and
# docs/results.md take their GPU rows from them). Whatever exists at the end, even after a failure (a diverged
# stage, say), is copied to $OUT: the JSON files, the run's report, stages.json and every stage's logs.
set -euo pipefail
start=$SECONDS
evidence_s=0
if [ "${1:-}" = "--evidence" ]; then
    evidence_s=${2:?"--evidence needs a number of seconds"}
    if ! [[ "$evidence_s" =~ ^[0-9]+$ ]]; then
        echo "gpu_check.sh: error: --evidence needs a whole number of seconds, got '$evidence_s'" >&2
        exit 2
    fi
elif [ -n "${1:-}" ]; then
    echo "gpu_check.sh: error: unknown option '$1' (usage: bash benchmarks/gpu_check.sh [--evidence SECONDS])" >&2
    exit 2
fi
collect() {
    echo "total: $((SECONDS - start)) s"
    if [ -n "${OUT:-}" ]; then
        cp benchmarks/results/*cuda*.json "$OUT"/ 2>/dev/null || true
        if [ -d runs/gpu_check ]; then
            (cd runs && find gpu_check gpu_check_side_by_side \( -name 'report.*' -o -name 'stages.json' \
                -o -name 'metrics.csv' -o -name 'fit.log' -o -name 'config.yaml' \) 2>/dev/null \
                | tar -czf "$OUT/gpu_check_run.tgz" -T -) || true
        fi
        if [ -d runs/ablations/evidence_gpu ]; then
            (cd runs/ablations && find evidence_gpu \( -name 'results.*' -o -name 'report.json' -o -name 'cell.json' \) \
                | tar -czf "$OUT/evidence_gpu.tgz" -T -) || true
        fi
    fi
}
trap collect EXIT
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --find-links .whl --target /tmp/site "jsonargparse[signatures]" omegaconf wandb
    export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=offline PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "install: $((SECONDS - start)) s"

python3 benchmarks/train_throughput.py --device cuda --batch 256 --steps 20 --warmup 5 --no-loader \
    --overhead-batch 256 --repeats 2
echo "throughput: $((SECONDS - start)) s"

# the fine-tuning input path (RandAugment / TrivialAugment per image, resize to 224, random erasing) as a share of a
# ViT-Tiny/16 step at 224 px, and its syncs per batch (torchvision's affine ops may copy to the device)
python3 benchmarks/augment_speed.py --device cuda --batch 128 --image-size 224
echo "augment: $((SECONDS - start)) s"

mkdir -p runs
rm -rf runs/gpu_check runs/gpu_check_side_by_side
python3 benchmarks/pipeline_overhead.py --config configs/pipeline/standin_full.yaml --device cuda \
    --side-by-side 4 --keep runs/gpu_check

if [ "$evidence_s" -gt 0 ]; then
    # seed 0 of the evidence grid on the GPU recipes; `timeout` ends it cleanly (the ablation resumes later)
    timeout --signal=TERM "$evidence_s" python3 -m askexpert ablate --config configs/ablations/evidence_gpu.yaml \
        --seeds '[0]' --out runs/ablations/evidence_gpu || echo "evidence: stopped after ${evidence_s} s (resumable on this machine)"
    echo "evidence: $((SECONDS - start)) s"
fi
