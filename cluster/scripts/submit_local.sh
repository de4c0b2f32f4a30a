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
# The head's job agent may start a few seconds after `ray start` returns (on a busy machine): submit again while
# Ray says it has none yet, up to 30 s; any other failure ends the script at once.
for _ in $(seq 15); do
    if out=$("$bin/ray" job submit --address http://127.0.0.1:8265 -- \
            "$bin/onnxshard" run "$plan" --inputs "$inputs" --outputs "$outputs" "$@" 2>&1); then
        echo "$out"
        exit 0
    fi
    if ! grep -q "No available agent" <<<"$out"; then
        echo "$out" >&2
        exit 1
    fi
    sleep 2
done
echo "$out" >&2
exit 1
