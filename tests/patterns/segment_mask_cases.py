"""Padded batches and packed documents as models write them (issue #12 items 2 and 3), and look-alikes.

Every program takes (q, k, v, fg, data) with q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), fg (B, Hq, Tk) gate
pre-activations and data a per-call tensor: a key padding mask (B, Tk) (bool or Hugging Face's int64 0/1), per-token
document ids (B, Tk), or both as a tuple.
"""
import math

import torch
import torch.nn.functional as F

NEG = float("-inf")


def gate(fg):
    return torch.cumsum(F.logsigmoid(fg), dim=-1)


def logits(q, k, fg):
    c = gate(fg)
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + c[..., k.shape[-2] - q.shape[-2]:, None] - c[..., None, :]


def causal(Tq, Tk, device=None):
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


# ------------------------------------------------------------------ padded batches (rewritten)
def pad_and_causal(q, k, v, fg, pad):                    # one boolean keep mask, -inf fill
    keep = causal(q.shape[-2], k.shape[-2], q.device) & pad[:, None, None, :]
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def pad_where_separate(q, k, v, fg, pad):                # causal by masked_fill, padding by where, in steps
    s = logits(q, k, fg)
    s = s.masked_fill(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1 + k.shape[-2] - q.shape[-2]), NEG)
    s = torch.where(pad[:, None, None, :], s, NEG)
    return torch.softmax(s, dim=-1) @ v


def pad_hf_int(q, k, v, fg, am):                         # Hugging Face's int64 attention_mask, compared to 0
    T = q.shape[-2]
    masked = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)[None, None] | (am[:, None, None, :] == 0)
    s = logits(q, k, fg).masked_fill(masked, torch.finfo(q.dtype).min)
    return F.softmax(s.float(), dim=-1).to(q.dtype) @ v


def pad_finfo_min(q, k, v, fg, pad):                     # finite fill: rows with no visible key are uniform
    keep = causal(q.shape[-2], k.shape[-2], q.device) & pad.unsqueeze(1).unsqueeze(2)
    return logits(q, k, fg).masked_fill(~keep, torch.finfo(q.dtype).min).softmax(-1) @ v


def pad_safe_softmax(q, k, v, fg, pad):                  # NaN clean-up: rows with no visible key give 0
    keep = causal(q.shape[-2], k.shape[-2], q.device) & pad[:, None, None, :]
    p = logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1)
    return p.nan_to_num(0.0) @ v


def pad_from_token_ids(q, k, v, fg, ids):                # the padding mask computed in the graph from token ids
    keep = causal(q.shape[-2], k.shape[-2], q.device) & (ids != 0)[:, None, None, :]
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def pad_gqa_repeat(q, k, v, fg, pad):                    # grouped heads (repeat_interleave), finite fill
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return pad_finfo_min(q, k, v, fg, pad)


# ------------------------------------------------------------------ packed documents (rewritten)
def doc_eq(q, k, v, fg, doc):                            # block-diagonal causal from ids compared in the graph
    same = doc[:, None, :, None] == doc[:, None, None, :]
    keep = causal(q.shape[-2], k.shape[-2], q.device) & same
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def doc_ne_3d(q, k, v, fg, doc):                         # (B, T, T) comparison unsqueezed, != spelling, where
    other = (doc.unsqueeze(-1) != doc.unsqueeze(-2)).unsqueeze(1)
    s = logits(q, k, fg).masked_fill(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1), NEG)
    return torch.where(other, NEG, s).softmax(-1) @ v


def doc_and_pad(q, k, v, fg, data):                      # packed documents with padding
    doc, pad = data
    keep = causal(q.shape[-2], k.shape[-2], q.device) & (doc[:, None, :, None] == doc[:, None, None, :]) & pad[:, None, None, :]
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


# ------------------------------------------------------------------ look-alikes (left alone)
def pad_query_side(q, k, v, fg, pad):                    # padding applied to the queries, not the keys
    keep = causal(q.shape[-2], k.shape[-2], q.device) & pad[:, None, :, None]
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def pad_no_causal(q, k, v, fg, pad):                     # padding alone, no causal mask
    return logits(q, k, fg).masked_fill(~pad[:, None, None, :], NEG).softmax(-1) @ v


def pad_hides_diagonal(q, k, v, fg, pad):                # also hides every row's own key
    T = q.shape[-2]
    keep = causal(T, T, q.device) & ~torch.eye(T, dtype=torch.bool, device=q.device) & pad[:, None, None, :]
    keep = keep | (torch.arange(T, device=q.device) == 0)[None, None, None, :]        # row 0 keeps key 0
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def doc_no_causal(q, k, v, fg, doc):                     # documents without the causal mask
    same = doc[:, None, :, None] == doc[:, None, None, :]
    return logits(q, k, fg).masked_fill(~same, NEG).softmax(-1) @ v


def doc_ordered(q, k, v, fg, doc):                       # ids compared by order, not equality
    later = doc[:, None, :, None] < doc[:, None, None, :]
    keep = causal(q.shape[-2], k.shape[-2], q.device) & ~later
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def mask_from_q(q, k, v, fg, pad):                       # a mask from the values of q (data-dependent content)
    keep = causal(q.shape[-2], k.shape[-2], q.device) & (q.sum(-1) > -1.0)[..., :, None] & pad[:, None, None, :]
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def pad_written_after(q, k, v, fg, pad):                 # the keep mask edited in place after it was built
    keep = causal(q.shape[-2], k.shape[-2], q.device) & pad[:, None, None, :]
    keep[..., -1] = True                                  # opens the last key to every row
    return logits(q, k, fg).masked_fill(~keep, NEG).softmax(-1) @ v


def pad_additive(q, k, v, fg, pad):                      # a 4-D additive -inf mask from the padding
    keep = causal(q.shape[-2], k.shape[-2], q.device) & pad[:, None, None, :]
    add = torch.zeros(keep.shape, device=q.device).masked_fill(~keep, NEG)
    return (logits(q, k, fg) + add).softmax(-1) @ v


def pad_hf_additive(q, k, v, fg, am):                    # HF's (1 - m) * finfo.min added to the causal logits
    s = logits(q, k, fg).masked_fill(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1), NEG)
    ext = (1.0 - am[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    return (s + ext).softmax(-1) @ v


def pad_mixed_fills(q, k, v, fg, pad):                   # causal -inf, padding finfo.min: empty rows would mix them
    s = logits(q, k, fg).masked_fill(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1), NEG)
    return s.masked_fill(~pad[:, None, None, :], torch.finfo(q.dtype).min).softmax(-1) @ v


def alibi_with_padding_only(q, k, v, fg, pad):           # ALiBi-style decay with a non-causal (padding-only) mask
    T = q.shape[-2]
    rel = torch.arange(T, device=q.device)[None, :] - torch.arange(T, device=q.device)[:, None]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + 0.5 * rel
    return s.masked_fill(~pad[:, None, None, :], NEG).softmax(-1) @ v


def pad_inplace_fill(q, k, v, fg, pad):                  # masked_fill_ in place on the logits, then the softmax
    keep = causal(q.shape[-2], k.shape[-2], q.device) & pad[:, None, None, :]
    s = logits(q, k, fg)
    s.masked_fill_(keep.logical_not(), NEG)
    return s.float().softmax(-1) @ v


class BufferCausalPad(torch.nn.Module):                  # nanoGPT's causal buffer sliced to T, with padding
    def __init__(self, n=64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))

    def forward(self, q, k, v, fg, pad):
        T = q.shape[-2]
        keep = self.bias[:, :, :T, :T] & pad[:, None, None, :]
        return logits(q, k, fg).masked_fill(keep == 0, NEG).softmax(-1) @ v
