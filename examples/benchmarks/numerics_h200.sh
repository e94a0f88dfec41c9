#!/bin/bash
# Issue 10 round on the H200: speed before/after in one session (the pre-change tree in .before/, carried
# as an ignored folder), gate-gradient accuracy against fp64 autograd, eager and the FoX authors' kernel
# (their file in .fox_ref/, carried, never committed), and the GPU suite.
#   bash examples/benchmarks/numerics_h200.sh bench acc tests
#   bash examples/benchmarks/numerics_h200.sh dqsweep benchpick     (dq tile sweep, then before/after with the pick)
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/numerics_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q >/dev/null 2>&1 || echo "editable install failed"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
rm -rf /tmp/before_shim && mkdir -p /tmp/before_shim && cp -r .before/acp_compile /tmp/before_shim/
ln -s "$PWD/.before/kernels" /tmp/before_shim/acp_compile/kernels && ln -s "$PWD/.before/patterns" /tmp/before_shim/acp_compile/patterns
BENCH_T=${BENCH_T:-16384}
run_bench() {   # tag, then env assignments
    local tag=$1; shift
    echo "## bench $tag" | tee -a "$OUT/bench.log"
    if [[ "$tag" == old* ]]; then
        env "$@" PYTHONPATH=/tmp/before_shim timeout 200 python3 .before/examples/benchmarks/bench_attention.py --T $BENCH_T --no-flex \
            --only ours_dense ours_acp30 ours_auto sdpa_cudnn --out /tmp/bench_$tag 2>&1 | grep '^{' | sed "s/^{/{\"tag\": \"$tag\", /" | tee -a "$OUT/bench.log"
    else
        env "$@" timeout 200 python3 examples/benchmarks/bench_attention.py --T $BENCH_T --no-flex \
            --only ours_dense ours_acp30 ours_auto sdpa_cudnn --out /tmp/bench_$tag 2>&1 | grep '^{' | sed "s/^{/{\"tag\": \"$tag\", /" | tee -a "$OUT/bench.log"
    fi
}
for step in "$@"; do
    case "$step" in
        bench) run_bench old; run_bench new; run_bench exact ACP_C_SPAN_LIMIT=-1; run_bench new2; run_bench old ;;
        bench2) run_bench old; run_bench new ;;
        benchx) pick=${BWD_PICK:-64,128,128,64,8,3,8,3}; echo "pick $pick" | tee -a "$OUT/bench.log"
                run_bench old; run_bench pick ACP_BWD_CONFIG=$pick; run_bench pickx ACP_BWD_CONFIG=$pick ACP_C_SPAN_LIMIT=-1
                run_bench old; run_bench pickx2 ACP_BWD_CONFIG=$pick ACP_C_SPAN_LIMIT=-1; run_bench pick2 ACP_BWD_CONFIG=$pick ;;
        dqsweep) timeout 150 python3 examples/benchmarks/sweep_dq.py --T $BENCH_T --out "$OUT" 2>&1 | tee "$OUT/sweep_dq.log" | tail -12 ;;
        benchpick) pick=$(cat "$OUT/bwd_pick.txt"); echo "pick $pick" | tee -a "$OUT/bench.log"
                   run_bench old; run_bench new; run_bench pick ACP_BWD_CONFIG=$pick; run_bench old; run_bench pick2 ACP_BWD_CONFIG=$pick ;;
        diag) timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/diag.txt"
import logging, torch, triton
logging.basicConfig(level=logging.INFO)
from acp_compile.kernels.fox_triton import backward as bw
import sys; sys.path.insert(0, "tests")
from helpers import W1_ON_CUDA, fox_inputs
q, k, v, c = fox_inputs(2, 16, 16, 16384, 16384, 128, dtype=torch.bfloat16, **W1_ON_CUDA)
o = torch.randn_like(q); do = torch.randn_like(q); lse = torch.randn(q.shape[:3], device="cuda")
cfg = bw.default_config(q); scale = 128 ** -0.5
delta, row = bw.preprocess(do, o, lse)
dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v); dc = torch.empty_like(c)
for ex in (False, True):
    h = bw.launch_dkdv(q, k, v, c, do, row, delta, None, None, dk, dv, dc, scale, cfg, ex)
    t = triton.testing.do_bench(lambda: bw.launch_dkdv(q, k, v, c, do, row, delta, None, None, dk, dv, dc, scale, cfg, ex))
    print("dkdv exact", ex, "regs", h.n_regs, "spills", h.n_spills, "ms", round(t, 3))
    h = bw.launch_dq(q, k, v, c, do, row, delta, None, dq, dc, scale, cfg, ex)
    t = triton.testing.do_bench(lambda: bw.launch_dq(q, k, v, c, do, row, delta, None, dq, dc, scale, cfg, ex))
    print("dq exact", ex, "regs", h.n_regs, "spills", h.n_spills, "ms", round(t, 3))
PY
        ;;
        acc) timeout 240 python3 examples/benchmarks/gate_grad_accuracy.py --T ${ACC_T:-1024 4096 16384} --gates w1 uniform2 --H 4 --D 128 \
                 --authors .fox_ref/fox_authors_attention.py --out "$OUT/acc_new.json" 2>&1 | tail -40 | tee "$OUT/acc_new.log"
             PYTHONPATH=/tmp/before_shim timeout 150 python3 examples/benchmarks/gate_grad_accuracy.py --T ${ACC_T:-1024 4096 16384} --gates w1 uniform2 --H 4 --D 128 \
                 --out "$OUT/acc_old.json" 2>&1 | grep ours | tee "$OUT/acc_old.log" ;;
        tests) timeout ${TESTS_TIMEOUT:-200} python3 -m pytest tests/gpu -q -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40 ;;
        *) echo "unknown step $step" ;;
    esac
done
