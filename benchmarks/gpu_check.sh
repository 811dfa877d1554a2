#!/usr/bin/env bash
# The device check: run on a CUDA machine from a checkout (no downloads; PYTHON=python3 without .venv).
# Needs torch, transformers, accelerate, typer and rich (no Ray), and the bundled model's config and
# tokenizer files in $DIRECTER_CACHE/models/smollm2-135m/ (BENCHMARKS.md names them); where its weights
# are not there, the bundled model is skipped and the random model still runs.
# Prints JSON lines: CUDA against CPU fp32 token agreement (bf16 and fp32) for the bundled model and
# the 1.7B random model with peak allocated memory beside the memory plan, then `directer bench` on
# CUDA with the 1.7B random model, continuous batching against static batches (its rows ended at a drawn 3%
# of the vocabulary, as a random model never ends), and the plan of a batch of 1,024-token prompts on this GPU.
# Record the figures in BENCHMARKS.md, beside the GPU bench commands.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=.
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PYTHON" benchmarks/gpu_check.py --device cuda "$@"
"$PYTHON" -m jobs.cli bench --device cuda --model smollm2-1.7b-random --prompts 32 --max-new-tokens 64 \
    --batch-sizes 1,32 --no-pipeline --json
PYTHONPATH=benchmarks:. "$PYTHON" benchmarks/continuous.py --device cuda --model smollm2-1.7b-random --prompts 64 \
    --batch-size 32 --max-new-tokens 64 --end-share 0.03
"$PYTHON" -m jobs.cli plan --device cuda --model smollm2-1.7b-random --prompt-tokens 1024 --max-new-tokens 256 --json
