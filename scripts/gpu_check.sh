#!/usr/bin/env bash
# scripts/gpu_check.sh OUT: every CUDA path of tinydistil in one command, on a machine with one GPU
# and nothing reachable (at most 8 minutes); writes OUT/summary.json and OUT/gpu_check.log.
#
#   python scripts/make_gpu_bundle.py --data-dir DIR   # first, here: gpu_bundle/ (MiniLM, WikiText-2)
#   bash scripts/gpu_check.sh OUT                      # on the GPU machine, gpu_bundle/ carried along
#   DEVICE=cpu bash scripts/gpu_check.sh OUT           # the same steps on the CPU, tiny (.ci/run)
#   ONLY=pretrain,eval bash scripts/gpu_check.sh OUT   # some paths again
#
# What runs, and what each figure means: scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
  echo "usage: [DEVICE=cpu] bash scripts/gpu_check.sh OUT" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TINYDISTIL_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py --out "$1" --device "${DEVICE:-cuda}" ${ONLY:+--only "$ONLY"}
