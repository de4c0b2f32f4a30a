#!/usr/bin/env bash
# Start a local Ray head, submit `onnxshard run` as a Ray job, print its logs, stop Ray.
# Usage: cluster/scripts/submit_local.sh PLAN_DIR IN.npz OUT.npz [extra onnxshard run flags]
set -euo pipefail
bin=$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
"$bin/ray" start --head --num-cpus "${NUM_CPUS:-4}" --disable-usage-stats >/dev/null
trap '"$bin/ray" stop >/dev/null 2>&1 || true' EXIT
plan=$(realpath "$1") inputs=$(realpath "$2") outputs=$(realpath -m "$3")
shift 3
"$bin/ray" job submit --address http://127.0.0.1:8265 -- \
    "$bin/onnxshard" run "$plan" --inputs "$inputs" --outputs "$outputs" "$@"
