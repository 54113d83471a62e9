#!/usr/bin/env bash
# mpc_dist acceptance on 2 to 8 GPUs of one node, from any directory:
#   bash scripts/gpu/accept_multi_gpu.sh        # PY=... for another interpreter, OUT=... for the runs
# The doctor under torchrun on every GPU; NCCL pipelines P = 2 and 4 (4 needs 4 GPUs), sync and
# async, equal to one process in float64; D = 2 replicas sharded with FSDP2 (P = 2 x D = 2 with
# 4 GPUs, else P = 1) equal to one process; a Ray job (a GPU per worker) equal to the same
# torchrun run; the GPU bench where `mpc-dist bench` has --device. One line per step: PASS,
# FAIL or SKIP (too few GPUs); the exit code is 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/mpc-dist-accept-multi.XXXXXX")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fail=0

gpus=$("${PY}" -c "import torch; print(torch.cuda.device_count())")
if [ "${gpus}" -lt 2 ]; then
  echo "FAIL: gpus: ${gpus} CUDA device(s) visible; this script needs 2 to 8 (one GPU: accept_1gpu.sh)"
  exit 1
fi

step() {  # step SECONDS NAME...: run acceptance steps under a time limit
  local limit=$1
  shift
  timeout "${limit}" "${PY}" scripts/gpu/acceptance.py "$@" --device cuda --out "${OUT}"
  local rc=$?
  if [ "${rc}" -eq 124 ]; then echo "FAIL: $*: still running after ${limit} s"; fi
  if [ "${rc}" -ne 0 ]; then fail=1; fi
}

step 180 doctor-job
step 240 pipeline-2-sync
step 240 pipeline-2-async
step 300 pipeline-4-sync
step 300 pipeline-4-async
step 300 fsdp-replicas
step 600 ray
step 1800 gpu-bench
echo "runs and logs: ${OUT}"
exit "${fail}"
