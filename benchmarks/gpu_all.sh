#!/usr/bin/env bash
# Every benchmark's GPU rows in one run, for a GPU machine lent for a few minutes.
#
#   OUT=/tmp/mps-gpu FIXTURE=../shared/fixtures/mps-tiny bash benchmarks/gpu_all.sh
#
# FIXTURE is the golden fixture inside a shared/ folder (SHARED/fixtures/mps-tiny).
#
# Runs from the repository root with the package on PYTHONPATH (no install needed beyond the
# dependencies). Each step has its own time limit, so a slow step never costs the others, and
# every step's log and JSON land in $OUT even when a later one fails.
set -u
out=${OUT:-/tmp/mps-gpu}
cache=${MPS_BENCH_CACHE:-/tmp/mps-bench}
fixture=${FIXTURE:-../shared/fixtures/mps-tiny}
mkdir -p "$out" "$cache"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPS_BENCH_CACHE="$cache"

step() {  # step NAME SECONDS COMMAND...: one benchmark, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 40 "$out/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    lscpu | grep -m1 'Model name'
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

# Throughput, floor share, fixture accuracy of fp16/bf16 images with the text side in fp32.
step bench 220 python3 benchmarks/bench.py --device cuda --dtypes fp16,bf16 --images 64 --batch-size 32 \
    --cache-dir "$cache" --fixture "$fixture" --skip cold,help --json "$out/bench.json"
# The differentiable reward: forward + backward per image, peak memory with and without checkpointing.
step bench_reward 140 python3 benchmarks/bench_reward.py --device cuda --cache-dir "$cache" \
    --json "$out/bench_reward.json"
# The server against the in-process scorer on the full-size model.
step bench_serve 240 env MPS_SHARED="$(dirname "$(dirname "$fixture")")" python3 benchmarks/bench_serve.py --weights "$cache/mps-vit-h-14-random-fp16.safetensors" \
    --device cuda --images 2048 --per-request 8 --repeats 2 --json "$out/bench_serve.json"
# A trainer's load on the full-size model: rollout batches of 16 and 64 raw 512² arrays (POST /v1/batch) from
# 1 and 4 rollout workers against in-process scoring, and the overlap Client.submit / AsyncClient gain.
step bench_serve_trainer 240 env MPS_SHARED="$(dirname "$(dirname "$fixture")")" python3 benchmarks/bench_serve.py \
    --trainer --weights "$cache/mps-vit-h-14-random-fp16.safetensors" --device cuda --max-batch 64 --images 512 \
    --repeats 2 --json "$out/bench_serve_trainer.json"
