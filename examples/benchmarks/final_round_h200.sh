#!/bin/bash
# One device call for a whole round on the H200 (2026-12-02): GPU suite, W1 before/after, the certificate,
# ALiBi, and the FoX authors' model. Each step has its own time limit so that one slow step cannot
# lose the others; results go to $OUT.
#   bash examples/benchmarks/final_round_h200.sh            (needs .before/ = the tree before issue 10,
#                                                             .fox_src/ = the authors' repository, .whl/)
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/final_round}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q >/dev/null 2>&1 || echo "editable install failed"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
rm -rf /tmp/before_shim && mkdir -p /tmp/before_shim && cp -r .before/acp_compile /tmp/before_shim/
ln -s "$PWD/.before/kernels" /tmp/before_shim/acp_compile/kernels && ln -s "$PWD/.before/patterns" /tmp/before_shim/acp_compile/patterns

step() { echo "## $1 $(date +%T)" | tee -a "$OUT/steps.log"; }

step suite
timeout ${SUITE_S:-250} python3 -m pytest tests/gpu -q -p no:cacheprovider -n ${SUITE_WORKERS:-4} --durations=10 \
    > "$OUT/gpu_tests.txt" 2>&1; echo "suite rc $?" | tee -a "$OUT/steps.log"; tail -15 "$OUT/gpu_tests.txt"

bench() {   # tag, T list, variants...; then env assignments after --
    local tag=$1 Ts=$2; shift 2
    local only=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do only+=("$1"); shift; done; shift
    if [[ "$tag" == old* ]]; then
        env "$@" PYTHONPATH=/tmp/before_shim timeout 100 python3 .before/examples/benchmarks/bench_attention.py --T $Ts --no-flex \
            --only "${only[@]}" --out /tmp/bench_$tag 2>&1 | grep '^{' | sed "s/^{/{\"tag\": \"$tag\", /" >> "$OUT/bench.jsonl"
    else
        env "$@" timeout 130 python3 examples/benchmarks/bench_attention.py --T $Ts --no-flex \
            --only "${only[@]}" --out /tmp/bench_$tag 2>&1 | grep '^{' | sed "s/^{/{\"tag\": \"$tag\", /" >> "$OUT/bench.jsonl"
    fi
}
step bench
bench old 16384 ours_dense ours_acp30 ours_auto sdpa_cudnn --
bench new "4096 16384" ours_dense ours_acp30 ours_auto ours_online ours_online_norms sdpa_cudnn --
bench old2 16384 ours_dense ours_acp30 ours_auto sdpa_cudnn --

step decode
timeout 60 python3 examples/benchmarks/bench_decode.py --out "$OUT" > "$OUT/decode.log" 2>&1; tail -7 "$OUT/decode.log"

step alibi
[ -f examples/benchmarks/bench_alibi.py ] && timeout 110 python3 examples/benchmarks/bench_alibi.py --out "$OUT" > "$OUT/alibi.log" 2>&1
tail -5 "$OUT/alibi.log"

step authors_model
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && PYTHONPATH=/tmp/site timeout 120 python3 examples/benchmarks/fox_authors_model.py --src .fox_src/src --T 16384 --steps 8 \
     --out "$OUT" > "$OUT/authors_model.log" 2>&1
tail -5 "$OUT/authors_model.log"
step done
