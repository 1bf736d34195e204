#!/usr/bin/env bash
# The GPU checks in one go:
# the GPU tests, then bench/scale.py (256 px training step, fp32 and bf16) and bench/sampling.py
# (32 and 256 px, fp32 and bf16), each log written to OUT_DIR with the card's name at its top.
#
#   bash bench/gpu.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else bench/gpu-out
#   GPU_CHECKS=tests|profile|lazy|graph|ppl_jvp bash bench/gpu.sh   # tests: no bf16 sampling; profile: where the isometry
#                                  # step's time goes; lazy: training steps with train.iso_every = 1, 2, 4, 8;
#                                  # graph: the sync-free isometry step, eager and as one CUDA graph (bench/iso_graph.py)
#
# On a machine without this project's packages (an air-gapped GPU box with torch only), put the wheels
# the import chain needs in .whl/ first (docs/benchmarks.md, "GPU tests", says which); they are installed
# into /tmp/site, never into the system.
set -uo pipefail
out=${1:-${OUT:-bench/gpu-out}}
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
header="# card: ${card:-none}; torch $($py -c 'import torch; print(torch.__version__, torch.version.cuda)'); $(date -u +%FT%TZ)"
echo "$header"

run() {  # run NAME TIMEOUT CMD...: one check, its log in $out/NAME.log, a line saying how it ended
    local name=$1 limit=$2; shift 2
    { echo "$header"; echo "\$ $*"; } >"$out/$name.log"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s"
    tail -n 40 "$out/$name.log"
}

if [ "${GPU_CHECKS:-all}" = profile ]; then  # where the 256 px isometry step's GPU time goes, and two cheap levers
    run profile_iso 120 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 2 --profile iso_levers
    run profile_plain 90 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 2 --profile plain
    run scale_cudnn_benchmark 90 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 3 --repeats 5 --variants plain,iso_levers --cudnn-benchmark
    run scale_channels_last 90 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 3 --repeats 5 --variants plain,iso_levers --channels-last
    exit 0
fi
if [ "${GPU_CHECKS:-all}" = ppl_jvp ]; then  # PPL by forward-mode differentiation: cost and agreement, then the captured iso step
    run ppl_cost_32 45 $py -m bench.ppl_jvp cost --device cuda --resolution 32 --pairs 64 --steps 5 --repeats 3
    run ppl_cost_256 120 $py -m bench.ppl_jvp cost --device cuda --resolution 256 --pairs 16 --steps 3 --repeats 3 --profile bf16
    run ppl_agree_256 130 $py -m bench.ppl_jvp agree --device cuda --random-unet 256 --distance lpips --pairs 64 --steps 6 --batch 16
    run ppl_tests 75 $py -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_metrics_evaluate.py -k jvp
    run iso_graph 120 $py -m bench.iso_graph --device cuda --layout celebahq --resolution 256 --channels 128 --batch 8 --repeats 10
    exit 0
fi
if [ "${GPU_CHECKS:-all}" = graph ]; then  # the isometry step without host syncs, eager and captured (about a minute)
    run iso_graph 240 $py -m bench.iso_graph --device cuda --layout celebahq --resolution 256 --channels 128 --batch 8 --repeats 10
    exit 0
fi
if [ "${GPU_CHECKS:-all}" = lazy ]; then  # training steps with the isometry term every n-th step (train.iso_every)
    run scale_lazy_fp32 150 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 2 --repeats 4 --variants plain,iso_levers --trial-steps 32 --iso-every 1,2,4,8
    run scale_lazy_bf16 150 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 2 --repeats 4 --variants plain,iso_levers --trial-steps 32 --iso-every 1,2,4,8 --bf16
    run train_steps 300 $py -m bench.train_steps --device cuda --steps 40 --iso-every 1,2,4
    exit 0
fi
case ${GPU_CHECKS:-all} in
all|tests)
    serving=$($py -c 'import mlflow, pandas' 2>/dev/null && echo tests/test_serving.py)  # where MLflow is there
    run tests 180 $py -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu.py tests/test_metrics.py tests/test_metrics_evaluate.py $serving ;;
esac
run scale_fp32 75 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 2 --repeats 5
run scale_bf16 75 $py -m bench.scale --device cuda --batch 8 --iso-batch 2 --warmup 2 --repeats 5 --bf16
# fp32 with TF32 off (what evaluation runs) is several times slower than bf16: fewer images at 256 px
run sampling_fp32 45 $py -m bench.sampling --device cuda --dtype fp32 --sizes 32
run sampling_fp32_256 60 $py -m bench.sampling --device cuda --dtype fp32 --sizes 256 --n 32 --batch 32
case ${GPU_CHECKS:-all} in
all) run sampling_bf16 75 $py -m bench.sampling --device cuda --dtype bf16 ;;
esac
