#!/usr/bin/env bash
# The whole GPU benchmark in one go (about 7 minutes on one H100 without the pipeline), for a lent GPU machine
# that has torch, timm, lightning and torchmetrics but not jsonargparse / omegaconf / wandb: copy the checked
# wheels into .whl/ first (see ../shared/device-wheels/README.md), then run from the repository root:
#     bash benchmarks/gpu_check.sh              # throughput, per-step overhead + syncs, inference, sweep, checkpoints
#     bash benchmarks/gpu_check.sh pipeline     # the same, then the stand-in pipeline (its own time on top)
# Results: benchmarks/results/*cuda*.json, copied to $OUT.
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --find-links .whl --target /tmp/site "jsonargparse[signatures]" omegaconf wandb
    export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=offline PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# edge + medium at batch 512: bare vs full step; then the per-step overhead of the edge model at 512 (bare, full,
# the CLI's Trainer as users run it) and CUDA syncs per step (torch.cuda.set_sync_debug_mode("warn"); want 0)
python3 benchmarks/train_throughput.py --device cuda
# the edge generalist at its configured batch (configs/generalist_cifar100.yaml: 256)
python3 benchmarks/train_throughput.py --device cuda --models vit_edge_patch4_32 --batch 256 --no-overhead \
    --out benchmarks/results/train_throughput_cuda_edge_b256.json
python3 benchmarks/train_throughput.py --device cuda --models vit_medium_patch4_32 --compile --no-overhead \
    --out benchmarks/results/train_throughput_cuda_compiled.json
python3 benchmarks/inference.py --device cuda
python3 benchmarks/sweep_speed.py --out benchmarks/results/sweep_cuda.json
python3 benchmarks/checkpoint_write.py --device cuda --repeats 3
if [ "${1:-}" = pipeline ]; then
    python3 benchmarks/pipeline_overhead.py --config "${PIPELINE_CONFIG:-configs/pipeline/standin_full.yaml}" --device cuda
fi
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json "$OUT"/; fi
