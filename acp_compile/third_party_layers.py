"""Fused helper layers of FoX models (the FoX authors' Hugging Face model, fla), traced as plain PyTorch
under backend "acp".

    register_known_layer_functions()    # idempotent and cheap; called next to register_known_fox_functions

Why: the FoX authors' ForgettingTransformerForCausalLM calls hand-written Triton kernels besides its
attention (fused RMSNorm/GroupNorm, a gated output norm, a token shift, GLU linears, a fused
cross-entropy). Dynamo cannot trace them (the norm's autograd.Function fails inside Dynamo with
"'SymNodeVariable' object has no attribute 'value'"), so the model cannot be compiled at all. While
Dynamo traces for backend "acp", each of these functions is replaced by the equivalent below, written
from the math: the same signature, the same forward result (inputs upcast to fp32, the result cast back
as the fused kernel does), differentiable by autograd; inductor then fuses them itself. Every other
backend, and every eager call, runs the original function.

Functions (only when their module is already imported; a missing package is skipped silently):
  forgetting_transformer.model.forgetting_transformer.layernorm      layer_norm, group_norm, rms_norm
  forgetting_transformer.model.forgetting_transformer.fuse_norm_gate layer_norm_gated, rms_norm_gated,
                                                                      group_norm_gated
  forgetting_transformer.model.forgetting_transformer.token_shift    token_shift(x, prev_weight, curr_weight)
  forgetting_transformer.model.forgetting_transformer.glu_linear     glu_linear, swiglu_linear (aliases of
                                                 autograd.Function.apply: their forward and backward are replaced)
  forgetting_transformer.model.forgetting_transformer.fused_cross_entropy  cross_entropy_loss
  fla.modules.layernorm                 layer_norm, group_norm, rms_norm
  fla.modules.fused_norm_gate           layer_norm_gated, rms_norm_gated
  fla.modules.activations               swiglu_linear
  fla.modules.fused_cross_entropy       cross_entropy_loss (not with logit_softcapping)
A call the equivalent does not cover (a process_group: tensor-parallel cross-entropy; a logit
soft-capping; an unknown activation) runs the original and counts a near-miss. fla's token_shift is a
different function (x[t-1] - x[t] with a cache) and is not redirected.

Mechanism: torch.compiler.substitute_in_graph, as in third_party.py; the backend decision is one function
marked torch.compiler.assume_constant_result, so it is a constant of the traced graph.
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from acp_compile._torch_private import acp_counters, logger
from acp_compile.third_party import _copy_of, _tracing_acp_config

log = logger()


# ----------------------------------------------------------------------------------------------------
# Equivalents, from the math. Names of parameters are those of the fused functions.

def _apply_gate(y: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    g = g.float()
    if activation in ("swish", "silu"):
        return y * F.silu(g)
    return y * torch.sigmoid(g)          # "sigmoid"


def norm_equivalent(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                    is_rms_norm=False, num_groups=1, g=None, activation="swish"):
    """(Group/RMS) layer norm over the last dim split into num_groups groups, with an optional residual
    added first (the sum is the second output under prenorm) and an optional output gate act(g).

    In fp32: h = x + residual; per group, y = (h - mean) / sqrt(var + eps) (no mean for RMS) * w + b;
    y *= act(g); y is cast to x's dtype. The residual output is h in the residual's dtype (fp32 with
    residual_in_fp32 and no residual, else x's dtype)."""
    h = x.float()
    if residual is not None:
        h = h + residual.float()
        residual_dtype = residual.dtype
    else:
        residual_dtype = torch.float32 if residual_in_fp32 else x.dtype
    groups = h.unflatten(-1, (num_groups, h.shape[-1] // num_groups))
    if not is_rms_norm:
        groups = groups - groups.mean(dim=-1, keepdim=True)
    y = (groups * torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)).flatten(-2)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if g is not None:
        y = _apply_gate(y, g, activation)
    y = y.to(x.dtype)
    return (y, h.to(residual_dtype)) if prenorm else y


def layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, is_rms_norm=False):
    return norm_equivalent(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm)


def group_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
               is_rms_norm=False, num_groups=1):
    return norm_equivalent(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, num_groups)


def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return norm_equivalent(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True)


def layer_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                     residual_in_fp32=False, eps=1e-6):
    return norm_equivalent(x, weight, bias, residual, eps, prenorm, residual_in_fp32, False, 1, g, activation)


def rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                   residual_in_fp32=False, eps=1e-6):
    return norm_equivalent(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True, 1, g, activation)


def group_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                     residual_in_fp32=False, is_rms_norm=False, num_groups=1, eps=1e-6):
    return norm_equivalent(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm, num_groups,
                           g, activation)


def token_shift(x, prev_weight, curr_weight):
    """x (B, T, H, D), weights (B, T, H): out_t = curr_t x_t + prev_t x_{t-1} (x_{-1} = 0), in fp32, cast
    back to x's dtype."""
    x32 = x.float()
    previous = F.pad(x32, (0, 0, 0, 0, 1, 0))[:, :-1]
    out = x32 * curr_weight.float().unsqueeze(-1) + previous * prev_weight.float().unsqueeze(-1)
    return out.to(x.dtype)


def _gated(x, y, swish: bool):
    """act(x) * y in fp32, in the inputs' dtype: act = sigmoid (GLU) or x sigmoid(x) (SwiGLU)."""
    x32 = x.float()
    act = F.silu(x32) if swish else torch.sigmoid(x32)
    return (act * y.float()).to(torch.promote_types(x.dtype, y.dtype))


def glu_linear(x, y, weight, bias):
    return F.linear(_gated(x, y, swish=False).to(weight.dtype), weight, bias)


def swiglu_linear(x, y, weight, bias):
    return F.linear(_gated(x, y, swish=True).to(weight.dtype), weight, bias)


def cross_entropy_loss(logits, target, label_smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0,
                       ignore_index=-100, inplace_backward=False, process_group=None, logit_softcapping=None):
    """Per-row losses and z-losses, fp32: s = logit_scale * logits; lse = logsumexp(s);
    loss = lse - (1 - ls) s[target] - ls mean(s) + z with z = lse_square_scale lse^2; rows whose target is
    ignore_index give 0. z is returned without a gradient (it is for logging; its gradient is in loss).
    inplace_backward only saves memory in the fused kernel; here the logits are left as they are."""
    s = logits.float() * logit_scale
    lse = torch.logsumexp(s, dim=-1)
    ignored = target == ignore_index
    picked = s.gather(-1, torch.where(ignored, 0, target).unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0.0:
        loss = lse - (1.0 - label_smoothing) * picked - label_smoothing * s.mean(dim=-1)
    else:
        loss = lse - picked
    z = lse_square_scale * lse * lse
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(ignored, zero, loss + z), torch.where(ignored, zero, z).detach()


# autograd.Function aliases (`glu_linear = GLULinearFunction.apply`): Dynamo traces the Function's own
# forward and backward, so those two are replaced. forward(ctx, x, y, weight, bias) -> act(x) y W^T + b.

def _glu_linear_function_forward(swish: bool):
    def forward(ctx, x, y, weight, bias):
        ctx.save_for_backward(x, y, weight)
        ctx.linear_bias_is_none = bias is None
        return F.linear(_gated(x, y, swish).to(weight.dtype), weight, bias)
    return forward


def _glu_linear_function_backward(swish: bool):
    def backward(ctx, dout, *unused):
        x, y, weight = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1])
        dz = (dout2 @ weight).view_as(x).float()
        x32, y32 = x.float(), y.float()
        s = torch.sigmoid(x32)
        if swish:      # d/dx [x s(x)] = s (1 + x (1 - s))
            act, dact = x32 * s, s * (1.0 + x32 * (1.0 - s))
        else:          # d/dx s(x) = s (1 - s)
            act, dact = s, s * (1.0 - s)
        dx = (dz * y32 * dact).to(x.dtype)
        dy = (dz * act).to(y.dtype)
        z = (act * y32).to(torch.promote_types(x.dtype, y.dtype)).reshape(-1, x.shape[-1])
        dweight = dout2.mT @ z.to(dout2.dtype)
        dbias = None if ctx.linear_bias_is_none else dout2.sum(0)
        return dx, dy, dweight, dbias
    return backward


# ----------------------------------------------------------------------------------------------------
# Registry.

@dataclass(frozen=True)
class KnownLayer:
    """A third-party fused function and its traceable equivalent."""
    module: str
    attr: str
    equivalent: Callable              # same parameter names; extra keyword parameters allowed
    unsupported: tuple = ()           # (name, allowed values): anything else runs the original


AUTHORS = "forgetting_transformer.model.forgetting_transformer"
_GATE_ACTIVATIONS = ("activation", ("swish", "silu", "sigmoid"))

KNOWN_LAYER_FUNCTIONS = (
    KnownLayer(f"{AUTHORS}.layernorm", "layer_norm", layer_norm),
    KnownLayer(f"{AUTHORS}.layernorm", "group_norm", group_norm),
    KnownLayer(f"{AUTHORS}.layernorm", "rms_norm", rms_norm),
    KnownLayer(f"{AUTHORS}.fuse_norm_gate", "layer_norm_gated", layer_norm_gated, (_GATE_ACTIVATIONS,)),
    KnownLayer(f"{AUTHORS}.fuse_norm_gate", "rms_norm_gated", rms_norm_gated, (_GATE_ACTIVATIONS,)),
    KnownLayer(f"{AUTHORS}.fuse_norm_gate", "group_norm_gated", group_norm_gated, (_GATE_ACTIVATIONS,)),
    KnownLayer(f"{AUTHORS}.token_shift", "token_shift", token_shift),
    KnownLayer(f"{AUTHORS}.glu_linear", "glu_linear", glu_linear),
    KnownLayer(f"{AUTHORS}.glu_linear", "swiglu_linear", swiglu_linear),
    KnownLayer(f"{AUTHORS}.fused_cross_entropy", "cross_entropy_loss", cross_entropy_loss,
               (("process_group", (None,)),)),
    KnownLayer("fla.modules.layernorm", "layer_norm", layer_norm),
    KnownLayer("fla.modules.layernorm", "group_norm", group_norm),
    KnownLayer("fla.modules.layernorm", "rms_norm", rms_norm),
    KnownLayer("fla.modules.fused_norm_gate", "layer_norm_gated", layer_norm_gated, (_GATE_ACTIVATIONS,)),
    KnownLayer("fla.modules.fused_norm_gate", "rms_norm_gated", rms_norm_gated, (_GATE_ACTIVATIONS,)),
    KnownLayer("fla.modules.activations", "swiglu_linear", swiglu_linear),
    KnownLayer("fla.modules.fused_cross_entropy", "cross_entropy_loss", cross_entropy_loss,
               (("process_group", (None,)), ("logit_softcapping", (None,)))),
)

_registered: dict[int, Callable] = {}      # id(substituted function) -> its polyfill


def register_known_third_party() -> None:
    """Both registrations, the attention functions (third_party.py) and these layers: what backend "acp" and the
    decorator call where they are set up, and what acp_compile/import_hook.py calls after a late import."""
    from acp_compile.third_party import register_known_fox_functions
    register_known_fox_functions()
    register_known_layer_functions()


def register_known_layer_functions() -> list[str]:
    """Registers every known fused helper whose module is already imported; returns their names."""
    names = []
    for known in KNOWN_LAYER_FUNCTIONS:
        module = sys.modules.get(known.module)
        fn = getattr(module, known.attr, None) if module is not None else None
        if fn is not None and register_layer_function(fn, known):
            names.append(f"{known.module}.{known.attr}")
    return names


def register_layer_function(fn: Callable, known: KnownLayer) -> bool:
    """Makes Dynamo trace `fn` as `known.equivalent` under backend "acp" (idempotent; False when not
    possible). `fn` is a plain function, or the `apply` of a torch.autograd.Function whose forward
    takes (ctx, x, y, weight, bias) (the GLU linears)."""
    if _is_function_apply(fn):
        return _register_function_class(fn.__self__, known)
    if id(fn) in _registered:
        return True
    if not isinstance(fn, types.FunctionType):
        log.debug("acp: %s.%s is not a plain Python function; calls to it are left as they are",
                  known.module, known.attr)
        return False
    signature = inspect.signature(fn)
    accepted = set(inspect.signature(known.equivalent).parameters)
    if not set(signature.parameters) <= accepted:
        log.info("acp: %s.%s has an unknown signature %s; calls to it are left as they are",
                 known.module, known.attr, signature)
        return False
    return _substitute(fn, _make_polyfill(fn, known, signature), known)


def _is_function_apply(fn) -> bool:
    owner = getattr(fn, "__self__", None)
    return (isinstance(fn, types.MethodType) and getattr(fn, "__name__", "") == "apply"
            and isinstance(owner, type) and issubclass(owner, torch.autograd.Function))


def _register_function_class(cls: type, known: KnownLayer) -> bool:
    forward, backward = cls.forward, cls.backward
    swish = {glu_linear: False, swiglu_linear: True}.get(known.equivalent)
    if swish is None or not isinstance(forward, types.FunctionType) or not isinstance(backward, types.FunctionType):
        log.info("acp: %s.%s is an autograd.Function with no known equivalent; left as it is",
                 known.module, known.attr)
        return False
    if list(inspect.signature(forward).parameters)[1:] != ["x", "y", "weight", "bias"]:
        log.info("acp: %s.%s has an unknown forward signature; calls to it are left as they are",
                 known.module, known.attr)
        return False
    label = f"{known.module}.{known.attr}"
    ok = True
    for original, replacement in ((forward, _glu_linear_function_forward(swish)),
                                  (backward, _glu_linear_function_backward(swish))):
        if id(original) not in _registered:
            ok = _substitute(original, _switch(original, replacement, label, always_exact=True), known) and ok
    return ok


def _substitute(fn: types.FunctionType, polyfill: Callable, known: KnownLayer) -> bool:
    try:
        torch.compiler.substitute_in_graph(fn, skip_signature_check=True)(polyfill)
    except (ValueError, TypeError) as err:   # already substituted by someone else: leave theirs
        log.info("acp: %s.%s cannot be substituted (%s); it is left as it is", known.module, known.attr, err)
        return False
    _registered[id(fn)] = polyfill
    return True


def _switch(fn: types.FunctionType, replacement: Callable, label: str, always_exact: bool) -> Callable:
    """A polyfill that runs `replacement` under backend "acp", else a copy of `fn`'s own code."""
    original = _copy_of(fn)

    @functools.wraps(fn)
    def polyfill(*args, **kwargs):
        if _acp_layer_active(label, True):
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    return polyfill


def _make_polyfill(fn: types.FunctionType, known: KnownLayer, signature: inspect.Signature) -> Callable:
    original = _copy_of(fn)
    equivalent = known.equivalent
    positional = [n for n, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    defaults = {n: p.default for n, p in signature.parameters.items() if p.default is not p.empty}
    accepted = frozenset(signature.parameters)
    label = f"{known.module}.{known.attr}"
    unsupported = tuple(known.unsupported)     # plain tuples in the closure: Dynamo inlines this function

    @functools.wraps(fn)
    def polyfill(*args, **kwargs):
        params = dict(defaults)
        params.update(zip(positional, args))
        params.update(kwargs)
        exact = (len(args) <= len(positional) and all(name in accepted for name in kwargs)
                 and all(_allowed(params.get(name), allowed) for name, allowed in unsupported))
        if _acp_layer_active(label, exact):
            return equivalent(**params)
        return original(*args, **kwargs)

    return polyfill


def _allowed(value, allowed: tuple) -> bool:
    """value is one of `allowed` (None, or strings), by identity for None (a process group has no
    equality Dynamo can trace)."""
    return any(value is None if a is None else (isinstance(value, str) and value == a) for a in allowed)


@torch.compiler.assume_constant_result
def _acp_layer_active(label: str, exact: bool) -> bool:
    """At trace time: True when backend "acp" is tracing and the call is one the equivalent covers."""
    if _tracing_acp_config() is None:
        return False
    if not exact:
        acp_counters()["near_miss"] += 1
        log.info("acp near-miss: %s called with options its traceable equivalent does not cover "
                 "(process_group, logit_softcapping or an unknown activation); its own kernel is traced", label)
        return False
    acp_counters()["layer_substituted"] += 1
    log.debug("acp: %s traced as plain PyTorch", label)
    return True
