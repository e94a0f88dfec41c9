#!/bin/bash
# One device call for a whole round on the H200 (2026-12-02): GPU suite, W1 before/after, the certificate,
# ALiBi, and the FoX authors' model. Each step has its own time limit so that one slow step cannot
# lose the others; results go to $OUT.
#   bash examples/benchmarks/final_round_h200.sh suite bench decode alibi authors
#   (bench needs .before/ = the tree before issue 10; authors needs .fox_src/ = their repository and .whl/;
#    authors_generate needs .whl444/ = transformers 4.44.0, tokenizers 0.19.1, huggingface_hub 0.36.2)
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


bench() {   # tag, T list, variants...; then env assignments after --
    local tag=$1 Ts=$2; shift 2
    local only=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do only+=("$1"); shift; done; shift
    if [[ "$tag" == old* ]]; then
        env "$@" PYTHONPATH=/tmp/before_shim timeout 100 python3 .before/examples/benchmarks/bench_attention.py --T $Ts --no-flex \
            --only "${only[@]}" --out /tmp/bench_$tag 2>&1 | grep '^{' | sed "s/^{/{\"tag\": \"$tag\", /" >> "$OUT/bench.jsonl"
    else
        env "$@" timeout 150 python3 examples/benchmarks/bench_attention.py --T $Ts --no-flex \
            --only "${only[@]}" --out /tmp/bench_$tag 2>&1 | grep '^{' | sed "s/^{/{\"tag\": \"$tag\", /" >> "$OUT/bench.jsonl"
    fi
}

for what in "$@"; do
    step "$what"
    case "$what" in
        suite) timeout ${SUITE_S:-220} python3 -m pytest tests/gpu -v -rfE --tb=line -p no:cacheprovider -p no:benchmark \
                   -n ${SUITE_WORKERS:-4} --durations=10 \
                   > "$OUT/gpu_tests.txt" 2>&1; echo "suite rc $?" | tee -a "$OUT/steps.log"; tail -25 "$OUT/gpu_tests.txt" ;;
        retest) timeout ${SUITE_S:-200} python3 -m pytest ${RETEST} -q -p no:cacheprovider -n ${SUITE_WORKERS:-4} \
                   > "$OUT/gpu_retest.txt" 2>&1; echo "retest rc $?" | tee -a "$OUT/steps.log"; tail -25 "$OUT/gpu_retest.txt" ;;
        bench) bench old 16384 ours_dense ours_acp30 ours_auto sdpa_cudnn --
               bench new "2048 16384" ours_dense ours_acp30 ours_auto ours_online ours_online_norms sdpa_cudnn --
               tail -3 "$OUT/bench.jsonl" | cut -c1-300 ;;
        chunk) bench old 16384 ours_acp30 sdpa_cudnn --
               bench new_c1 16384 ours_dense ours_acp30 ours_auto ours_online sdpa_cudnn -- ACP_CERT_CHUNK=1
               bench new_c2 "2048 16384" ours_online sdpa_cudnn -- ACP_CERT_CHUNK=2
               bench new_c4 "16384 32768" ours_online ours_acp30 sdpa_cudnn -- ACP_CERT_CHUNK=4
               grep -h '"T": 16384' "$OUT/bench.jsonl" | cut -c1-250 ;;
        profile) for var in ${PROFILE_VARIANTS:-ours_acp30}; do
                   PYTHONPATH=/tmp/before_shim timeout 90 python3 examples/benchmarks/profile_attention.py --variant $var \
                       --bench-dir .before/examples/benchmarks --tag old_$var >> "$OUT/profile.jsonl" 2>"$OUT/profile_old.err"
                   timeout 90 python3 examples/benchmarks/profile_attention.py --variant $var --tag new_$var \
                       >> "$OUT/profile.jsonl" 2>"$OUT/profile_new.err"
                   timeout 90 python3 examples/benchmarks/profile_attention.py --variant $var --tag norec_$var --no-recorded \
                       >> "$OUT/profile.jsonl" 2>"$OUT/profile_norec.err"
               done
               grep -v 'at::native\|Memcpy' "$OUT/profile.jsonl" | cut -c1-260 ;;
        host) timeout 120 python3 examples/benchmarks/bench_host_overhead.py --profile > "$OUT/host_overhead.txt" 2>&1
              timeout 60 python3 -m pytest tests/gpu/test_gpu_no_host_sync.py -q -p no:cacheprovider --tb=short > "$OUT/no_sync.txt" 2>&1
              grep '^{' "$OUT/host_overhead.txt"; tail -15 "$OUT/no_sync.txt" ;;
        final) bench old 16384 ours_dense ours_acp30 ours_auto sdpa_cudnn --
               bench new "2048 16384 32768" ours_dense ours_acp30 ours_online sdpa_cudnn --
               python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"variant"' in l]
ref = {(r["tag"], r["T"]): r for r in rows if r["variant"] == "sdpa_cudnn"}
for r in rows:
    c = ref.get((r["tag"], r["T"]))
    if c and r["variant"] != "sdpa_cudnn":
        print(f'{r["tag"]:6s} T={r["T"]:6d} {r["variant"]:12s} fwd {r["fwd_ms"]:.3f} ms x{r["fwd_ms"] / c["fwd_ms"]:.3f}  '
              f'fwd+bwd {r["fwdbwd_ms"]:.3f} ms x{r["fwdbwd_ms"] / c["fwdbwd_ms"]:.3f}')
PY
               ;;
        generate) timeout ${GENERATE_S:-200} python3 examples/benchmarks/bench_generate.py --out "$OUT/generate" --budget-s $(( ${GENERATE_S:-200} - 15 )) \
                     > "$OUT/generate.log" 2>&1; echo "generate rc $?"; tail -8 "$OUT/generate.log" ;;
        w2long)   # issue 13: 50 steps at 16k, acp (skipped fraction and U per step) against pruning off
              timeout ${W2_S:-330} python3 examples/benchmarks/bench_w2.py --T 16384 --runs acp acp-no-prune --warmup 2 \
                  --steps ${W2_STEPS:-48} --per-step-stats --no-report-skips --budget-s $(( ${W2_S:-330} - 20 )) \
                  --per-config-estimate-s 100 --out "$OUT/w2long" > "$OUT/w2long.log" 2>&1; echo "w2long rc $?"
              tail -12 "$OUT/w2long.log" ;;
        w1) bench old 16384 ours_acp30 sdpa_cudnn --
            bench new 16384 ours_dense ours_acp30 ours_online sdpa_cudnn -- ;;
        decode) timeout 150 python3 examples/benchmarks/bench_decode.py --warps ${DECODE_WARPS:-4} --out "$OUT" > "$OUT/decode.log" 2>&1
                grep '^{' "$OUT/decode.log" | python3 -c "import json,sys; [print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in json.loads(l).items()}) for l in sys.stdin]" ;;
        alibi) [ -f examples/benchmarks/bench_alibi.py ] && timeout ${ALIBI_S:-120} python3 examples/benchmarks/bench_alibi.py --out "$OUT" > "$OUT/alibi.log" 2>&1
               tail -8 "$OUT/alibi.log" ;;
        packed) timeout ${PACKED_S:-120} python3 examples/benchmarks/bench_packed.py --out "$OUT" > "$OUT/packed.log" 2>&1
                tail -12 "$OUT/packed.log" ;;
        authors) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
                   && PYTHONPATH=/tmp/site timeout ${AUTHORS_S:-150} python3 examples/benchmarks/fox_authors_model.py --src .fox_src/src \
                      --T 16384 --steps 8 --out "$OUT" > "$OUT/authors_model.log" 2>&1
                 tail -5 "$OUT/authors_model.log" ;;
        authors_generate)   # their pinned transformers 4.44 (4.57's Cache API no longer takes their FgateDynamicCache)
                 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site444 .whl444/*.whl \
                   && PYTHONPATH=/tmp/site444 timeout ${GENERATE_S:-200} python3 examples/benchmarks/fox_authors_model.py --src .fox_src/src \
                      --generate ${NEW_TOKENS:-64} --prompt ${PROMPT:-2048} --out "$OUT" > "$OUT/authors_generate.log" 2>&1
                 grep '^{' "$OUT/authors_generate.log" | cut -c1-400 ;;
        *) echo "unknown step $what" ;;
    esac
done
step done
