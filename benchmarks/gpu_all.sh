#!/usr/bin/env bash
# Every GPU measurement in one run of under 8 minutes, for a GPU machine lent for a few minutes.
#
#   FIXTURE=../shared/fixtures/mps-tiny bash benchmarks/gpu_all.sh          # on the GPU machine
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_all.sh          # every step at tiny sizes, on CPU
#
# Logs and JSON go to $OUT, by default benchmarks/results/<gpu>-<date>/ (e.g. h200-2026-12-03). FIXTURE is the
# golden fixture inside a shared/ folder (SHARED/fixtures/mps-tiny). Runs from the repository root with the
# package on PYTHONPATH (no install beyond the dependencies; the tensor decode path wants the CUDA build of
# torchcodec, or torchvision). Steps run in order of importance, each under its own time limit and all under
# one budget ($BUDGET_S, default 450 s): a slow step never costs the others, a step that would start with
# under 20 s left is skipped, and every step's log and JSON land in $OUT even when a later one fails.
set -u
device=${DEVICE:-cuda}
quick=${QUICK:-0}
budget=${BUDGET_S:-450}
slow=1  # the step limits' multiplier: the CPU dry run is slower at tiny sizes than the GPU at full ones
cache=${MPS_BENCH_CACHE:-/tmp/mps-bench}
fixture=${FIXTURE:-../shared/fixtures/mps-tiny}
if [ "$device" = cpu ]; then
    gpu=cpu
else
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr 'A-Z' 'a-z' \
        | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
    gpu=${gpu:-gpu}
fi
out=${OUT:-benchmarks/results/$gpu-$(date +%F)}
mkdir -p "$out" "$cache"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPS_BENCH_CACHE="$cache"
export MPS_SHARED="$(dirname "$(dirname "$fixture")")"
ckpt="$cache/mps-vit-h-14-random-fp16.safetensors"
start=$SECONDS

step() {  # step NAME SECONDS COMMAND...: one measurement, its output in $OUT/NAME.log, within the budget
    local name=$1 limit=$(($2 * slow)) left=$((budget - (SECONDS - start)))
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the ${budget}s budget left" | tee "$out/$name.log"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, ${left}s of the budget left)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 45 "$out/$name.log"
}

{
    [ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
    python3 -c "from mps_cli.engine.decode import find_jpeg_decoder as f; import torch; d = f(torch.device('$device')); print('JPEG decoder on $device:', getattr(d, 'backend', None))"
    lscpu | grep -m1 'Model name'
    git log -1 --format='mps-cli %h %s' 2>/dev/null
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$quick" = 1 ]; then  # the CPU dry run: the same steps and options at sizes that take seconds
    dtypes=fp32 images=2 batch=2 decode_images=4 sides=512 variants="decode=exact,decode=tensor,attention=math"
    serve_args=(--images 16 --per-request 4 --clients 1,4 --repeats 1 --cli-reps 1)
    trainer_args=(--images 16 --batch-sizes 4 --workers 1 --repeats 1 --steps 2)
    dataset_args=(--images 16 --shard-size 8 --size 512 --batch-size 4)
    profile_args=(--tiny --repeats 1 --dtypes fp32,bf16)
    compile_variants="compile=graphs"
    slow=4
else
    dtypes=fp16,bf16 images=512 batch=auto decode_images=256 sides=512,1024,2048
    variants="decode=exact,decode=draft,batch=32,batch=64,batch=128,attention=math"
    serve_args=(--weights "$ckpt" --images 2048 --per-request 8 --clients 16 --repeats 2 --cli-reps 1)
    trainer_args=(--weights "$ckpt" --images 256 --max-batch 64 --batch-sizes 16,64 --workers 1,4 --repeats 1)
    dataset_args=(--weights "$ckpt" --images 1024 --shard-size 256 --size 768 --batch-size 128 --dims all)
    profile_args=()
    compile_variants="compile=on,compile=graphs"
fi
first=${dtypes%%,*}
bench=(python3 benchmarks/bench.py --device "$device" --images "$images" --batch-size "$batch" --cache-dir "$cache"
       --fixture "$fixture")

# 1. Throughput from 768px JPEG files (default decode: the tensor path on CUDA) and pre-decoded, each row's share
#    of the matmul floor; the naive baseline; fixture accuracy of fp16/bf16 images with the text side in fp32.
step bench 150 "${bench[@]}" --dtypes "$dtypes" --skip cold,read,help --json "$out/bench.json"
# 2. Each decode path's speed and its score drift against the exact path (fixture JPEGs, fp32 on the device).
step bench_decode 90 python3 benchmarks/bench_decode.py --device "$device" --images "$decode_images" --sides "$sides" \
    --cache-dir "$cache" --fixture "$fixture" --json "$out/bench_decode.json"
# 3. One change at a time on fp16, 4 dims: the exact decode, larger batches, SDPA's math kernels (the 'before').
step bench_variants 120 "${bench[@]}" --dtypes "$first" --skip main,naive,cold,read,help,accuracy --variants "$variants" \
    --json "$out/bench_variants.json"
# 4. The reward's forward + backward per dtype under torch.profiler: top ops, each attention backend forced,
#    the patch embedding as convolution and as matmul (the fp16 backward was 18x its forward).
step profile_reward 90 python3 benchmarks/profile_reward.py --device "$device" --cache-dir "$cache" --out "$out" \
    "${profile_args[@]}" --json "$out/profile_reward.json"
# 5. mps serve at 16 clients against the in-process scorer, full-size model.
step bench_serve 90 python3 benchmarks/bench_serve.py --device "$device" "${serve_args[@]}" --json "$out/bench_serve.json"
# 5b. A trainer's load: rollout batches of 16 and 64 raw 512² arrays (POST /v1/batch) from 1 and 4 rollout
#     workers against in-process scoring, and the overlap Client.submit / AsyncClient gain on a rollout loop.
step bench_serve_trainer 90 python3 benchmarks/bench_serve.py --trainer --device "$device" "${trainer_args[@]}" \
    --json "$out/bench_serve_trainer.json"
# 6. mps dataset on webdataset tar and parquet shards against Scorer.score on the files (no Ray).
step bench_dataset 90 python3 benchmarks/bench_dataset.py --device "$device" "${dataset_args[@]}" --no-ray --repeats 1 \
    --json "$out/bench_dataset.json"
# 7. torch.compile and CUDA graphs last: compiling the full model takes minutes, and it gets what is left.
step bench_compile 200 "${bench[@]}" --dtypes "$first" --skip main,naive,cold,read,help,accuracy \
    --variants "$compile_variants" --json "$out/bench_compile.json"
echo "=== all steps: $((SECONDS - start)) s of the ${budget}s budget; logs in $out"
