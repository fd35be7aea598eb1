"""Random transformer-like models drawn from composable parts, for property-based tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


@dataclass(frozen=True)
class Arch:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    ffn: int
    vocab: int
    mlp: str  # gelu | silu | swiglu
    norm: str  # layer | rms
    fused_qkv: bool
    bias: bool
    rotary: bool
    causal: bool
    parallel: bool  # attention and MLP as parallel branches (GPT-J style)
    tied: bool
    unruled: bool  # an op without a sharding rule between matmuls
    attention: bool
    dropout: float = 0.0  # attention probs, MLP hidden and residual branches (train mode only)


class RMSNorm(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h) + 0.1 * torch.randn(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Attention(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        d = a.hidden // a.heads
        self.d = d
        if a.fused_qkv:
            self.qkv = nn.Linear(a.hidden, (a.heads + 2 * a.kv_heads) * d, bias=a.bias)
        else:
            self.q = nn.Linear(a.hidden, a.heads * d, bias=a.bias)
            self.k = nn.Linear(a.hidden, a.kv_heads * d, bias=a.bias)
            self.v = nn.Linear(a.hidden, a.kv_heads * d, bias=a.bias)
        self.o = nn.Linear(a.heads * d, a.hidden, bias=a.bias)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)),
                             persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a
        b, t, _ = x.shape
        if a.fused_qkv:
            q, k, v = self.qkv(x).split([a.heads * self.d, a.kv_heads * self.d, a.kv_heads * self.d], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, a.heads, self.d).transpose(1, 2)
        k = k.view(b, t, a.kv_heads, self.d).transpose(1, 2)
        v = v.view(b, t, a.kv_heads, self.d).transpose(1, 2)
        if a.rotary and self.d % 2 == 0:
            pos = torch.arange(t, device=x.device).float()
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None].to(q.dtype), emb.sin()[None, None].to(q.dtype)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        rep = a.heads // a.kv_heads
        if rep > 1:
            k = k[:, :, None].expand(b, a.kv_heads, rep, t, self.d).reshape(b, a.heads, t, self.d)
            v = v[:, :, None].expand(b, a.kv_heads, rep, t, self.d).reshape(b, a.heads, t, self.d)
        if a.dropout:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=a.causal,
                                               dropout_p=a.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)
        return self.o(y.transpose(1, 2).reshape(b, t, a.heads * self.d))


class MLPBlock(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        self.up = nn.Linear(a.hidden, a.ffn, bias=a.bias)
        if a.mlp == "swiglu":
            self.gate = nn.Linear(a.hidden, a.ffn, bias=a.bias)
        self.down = nn.Linear(a.ffn, a.hidden, bias=a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a
        if a.mlp == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = (F.gelu if a.mlp == "gelu" else F.silu)(self.up(x))
        if a.unruled:
            h = torch.cumsum(h, dim=-1) * 0.1  # no sharding rule: replicated, with a warning
        if a.dropout:
            h = F.dropout(h, a.dropout, self.training)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        norm = (lambda: nn.LayerNorm(a.hidden)) if a.norm == "layer" else (lambda: RMSNorm(a.hidden))
        self.n1 = norm()
        self.attn = Attention(a) if a.attention else None
        self.n2 = norm()
        self.mlp = MLPBlock(a)

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        return F.dropout(y, self.a.dropout, self.training) if self.a.dropout else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is None:
            return x + self._drop(self.mlp(self.n2(x)))
        if self.a.parallel:
            y = self.n1(x)
            return x + self._drop(self.attn(y)) + self._drop(self.mlp(y))
        x = x + self._drop(self.attn(self.n1(x)))
        return x + self._drop(self.mlp(self.n2(x)))


class RandomLM(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.hidden)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = nn.LayerNorm(a.hidden) if a.norm == "layer" else RMSNorm(a.hidden)
        self.head = nn.Linear(a.hidden, a.vocab, bias=False)
        if a.tied:
            self.head.weight = self.embed.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


@st.composite
def archs(draw: st.DrawFn) -> Arch:
    d = draw(st.sampled_from([2, 4, 6]))
    kv = draw(st.sampled_from([1, 2, 3, 4]))
    rep = draw(st.sampled_from([1, 2, 3]))
    heads = kv * rep
    return Arch(hidden=heads * d, heads=heads, kv_heads=kv, layers=draw(st.integers(1, 2)),
                ffn=draw(st.sampled_from([8, 12, 16, 20, 24])),
                vocab=draw(st.sampled_from([12, 16, 30, 32])),
                mlp=draw(st.sampled_from(["gelu", "silu", "swiglu"])),
                norm=draw(st.sampled_from(["layer", "rms"])), fused_qkv=draw(st.booleans()),
                bias=draw(st.booleans()), rotary=draw(st.booleans()), causal=draw(st.booleans()),
                parallel=draw(st.booleans()), tied=draw(st.booleans()),
                unruled=draw(st.booleans()), attention=draw(st.booleans()))


@st.composite
def dropout_archs(draw: st.DrawFn) -> Arch:
    """An arch of ``archs()`` with dropout p drawn from {0, 0.1, 0.5} (a separate strategy:
    ``archs()`` keeps drawing what it always drew, with dropout off)."""
    import dataclasses
    return dataclasses.replace(draw(archs()), dropout=draw(st.sampled_from([0.0, 0.1, 0.5])))


@st.composite
def cases(draw: st.DrawFn) -> dict:
    a = draw(archs())
    return dict(arch=a, world=draw(st.sampled_from([1, 2, 2, 3, 4, 4, 6, 8])), seed=draw(st.integers(0, 2 ** 16)),
                example=(draw(st.integers(1, 3)), draw(st.integers(2, 6))),
                run=(draw(st.integers(1, 4)), draw(st.integers(2, 9))),
                objective=draw(st.sampled_from(["memory", "memory", "time"])))
