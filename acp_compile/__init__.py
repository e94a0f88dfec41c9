"""acp-compile: Forgetting Transformer attention with Adaptive Computation Pruning, as a torch.compile pass.

    torch.compile(model, backend="acp")          # rewrite FoX attention found in the graph
    acp_compile.fox_attention(q, k, v, log_fgate) # the op itself
    acp_compile.fox_decode(q, k_cache, v_cache, c) # a few new tokens against a KV cache
    acp_compile.compilations()                    # what the pass rewrote and left alone, per graph
"""
from acp_compile.api import fox_attention
from acp_compile.generation import fox_decode
from acp_compile.config import ACPConfig
from acp_compile import report
from acp_compile.backend import acp as acp_backend
from acp_compile.decorator import acp
from acp_compile.compilations import Compilation, clear_compilations, compilations

__all__ = ["fox_attention", "fox_decode", "ACPConfig", "report", "acp_backend", "acp", "compilations", "clear_compilations",
           "Compilation"]
__version__ = "0.1.0"
