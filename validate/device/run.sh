#!/usr/bin/env bash
# On the GPU machine, from the repository root: install the carried wheels, then run one part of the
# validation suites into $OUT (or validate/results).  Each part stays within a 10-minute command:
#   bash validate/device/run.sh micro          the microbenchmarks (370 cases, mostly set-up time)
#   bash validate/device/run.sh e2e 1/3        a third of the end-to-end grid (2/3, 3/3 likewise)
#   bash validate/device/run.sh all            one command for a short lease: kernels and end-to-end cases
#                                              take turns, each grid spread over its range, until BUDGET_S
# Results are one JSON file per part; copy them into validate/results/ and commit them.  The run starts no
# case past BUDGET_S seconds (default 540, under the device tool's 600 s per command) and rewrites its file
# after every case, so a cut-off run still brings back what it measured.
set -euo pipefail
suite=${1:?usage: run.sh micro|e2e [I/N]}
shard=${2:-}
out=${OUT:-validate/results}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
args=(run --suite "$suite" --device cuda --scale gpu --out "$out" --budget-s "${BUDGET_S:-540}")
[ -n "$shard" ] && args+=(--shard "$shard")
python3 -m validate "${args[@]}"
