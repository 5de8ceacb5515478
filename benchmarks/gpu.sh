#!/usr/bin/env bash
# The whole benchmark set on one GPU, in at most 8 minutes: training-step throughput/memory/MFU
# (benchmarks/train_step.py) and class-prior generation (benchmarks/priors.py), SD 1.5-size random
# components at 512 px. The printed tables go to $OUT/results.txt, the figures to $OUT/*.json.
#
#   OUT=/tmp/bench bash benchmarks/gpu.sh        # OUT defaults to benchmarks/out
#
# Expects torch (CUDA), diffusers, transformers, pytorch-lightning, peft, wandb and open_clip importable;
# bitsandbytes for the full_16gb row (skipped, and said so, without it). A bare GPU machine lacks
# several of these: when a .whl/ folder of wheels travelled with the tree, the first step installs them
# offline into /tmp/site. Run from the repository root.
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"
export HF_HUB_OFFLINE=1  # random-initialised models only: nothing to fetch

if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$RESULTS"
else
    echo "nvidia-smi not found: no NVIDIA GPU visible" | tee -a "$RESULTS"
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available())" | tee -a "$RESULTS"
echo | tee -a "$RESULTS"

start=$SECONDS
# One random-initialised SD 1.5-size model for both benchmarks (building it takes about a minute).
MODEL_DIR=$(mktemp -d /tmp/bench-sd15.XXXXXX)
trap 'rm -rf "$MODEL_DIR"' EXIT
"$PY" -c "import sys; sys.path.insert(0, '.'); from dreambooth_pl import tiny; tiny.build_random('sd15', sys.argv[1])" \
    "$MODEL_DIR/sd15"
echo "built the sd15 model in $((SECONDS - start)) s" | tee -a "$RESULTS"

# Budgets keep the set under 8 minutes: train_step starts no configuration after --budget-s (the
# important ones run first and the skipped ones are listed); `timeout` is the hard stop (exit 124).
# train_step's rows are experiments/base.yaml + subjects/can.yaml + a memory preset and overrides, with
# --model.pretrained set to --model: see ROWS in benchmarks/train_step.py.
timeout "${TRAIN_STEP_TIMEOUT_S:-300}" "$PY" benchmarks/train_step.py --arch sd15 --model "$MODEL_DIR/sd15" \
    --resolution 512 --steps 20 --budget-s "${TRAIN_STEP_BUDGET_S:-220}" --json "$OUT/train_step.json" | tee -a "$RESULTS"
echo | tee -a "$RESULTS"
timeout "${PRIORS_TIMEOUT_S:-100}" "$PY" benchmarks/priors.py --arch sd15 --model "$MODEL_DIR/sd15" --num-images 64 \
    --resolution 512 --json "$OUT/priors.json" | tee -a "$RESULTS"
echo | tee -a "$RESULTS"
echo "benchmark set took $((SECONDS - start)) s" | tee -a "$RESULTS"
