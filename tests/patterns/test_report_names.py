"""Report names stay the module path from the root when one compiled graph serves several modules
(per-block compile, as under FSDP2) and leave out wrappers (torch.compile's _orig_mod, DataParallel).
The distributed FSDP2 run checks the same in tests/distributed."""
from __future__ import annotations

import pytest
import torch

import acp_compile
from acp_compile import report


class Attn(torch.nn.Module):
    def __init__(self, d=32, h=2, with_params=True):
        super().__init__()
        self.h = h
        self.qkv = torch.nn.Linear(d, 3 * d) if with_params else None
        self.fg = torch.nn.Linear(d, h) if with_params else None

    def core(self, q, k, v, c):
        T = q.shape[-2]
        a = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + c[..., :, None] - c[..., None, :]
        a = a.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return a.softmax(-1) @ v

    def forward(self, x, qkv=None, fg=None):
        B, T, d = x.shape
        qkv = self.qkv(x) if qkv is None else qkv(x)
        q, k, v = qkv.view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        c = torch.nn.functional.logsigmoid((self.fg if fg is None else fg)(x)).transpose(1, 2).cumsum(-1)
        return self.core(q, k, v, c).transpose(1, 2).reshape(B, T, d)


class TwoSites(Attn):
    def forward(self, x):
        return super().forward(x) + super().forward(x.flip(1))


class CoreOnly(torch.nn.Module):                 # a parameter-free attention module inside the block
    def forward(self, q, k, v, c):
        return Attn.core(self, q, k, v, c)


class Block(torch.nn.Module):
    def __init__(self, kind="plain"):
        super().__init__()
        self.ln = torch.nn.LayerNorm(32)
        if kind == "core":
            self.qkv, self.fg, self.attn = torch.nn.Linear(32, 96), torch.nn.Linear(32, 2), CoreOnly()
        else:
            self.attn = TwoSites() if kind == "two" else Attn()
        self.kind = kind

    def forward(self, x):
        y = self.ln(x)
        if self.kind == "core":
            B, T, d = y.shape
            q, k, v = self.qkv(y).view(B, T, 3, 2, 16).permute(2, 0, 3, 1, 4)
            c = torch.nn.functional.logsigmoid(self.fg(y)).transpose(1, 2).cumsum(-1)
            return x + self.attn(q, k, v, c).transpose(1, 2).reshape(B, T, d)
        return x + self.attn(y)


class Model(torch.nn.Module):
    def __init__(self, kind="plain", n=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(kind) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


OPTS = {"report": True}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    report.reset()
    acp_compile.clear_compilations()
    yield
    report.reset()


def _names():
    return sorted(s.site for s in report.sites())


def test_per_block_compile_names_every_block():
    m = Model()
    for layer in m.layers:
        layer.compile(backend="acp", options=OPTS)
    m(torch.randn(2, 8, 32))
    assert _names() == ["layers.0.attn", "layers.1.attn", "layers.2.attn"]


def test_two_sites_in_one_module_keep_their_tag():
    m = Model("two", n=2)
    for layer in m.layers:
        layer.compile(backend="acp", options=OPTS)
    m(torch.randn(2, 8, 32))
    assert _names() == ["layers.0.attn", "layers.0.attn#2", "layers.1.attn", "layers.1.attn#2"]


def test_a_parameter_free_attention_module_is_named_through_its_block():
    m = Model("core", n=2)
    for layer in m.layers:
        layer.compile(backend="acp", options=OPTS)
    m(torch.randn(2, 8, 32))
    assert _names() == ["layers.0.attn", "layers.1.attn"]


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrappers_are_left_out(wrap):
    m = Model(n=2)
    if wrap == "compile":
        model = torch.compile(m, backend="acp", options=OPTS)
    else:
        model = torch.compile(torch.nn.DataParallel(m), backend="acp", options=OPTS)
    model(torch.randn(2, 8, 32))
    assert _names() == ["layers.0.attn", "layers.1.attn"]


def test_functional_code_keeps_the_compile_time_name():
    attn = Attn()

    def f(x):                                    # parameters passed as plain tensors: no module holds them
        return attn(x)
    torch.compile(f, backend="acp", options=OPTS)(torch.randn(2, 8, 32))
    assert len(report.sites()) == 1
    assert report.sites()[0].site                # a name, whatever the frame gives
