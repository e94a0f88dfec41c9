#!/bin/bash
# One round on the GPU machine: install the package, then run what the argument names.
#   bash examples/benchmarks/gpu_round.sh tests        GPU test suite (tests/gpu), stops at the first failure
#   bash examples/benchmarks/gpu_round.sh tests-all    the same without stopping; tests-forward: plan/forward/op files
#   bash examples/benchmarks/gpu_round.sh sweep        forward config sweep at T = 2k, 16k; the best config
#                                                      is exported as ACP_FWD_CONFIG for the later steps
#   bash examples/benchmarks/gpu_round.sh bench [args] W1 benchmark (bench_attention.py args)
#   bash examples/benchmarks/gpu_round.sh profile      W2 training step at 16k under torch.profiler (profile_w2.py)
# Several may be chained: gpu_round.sh tests sweep bench. Results go to $OUT (or examples/results).
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-examples/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -m pip install --no-deps --no-build-isolation -e . -q >/dev/null 2>&1; then
    # No setuptools or no network: map the package by symlinks instead of installing it.
    mkdir -p /tmp/acp_shim && rm -rf /tmp/acp_shim/acp_compile && cp -r acp_compile /tmp/acp_shim/
    ln -s "$PWD/kernels" /tmp/acp_shim/acp_compile/kernels && ln -s "$PWD/patterns" /tmp/acp_shim/acp_compile/patterns
    export PYTHONPATH=/tmp/acp_shim:$PYTHONPATH
    echo "editable install failed: using the symlink shim"
fi
python3 -c "import torch, triton, acp_compile; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
status=0
while [ $# -gt 0 ]; do
    case "$1" in
        tests) shift; python3 -m pytest tests/gpu -q -x -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/gpu_tests.txt" || status=1 ;;
        tests-forward) shift; python3 -m pytest tests/gpu/test_gpu_forward.py tests/gpu/test_gpu_op.py -q -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/gpu_tests_forward.txt" || status=1 ;;
        tests-all) shift; python3 -m pytest tests/gpu -q -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/gpu_tests.txt" || status=1 ;;
        sweep) shift; python3 examples/benchmarks/bench_attention.py --sweep --T 2048 16384 --head-dims ${SWEEP_DIMS:-128 64} --out "$OUT" || status=1
               pick=$(cat "$OUT/attention_fwd_config_pick.txt" 2>/dev/null)
               if [ -n "$pick" ]; then export ACP_FWD_CONFIG="$pick"; echo "using ACP_FWD_CONFIG=$pick from the sweep"; fi ;;
        profile) shift; python3 examples/benchmarks/profile_w2.py --out "$OUT" || status=1 ;;
        bench) shift; args=(); while [ $# -gt 0 ] && [[ ! "$1" =~ ^(tests|tests-all|tests-forward|sweep|bench|profile)$ ]]; do args+=("$1"); shift; done
               python3 examples/benchmarks/bench_attention.py --out "$OUT" "${args[@]}" || status=1 ;;
        *) echo "unknown step $1"; exit 2 ;;
    esac
done
exit $status
