#!/usr/bin/env bash
# The whole GPU benchmark in one go (about 5 minutes on one H100), for a lent GPU machine that has torch,
# timm, lightning and torchmetrics but not jsonargparse / omegaconf / wandb: copy the checked wheels into
# .whl/ first (see ../shared/device-wheels/README.md), then run from the repository root:
#     bash benchmarks/gpu_check.sh
# Results: benchmarks/results/{train_throughput,inference}_cuda.json (+ sweep_cuda.json), copied to $OUT.
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --find-links .whl --target /tmp/site "jsonargparse[signatures]" omegaconf wandb
    export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=offline PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/train_throughput.py --device cuda
python3 benchmarks/train_throughput.py --device cuda --models vit_medium_patch4_32 --compile \
    --out benchmarks/results/train_throughput_cuda_compiled.json
python3 benchmarks/inference.py --device cuda
python3 benchmarks/sweep_speed.py --out benchmarks/results/sweep_cuda.json
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json "$OUT"/; fi
