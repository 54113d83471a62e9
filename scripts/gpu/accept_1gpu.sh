#!/usr/bin/env bash
# mpc_dist acceptance on ONE GPU (written for an H100; at most 8 minutes), from any directory:
#   bash scripts/gpu/accept_1gpu.sh            # PY=... for another interpreter, OUT=... for the runs
# CUDA and the doctor; the fp16 loss factor on a busy GPU and an fp16 overflow; the CUDA RNG in
# checkpoints; the rules' noise drawn on the GPU; TF32; the runtime over a one-rank NCCL group
# (FSDP2 equal to unsharded, bf16, fp16, CUDA-event timing); ViT-B/16 in bf16 with activation
# checkpointing resumed from a checkpoint equal to a run straight through; and the refusals
# (two ranks on one GPU, gloo with CUDA tensors). One line per step: PASS, FAIL or SKIP; the
# exit code is 1 if a step failed. Multi-rank NCCL needs more GPUs: accept_multi_gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/mpc-dist-accept-1gpu.XXXXXX")}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fail=0

step() {  # step SECONDS NAME...: run acceptance steps under a time limit
  local limit=$1
  shift
  timeout "${limit}" "${PY}" scripts/gpu/acceptance.py "$@" --device cuda --out "${OUT}"
  local rc=$?
  if [ "${rc}" -eq 124 ]; then echo "FAIL: $*: still running after ${limit} s"; fi
  if [ "${rc}" -ne 0 ]; then fail=1; fi
}

step 120 env
step 90 loss-factor fp16-overflow rng noise tf32
step 150 runtime
step 240 vit-resume
step 240 refusals
echo "runs and logs: ${OUT}"
exit "${fail}"
