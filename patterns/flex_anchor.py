"""Anchor: flex_attention whose score_mod adds the FoX bias c[b, h, q_idx] - c[b, h, kv_idx] under a causal mask.

The Dynamo graph holds one higher-order op node
    flex_attention(q, k, v, score_mod_gm, block_mask, scale, kernel_options, score_buffers, mask_buffers)
q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D); block_mask is a tuple whose last entry is the mask_mod graph;
score_buffers / mask_buffers are the tensors the two closures read (c, perhaps twice). The node returns
(o, lse, ...); a site is rewritten only when nothing but o is used.

A score_mod that leaves every visible score unchanged (plain attention, any mask) is not FoX and is
ignored (no near-miss). Proof by meaning, not spelling. With off = Tk - Tq (queries are the last Tq positions) and fresh random
values for c and for the scores, the effective logit of flex_attention at a point p = (b, h, i, j) is
    eff(p) = score_mod(s, p)  if mask_mod(p) else -inf
and the site is FoX attention when, on a sample of points covering both sides of the diagonal,
    eff(p) finite  <=>  i + off >= j                    (causal, diagonal visible; -inf from score_mod counts)
    eff(p) - s     =  X[b, h, i + off] - Y[b, h, j]     (the same for two different s: the bias ignores s)
where X and Y are score buffers holding the same tensor (one node, or a clone/contiguous copy of it) laid
out (B, Hq, Tk) or (B, Tk, Hq). flex's own `scale` multiplies q.k before score_mod and becomes sm_scale.
Block tables. flex_attention visits only the key blocks its BlockMask lists and skips mask_mod on
"full" blocks, so the tables must agree with causality: every block holding a causal entry is listed,
and every full block is causal throughout. Tables that enter the graph as inputs (a BlockMask built
outside the compiled function) or constants are checked on their real values at compile time, and a
run-time guard re-checks them when their storage, version or shape changes (patterns/guards.py);
tables computed inside the graph come from create_block_mask over the proven mask_mod and are trusted.
(Measured on torch 2.13 CPU: eager flex_attention applies mask_mod everywhere and ignores the tables,
compiled flex_attention follows them; inconsistent tables therefore give different eager and compiled
results, and the pass leaves such a site as the inner backend would compile it.)
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from acp_compile import _torch_private as tp
from acp_compile._torch_private import concrete_int, example_value, sym_expr
from acp_compile.patterns.guards import GuardedInput, MaskGuard, input_kind
from acp_compile.patterns.match import FoxMatch, NearMiss, NotProven
from acp_compile.patterns.registry import register_anchor

ANCHOR = "flex"
_ROW_SAMPLES = 40          # query rows probed (always including the first and the last)
_COL_SAMPLES = 160         # key columns probed per row when Tk is large (the diagonal band always included)
_FULL_COLS = 512           # up to this many keys every column is probed
_ATOL = 1e-4               # random c lies in [-4, 0] and scores are N(0, 1): fp32 errors stay far below


@dataclass(frozen=True)
class _Sizes:
    B: int
    Hq: int
    Hkv: int
    Tq: int
    Tk: int
    D: int


class FlexAnchor:
    name = ANCHOR

    def candidates(self, graph: fx.Graph) -> Iterable[fx.Node]:
        flex = tp.flex_attention_op()
        return [n for n in graph.nodes if n.op == "call_function" and n.target is flex]

    def match(self, node: fx.Node, ctx=None) -> FoxMatch | NearMiss | None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)          # the proof works on a few thousand points: threads only add overhead
        try:
            return _prove(node, ctx)
        except NotProven as err:
            return NearMiss(ANCHOR, node.name, str(err))
        finally:
            torch.set_num_threads(threads)


def _prove(node: fx.Node, ctx) -> FoxMatch | None:
    q, k, v, score_node, block_mask, scale, _kernel_options, score_bufs, mask_bufs = _unpack(node)
    out_node, dead_getitems = _output_use(node)
    sizes = _sizes(q, k, v)
    score_gm = _subgraph(node, score_node, "score_mod")
    mask_gm = _subgraph(node, block_mask[-1], "mask_mod")
    uniform = _indices_only_index_buffers(score_gm)

    rng = torch.Generator().manual_seed(0x5EED)
    score_values, classes = _random_buffers(score_bufs, rng, "score_mod")
    mask_values, _ = _random_buffers(mask_bufs, rng, "mask_mod")
    # The bias: an identity of the arithmetic score_mod applies to what it reads, tested on random
    # values at sampled points (exact for a uniform score_mod, whose indices only pick buffer entries).
    b, h, i, j = _probe_points(sizes, rng)
    off = sizes.Tk - sizes.Tq
    s1 = torch.randn(b.shape, generator=rng)
    s2 = torch.randn(b.shape, generator=rng) * 3.0
    m = _evaluate(mask_gm, (b, h, i, j), mask_values, "mask_mod").to(torch.bool)
    scored1 = _evaluate(score_gm, (s1, b, h, i, j), score_values, "score_mod").float()
    if torch.equal(scored1[m], s1[m]):
        return None                                  # no bias at all: plain attention, not FoX; left alone
    e1 = torch.where(m, scored1, -math.inf)
    e2 = torch.where(m, _evaluate(score_gm, (s2, b, h, i, j), score_values, "score_mod").float(), -math.inf)
    causal = i + off >= j
    visible = e1 != -math.inf
    if not torch.equal(visible, causal) or not torch.equal(e2 != -math.inf, causal):
        raise _not_causal(visible, i + off == j)
    if not bool(torch.isfinite(e1[visible]).all()):
        raise NotProven("score_mod gives NaN or +inf on visible entries")
    bias = (e1 - s1)[visible]
    if not torch.allclose(bias, (e2 - s2)[visible], atol=_ATOL, rtol=0):
        raise NotProven("score_mod does not add a bias to the score (it scales or transforms it); pass the "
                        "scale through flex_attention's `scale` argument")
    bv, hv, iv, jv = b[visible], h[visible], i[visible], j[visible]
    c_node, layout = _find_gate(bias, (bv, hv, iv + off, jv), score_bufs, score_values, classes, sizes)
    # The mask: decided at every point, never by sampling (a window or prefix may differ from causal
    # in one row only); under dynamic sizes once more for every new size, by a guard.
    check = _visibility_checker(score_gm, mask_gm, score_values, mask_values, uniform, mask_bufs)
    check(sizes)
    guards = _block_table_guards(node, block_mask, sizes, ctx) + _size_guards(node, q, k, check, ctx)
    return FoxMatch(
        anchor=ANCHOR, replace=out_node, q=q, k=k, v=v, c=_gate_builder(c_node, layout),
        sm_scale=_scale(scale, sizes.D), guards=guards, region=tuple(dead_getitems) + (node,),
    )


def _not_causal(visible: torch.Tensor, diagonal: torch.Tensor) -> NotProven:
    hidden_diag = bool((~visible & diagonal).any())
    return NotProven("the mask is not causal" + (" (it hides the diagonal)" if hidden_diag else "")
                     + "; only causal FoX attention (key j visible iff j <= query position) is rewritten")


# ---------------------------------------------------------------------------- exhaustive visibility

_MAX_POINTS = 1 << 30          # mask_mod evaluations per check (about 2 s for a plain comparison)
_MAX_SCORE_POINTS = 1 << 24    # score_mod evaluations per check, when score_mod itself can hide entries
_CHUNK = 1 << 22               # points evaluated at once (bounded memory)


def _uses(gm: fx.GraphModule, position: int) -> list:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return list(phs[position].users) if position < len(phs) else []


def _indices_only_index_buffers(score_gm: fx.GraphModule) -> bool:
    """True when score_mod uses b, h, q_idx and kv_idx only as subscripts of the tensors it reads
    (c[b, h, q_idx]): it then applies one arithmetic to what it reads at every point, and cannot
    hide an entry by comparing indices."""
    for position in range(1, 5):
        for user in _uses(score_gm, position):
            if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], tuple)
                    and isinstance(user.args[0], fx.Node) and user.args[0].op == "placeholder"):
                return False
    return True


def _visibility_checker(score_gm, mask_gm, score_values, mask_values, uniform: bool, mask_bufs: tuple):
    """check(sizes) raises NotProven unless the effective mask (mask_mod, and score_mod's -inf when
    score_mod compares indices) equals causality at every point (b, h, i, j) of those sizes."""
    uses_bh = any(_uses(mask_gm, p) for p in (0, 1)) or bool(mask_bufs)

    def check(sizes: _Sizes) -> None:
        off = sizes.Tk - sizes.Tq
        bh = [(bb, hh) for bb in range(sizes.B) for hh in range(sizes.Hq)] if (uses_bh or not uniform) else [(0, 0)]
        limit = _MAX_POINTS if uniform else _MAX_SCORE_POINTS
        if len(bh) * sizes.Tq * sizes.Tk > limit:
            raise NotProven(f"the mask is too large to decide at every point at compile time ({len(bh)} x "
                            f"{sizes.Tq} x {sizes.Tk} entries); compile at a shorter length, or call "
                            "acp_compile.fox_attention directly")
        rows_per_chunk = max(1, _CHUNK // sizes.Tk)
        g = torch.Generator().manual_seed(1)
        for bb, hh in bh:
            for r0 in range(0, sizes.Tq, rows_per_chunk):
                rows = torch.arange(r0, min(sizes.Tq, r0 + rows_per_chunk), dtype=torch.int32)
                i = rows[:, None].expand(-1, sizes.Tk).reshape(-1)
                j = torch.arange(sizes.Tk, dtype=torch.int32)[None, :].expand(rows.numel(), -1).reshape(-1)
                b = torch.full_like(i, bb)
                h = torch.full_like(i, hh)
                visible = _evaluate(mask_gm, (b, h, i, j), mask_values, "mask_mod").to(torch.bool)
                if not uniform:
                    s = torch.randn(i.shape, generator=g)
                    scored = _evaluate(score_gm, (s, b, h, i, j), score_values, "score_mod")
                    visible = visible & (scored != -math.inf)
                if not torch.equal(visible, i + off >= j):
                    raise _not_causal(visible, i + off == j)
    return check


def _size_guards(node: fx.Node, q, k, check, ctx) -> tuple:
    """Under dynamic shapes: a guard that decides the mask again for every new (B, Hq, Tq, Tk)."""
    qv, kv = example_value(q), example_value(k)
    exprs = (qv.shape[0], qv.shape[1], kv.shape[1], qv.shape[2], kv.shape[2], qv.shape[3])
    if not any(tp.is_symbolic(x) for x in exprs):
        return ()
    if ctx is None:
        raise NotProven("flex_attention with symbolic sizes needs the graph's inputs to be guarded")
    symbols: dict = {}
    for n, index in ctx.placeholder_index.items():
        value = ctx.placeholders.get(n)
        if isinstance(value, torch.SymInt) and getattr(sym_expr(value), "is_Symbol", False):
            symbols.setdefault(sym_expr(value), (n, index))
    needed = set().union(*(sym_expr(x).free_symbols for x in exprs if tp.is_symbolic(x)))
    if not needed <= set(symbols):
        raise NotProven("flex_attention's sizes depend on symbols that are not graph inputs; "
                        "its mask cannot be decided again at other sizes")
    order = sorted(needed, key=str)
    guarded = tuple(GuardedInput(symbols[sym][1], "size") for sym in order)

    def verify(inputs: list) -> bool:
        values = {sym: concrete_int(inputs[symbols[sym][1]]) for sym in order}
        concrete = [int(sym_expr(x).xreplace(values)) if tp.is_symbolic(x) else int(x) for x in exprs]
        try:
            check(_Sizes(*concrete))
        except NotProven:
            return False
        return True

    return (MaskGuard(inputs=guarded, verify=verify, site=node.name),)


# ---------------------------------------------------------------------------- the node and its operands

def _unpack(node: fx.Node):
    names = ("query", "key", "value", "score_mod", "block_mask", "scale", "kernel_options",
             "score_mod_other_buffers", "mask_mod_other_buffers")
    values = list(node.args) + [None] * (len(names) - len(node.args))
    for idx, name in enumerate(names):
        if name in node.kwargs:
            values[idx] = node.kwargs[name]
    values[7] = tuple(values[7] or ())
    values[8] = tuple(values[8] or ())
    if not isinstance(values[4], tuple) or not values[4]:
        raise NotProven("flex_attention's block_mask is not a tuple ending with a mask_mod graph")
    return values


def _output_use(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The getitem(node, 0) whose uses move to the op; other outputs (lse, max) must be unused."""
    out, dead = None, []
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            raise NotProven(f"flex_attention's result tuple is used by {user.name}, not only unpacked")
        if user.args[1] == 0:
            if out is not None:
                raise NotProven("flex_attention's output is unpacked twice")
            out = user
        elif user.users:
            raise NotProven("flex_attention's logsumexp/max output is used; only the attention output is "
                            "replaced (call flex_attention without return_lse/return_aux)")
        else:
            dead.append(user)
    if out is None:
        raise NotProven("flex_attention's output is not used")
    return out, dead


def _shape(node, name: str) -> torch.Tensor:
    value = example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        raise NotProven(f"no example tensor for flex_attention's {name}")
    return value


def _sizes(q, k, v) -> _Sizes:
    qv, kv, vv = _shape(q, "query"), _shape(k, "key"), _shape(v, "value")
    if not (qv.dim() == kv.dim() == vv.dim() == 4):
        raise NotProven("flex_attention inputs are not 4-d (B, H, T, D)")
    if not (qv.dtype == kv.dtype == vv.dtype) or not qv.dtype.is_floating_point:
        raise NotProven(f"q, k, v dtypes differ or are not float: {qv.dtype}, {kv.dtype}, {vv.dtype}")
    if any(sym_expr(a) != sym_expr(b) for a, b in zip(kv.shape[:3], vv.shape[:3])):
        raise NotProven("k and v differ in batch, heads or length (only the value head dim may differ)")
    if sym_expr(qv.shape[0]) != sym_expr(kv.shape[0]) or sym_expr(qv.shape[3]) != sym_expr(kv.shape[3]):
        raise NotProven("q and k differ in batch or head dim")
    Tq, Tk = (sym_expr(qv.shape[2]), sym_expr(kv.shape[2]))
    sizes = _Sizes(*(concrete_int(x) for x in (qv.shape[0], qv.shape[1], kv.shape[1], qv.shape[2],
                                                 kv.shape[2], qv.shape[3])))
    if sizes.Hq % sizes.Hkv or sizes.Tq > sizes.Tk or min(sizes.B, sizes.Tq, sizes.D) < 1:
        raise NotProven(f"unsupported shapes q {tuple(qv.shape)}, k {tuple(kv.shape)} (need Hq % Hkv == 0, Tq <= Tk)")
    if Tq != Tk and sizes.Tq == sizes.Tk:
        raise NotProven("Tq and Tk are different symbols with equal example values: the causal offset of the "
                        "mask cannot be proven for all sizes")
    return sizes


def _subgraph(node: fx.Node, ref, what: str) -> fx.GraphModule:
    root = node.graph.owning_module
    if not isinstance(ref, fx.Node) or ref.op != "get_attr" or root is None:
        raise NotProven(f"flex_attention's {what} is not a traced subgraph")
    sub = getattr(root, ref.target, None)
    if not isinstance(sub, fx.GraphModule):
        raise NotProven(f"flex_attention's {what} is not a traced subgraph")
    return sub


# ---------------------------------------------------------------------------- block tables

_KV_TABLES = slice(2, 6)    # BlockMask.as_tuple(): Q_LEN, KV_LEN, kv_num_blocks, kv_indices, full_kv_num, full_kv_idx, ...


def block_tables_are_causal(kv_num, kv_idx, full_num, full_idx, Tq: int, Tk: int, q_block: int, kv_block: int) -> bool:
    """True when flex_attention with these tables and a causal mask_mod computes exactly causal attention.

    kv_num (B', H', M') int, kv_idx (B', H', M', N') int: the partial key blocks of each query block (the
    first kv_num entries of kv_idx count); full_num / full_idx the same for full blocks (or None). B', H'
    broadcast. With off = Tk - Tq, block (m, n) holds a causal entry when n*kv_block <= last row of m + off,
    and is causal throughout when the last key of n <= first row of m + off.
    """
    Mq, Nk = -(-Tq // q_block), -(-Tk // kv_block)
    if kv_num.shape[-1] < Mq or (full_num is not None and full_num.shape[-1] < Mq):
        return False

    def listed(num, idx):                                            # (B', H', Mq, Nk) bool
        num, idx = num[..., :Mq].long(), idx[..., :Mq, :].long()
        valid = torch.arange(idx.shape[-1]) < num[..., None]
        width = max(Nk, int(idx.max()) + 1 if idx.numel() else Nk)
        hits = torch.zeros(*idx.shape[:-1], width + 1, dtype=torch.bool)
        hits.scatter_(-1, torch.where(valid, idx.clamp(0, width - 1), width), True)
        return hits[..., :Nk]

    partial = listed(kv_num, kv_idx)
    full = listed(full_num, full_idx) if full_num is not None else torch.zeros_like(partial)
    off = Tk - Tq
    first_row = torch.arange(Mq) * q_block
    last_row = torch.clamp(first_row + q_block, max=Tq) - 1
    first_key = torch.arange(Nk) * kv_block
    last_key = torch.clamp(first_key + kv_block, max=Tk) - 1
    has_causal = first_key[None, :] <= last_row[:, None] + off                # (Mq, Nk)
    all_causal = last_key[None, :] <= first_row[:, None] + off
    return bool(((partial | full) | ~has_causal).all() and (~full | all_causal).all())


def _block_table_guards(node: fx.Node, block_mask: tuple, sizes: _Sizes, ctx) -> tuple:
    tables = list(block_mask[_KV_TABLES])
    q_block, kv_block = block_mask[-3], block_mask[-2]
    external = [t for t in tables if isinstance(t, fx.Node) and t.op in ("placeholder", "get_attr")]
    if not external:
        return ()                                     # computed in the graph from the proven mask_mod
    if any(isinstance(x, fx.Node) for x in (q_block, kv_block)) or not all(
            isinstance(t, fx.Node) or t is None for t in tables):
        raise NotProven("the BlockMask's block sizes are not constants; its tables cannot be checked")
    if any(t.op == "get_attr" for t in external):
        root = node.graph.owning_module
        values = [_get_attr(root, t.target) if isinstance(t, fx.Node) else None for t in tables]
        if not block_tables_are_causal(*values, sizes.Tq, sizes.Tk, int(q_block), int(kv_block)):
            raise NotProven("the BlockMask's block tables skip causal blocks or mark partly masked blocks full")
        return ()
    if ctx is None or any(t.op != "placeholder" or t not in ctx.placeholder_index for t in tables if t is not None):
        raise NotProven("the BlockMask's block tables are neither inputs nor computed in the graph")
    if any(sym_expr(x) != int(concrete_int(x)) for x in _symbolic_lengths(node)):
        raise NotProven("a BlockMask passed into a graph with dynamic sequence lengths cannot be re-checked; "
                        "build it inside the compiled function or compile with dynamic=False")
    positions = [ctx.placeholder_index[t] if t is not None else None for t in tables]
    Tq, Tk, qb, kb = sizes.Tq, sizes.Tk, int(q_block), int(kv_block)
    guarded = []
    for t in tables:
        if t is None:
            continue
        example = ctx.placeholders.get(t)
        kind = input_kind(tp.graph_input_source(t), example)
        if kind == "data" and getattr(example, "device", None) is not None and example.device.type != "cpu":
            raise NotProven(
                "the BlockMask's tables are passed into the compiled code: their contents would have to be "
                f"checked on every call, which costs a device sync on {example.device}; build the BlockMask "
                "inside the compiled function, keep its tables in registered buffers, or call "
                "acp_compile.fox_attention directly")
        guarded.append(GuardedInput(ctx.placeholder_index[t], kind))

    def verify(inputs: list) -> bool:
        return block_tables_are_causal(*(inputs[i] if i is not None else None for i in positions), Tq, Tk, qb, kb)

    # Fake example inputs (DDP's graph splitter compiles each piece on them) carry no tables to read:
    # the guard verifies them on the first real call instead.
    if not any(tp.has_no_data(ctx.example_inputs[i]) for i in positions if i is not None) and not verify(ctx.example_inputs):
        raise NotProven("the BlockMask's block tables skip causal blocks or mark partly masked blocks full")
    return (MaskGuard(inputs=tuple(guarded), verify=verify, site=node.name),)


def _symbolic_lengths(node: fx.Node) -> list:
    return [example_value(node.args[0]).shape[2], example_value(node.args[1]).shape[2]]


def _get_attr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------- concrete evaluation

def _canonical(node):
    """The node a buffer copies: follows clone/contiguous and dtype-preserving casts (never detach:
    a detached copy stops the gradient into c and so is not the same as the original)."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function"):
        target = node.target
        name = target if node.op == "call_method" else getattr(target, "__name__", "")
        src = node.args[0] if node.args else None
        if name not in ("clone", "contiguous", "to", "float", "type_as") or not isinstance(src, fx.Node):
            break
        before, after = example_value(src), example_value(node)
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                and before.dtype == after.dtype and before.shape == after.shape):
            break
        node = src
    return node


def _random_buffers(bufs: tuple, rng: torch.Generator, what: str):
    """Fresh values for the buffers a closure reads: copies of one tensor get the same values.
    Returns (values, class id per buffer)."""
    values, classes, by_root = [], [], {}
    for buf in bufs:
        value = example_value(buf) if isinstance(buf, fx.Node) else buf
        if isinstance(value, torch.SymInt) or isinstance(value, int):
            values.append(concrete_int(value))
            classes.append(None)
            continue
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            raise NotProven(f"{what} reads a {getattr(value, 'dtype', type(value).__name__)} value whose contents "
                            f"the proof cannot choose; only float tensors (the gate) are supported")
        root = _canonical(buf)
        key = root if isinstance(root, fx.Node) else id(root)
        if key not in by_root:
            shape = tuple(concrete_int(s) for s in value.shape)
            by_root[key] = (len(by_root), (-4.0 * torch.rand(shape, generator=rng)).to(value.dtype))
        cls, tensor = by_root[key]
        values.append(tensor)
        classes.append(cls)
    return values, classes


def _probe_points(sizes: _Sizes, rng: torch.Generator):
    """Flat int32 index vectors (b, h, i, j) over sampled rows and columns, with the diagonal band."""
    off = sizes.Tk - sizes.Tq
    rows = _sample(sizes.Tq, _ROW_SAMPLES, rng)                                      # (R,)
    if sizes.Tk <= _FULL_COLS:
        cols = torch.arange(sizes.Tk).expand(rows.numel(), sizes.Tk)                   # (R, C)
    else:
        band = (rows[:, None] + off + torch.arange(-2, 3)).clamp(0, sizes.Tk - 1)     # (R, 5)
        cols = torch.cat([band, _sample(sizes.Tk, _COL_SAMPLES, rng).expand(rows.numel(), -1)], dim=1)
    bs, hs = _sample(sizes.B, 2, rng), _sample(sizes.Hq, 3, rng)
    shape = (bs.numel(), hs.numel(), *cols.shape)                                      # (nb, nh, R, C)
    b = bs[:, None, None, None].expand(shape)
    h = hs[None, :, None, None].expand(shape)
    i = rows[None, None, :, None].expand(shape)
    j = cols[None, None].expand(shape)
    return tuple(t.reshape(-1).to(torch.int32) for t in (b, h, i, j))


def _sample(n: int, k: int, rng: torch.Generator) -> torch.Tensor:
    if n <= k:
        return torch.arange(n)
    picks = torch.randperm(n - 2, generator=rng)[: k - 2] + 1
    return torch.cat([torch.tensor([0, n - 1]), picks]).sort().values


def _evaluate(gm: fx.GraphModule, args: tuple, buffers: list, what: str) -> torch.Tensor:
    """gm applied point by point (vmap over the flat index vectors), as flex_attention applies it."""
    n_points = args[0].shape[0]
    fn = torch.func.vmap(lambda *a: gm(*a, *buffers), in_dims=(0,) * len(args))
    try:
        with torch.no_grad():
            out = fn(*args)
    except Exception as err:  # noqa: BLE001 - any failure means "not proven", with the reason shown
        raise NotProven(f"{what} could not be evaluated on concrete inputs ({type(err).__name__}: {err})") from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise NotProven(f"{what} did not return a tensor")
    return out.expand(n_points) if out.dim() == 0 else out.reshape(n_points)


def _find_gate(bias, points, bufs, values, classes, sizes: _Sizes):
    """The buffer (and its layout) with bias == X[b, h, i + off] - Y[b, h, j], X and Y copies of one tensor."""
    b, h, iq, j = (p.long() for p in points)
    for idx, (buf, value, cls) in enumerate(zip(bufs, values, classes)):
        if cls is None or value.dim() != 3:
            continue
        for layout, shape in (("bht", (sizes.B, sizes.Hq, sizes.Tk)), ("bth", (sizes.B, sizes.Tk, sizes.Hq))):
            if tuple(value.shape) != shape:
                continue
            pick = (lambda t: value.float()[b, h, t]) if layout == "bht" else (lambda t: value.float()[b, t, h])
            if torch.allclose(bias, pick(iq) - pick(j), atol=_ATOL, rtol=0):
                return buf, layout                # the node flex reads (a copy keeps its layout)
    reversed_hint = any(
        cls is not None and v.dim() == 3 and tuple(v.shape) == (sizes.B, sizes.Hq, sizes.Tk)
        and torch.allclose(bias, v.float()[b, h, j] - v.float()[b, h, iq], atol=_ATOL, rtol=0)
        for v, cls in zip(values, classes))
    if reversed_hint:
        raise NotProven("score_mod adds c[kv_idx] - c[q_idx], the FoX bias reversed")
    raise NotProven("score_mod's bias is not c[b, h, q_idx] - c[b, h, kv_idx] for one gate tensor c of shape "
                    "(B, Hq, Tk) or (B, Tk, Hq) (a second copy must be a clone of the first, not another tensor)")


def _gate_builder(c_node: fx.Node, layout: str):
    value = example_value(c_node)
    if layout == "bht" and value.dtype == torch.float32:
        return c_node

    def build(graph: fx.Graph) -> fx.Node:
        c = c_node
        if layout == "bth":        # (B, T, H) -> (B, H, T); contiguous: c is small, and a strided c trips the
            c = graph.call_method("contiguous", (graph.call_function(torch.permute, (c, (0, 2, 1))),))  # CPU path
        if value.dtype != torch.float32:
            c = graph.call_method("float", (c,))
        return c
    return build


def _scale(scale, head_dim: int):
    """flex's scale as the op's sm_scale: None when it is the default 1/sqrt(D), so the op computes it."""
    if isinstance(scale, fx.Node) or scale is None:
        return scale
    if isinstance(scale, (int, float)) and math.isclose(float(scale), 1.0 / math.sqrt(head_dim), rel_tol=1e-12):
        return None
    return float(scale)


register_anchor(FlexAnchor())
