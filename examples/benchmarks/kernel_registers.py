"""Registers and spill stack of the backward and decode kernels for sm_90, compiled on a machine without a GPU.

  TRITON_DEFAULT_FP_FUSION=1 python examples/benchmarks/kernel_registers.py [--before <tree>]

Triton compiles for a target given by hand (GPUTarget("cuda", 90, 128)) with the ptxas it ships; the cubin's
resource usage (cuobjdump -res-usage) gives registers per thread and the stack that spilled registers take.
Register allocation differs between Triton versions (the H200 runs 3.6, CI 3.9), so compare variants under
one version; a kernel that spills here usually spills there too. --before compiles the dk/dv kernel of an
older tree (its backward_dkdv.py) for comparison. Shapes: the H200's D = 128 bf16 row (configs.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16", "DQ": "*bf16",
            "C": "*fp32", "LSE2": "*fp32", "DELTA": "*fp32", "DC": "*fp32", "ROW": "*fp32", "START": "*i32",
            "END": "*i32", "KEEP": "*i32", "WHOLE": "*i32", "MODE": "*i8", "ANY": "*i32", "ACTIVE": "*i32", "KV": "*u8", "LO": "*i32",
            "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC": "*fp32", "KP": "*bf16", "VP": "*bf16", "CP": "*fp32",
            "TABLE": "*i64", "FIRST": "*i64", "LEN": "*i64"}


def resources(fn, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """{"regs", "stack_bytes"} of fn compiled for sm_90; unit strides (names ending in d) are constexpr 1."""
    sig, consts = {}, {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name], consts[name] = "constexpr", constexprs[name]
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name.endswith("_d") or (name.startswith("stride") and name.endswith("d")):
            sig[name], consts[name] = "constexpr", 1
        elif name in ("sm_scale", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 128),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    import triton.backends.nvidia as nv
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump"), "-res-usage", f.name],
                         capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", out).groups()
    return {"regs": int(regs), "stack_bytes": int(stack)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="an older tree whose kernels/fox_triton/backward_dkdv.py to compile too")
    args = ap.parse_args()
    from acp_compile.kernels.fox_triton.backward_dkdv import fox_bwd_dkdv_kernel
    from acp_compile.kernels.fox_triton.backward_dq import fox_bwd_dq_kernel
    common = dict(GROUP=1, PRUNE=True, DOT_PRECISION="tf32", HEAD_DIM=128, EVEN_M=True, EVEN_N=True, D_PAD=128,
                  HEAD_DIM_V=128, DV_PAD=128, HAS_SEG=False, PERSISTENT=False, EXACT_C=False)
    for recorded in (False, True):
        print("dk/dv 64x128, 8 warps, 3 stages, recorded", recorded,
              resources(fox_bwd_dkdv_kernel, dict(common, BLOCK_M=64, BLOCK_N=128, RECORDED=recorded), 8, 3))
        print("dq 128x64, 8 warps, 3 stages, recorded", recorded,
              resources(fox_bwd_dq_kernel, dict(common, BLOCK_M=128, BLOCK_N=64, RECORDED=recorded), 8, 3))
    from acp_compile.kernels.fox_triton.decode import fox_decode_split_kernel
    from acp_compile.kernels.fox_triton.decode_paged import fox_decode_paged_split_kernel
    dec = dict(GROUP=1, HEAD_DIM=128, D_PAD=128, HEAD_DIM_V=128, DV_PAD=128, BLOCK_R=16)
    for prune in (False, True):
        print("decode split, 4 warps, 2 stages, prune", prune,
              resources(fox_decode_split_kernel, dict(dec, BLOCK_N=64, PRUNE=prune), 4, 2))
        print("paged decode split, 4 warps, 2 stages, prune", prune,
              resources(fox_decode_paged_split_kernel, dict(dec, PAGE=64, PRUNE=prune), 4, 2))
    if args.before:
        spec = importlib.util.spec_from_file_location(
            "before_dkdv", os.path.join(args.before, "kernels", "fox_triton", "backward_dkdv.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["before_dkdv"] = mod
        spec.loader.exec_module(mod)
        print("before: dk/dv 64x128", resources(mod.fox_bwd_dkdv_kernel, dict(
            GROUP=1, ACP=True, DOT_PRECISION="tf32", HEAD_DIM=128, EVEN_M=True, EVEN_N=True, BLOCK_M=64,
            BLOCK_N=128, BLOCK_D=128), 8, 3))


if __name__ == "__main__":
    main()
