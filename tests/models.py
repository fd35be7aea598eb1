"""Models the tests run, each a factory returning (model, args, kwargs, make_inputs(batch, seq))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples import hf_models, nanogpt


class MLP(nn.Module):
    def __init__(self, d: int = 16, h: int = 64):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Odd(nn.Module):
    """Dims that do not divide 2 or 4 (hidden 6, 10) and an op without a rule (cumsum over the
    hidden dim) between two matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 10)
        self.c = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cumsum(self.a(x), dim=-1)
        return self.c(torch.relu(self.b(y)))


class StridedMLP(nn.Module):
    """A fused gate|up projection whose halves are taken with a stride, rows interleaved
    [g0, u0, g1, u1, ...] (as some MoE experts store them)."""

    def __init__(self, d: int = 32, h: int = 96):
        super().__init__()
        self.w1 = nn.Linear(d, 2 * h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(F.silu(h[..., ::2]) * h[..., 1::2])


class SortedExperts(nn.Module):
    """transformers 5.25's grouped experts in miniature: tokens gathered in routing order
    (``aten.index.Tensor``), a fused gate|up projection cut by ``chunk`` (``aten.chunk``), and
    the inverse permutation gathered back."""

    def __init__(self, d: int = 16, h: int = 32):
        super().__init__()
        self.w1 = nn.Linear(d, 2 * h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        perm = torch.argsort(t.sum(-1))
        gate, up = self.w1(t[perm]).chunk(2, dim=-1)
        y = self.w2(F.silu(gate) * up)
        return y[torch.argsort(perm)].view(x.shape)


class EinsumAttention(nn.Module):
    """Attention written with torch.einsum, weights shaped (hidden, heads, head_dim) and
    (heads, head_dim, hidden), and an einsum MLP with an ellipsis."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, h: int = 64):
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, heads, head_dim) / d ** 0.5) for _ in range(3))
        self.wo = nn.Parameter(torch.randn(heads, head_dim, d) / d ** 0.5)
        self.w1 = nn.Parameter(torch.randn(d, h) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(h, d) / h ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (torch.einsum("bsm,mhd->bhsd", x, w) for w in (self.wq, self.wk, self.wv))
        a = torch.softmax(torch.einsum("bhsd,bhtd->bhst", q, k) / q.shape[-1] ** 0.5, dim=-1)
        x = x + torch.einsum("bhst,bhtd,hdm->bsm", a, v, self.wo)
        return x + torch.einsum("...h,hm->...m", F.gelu(torch.einsum("...m,mh->...h", x, self.w1)), self.w2)


def _float_inputs(d: int):
    return lambda b, s: ((torch.randn(b, s, d),), {})


def _ids(vocab: int, kw: dict | None):
    def make(b: int, s: int):
        ids = torch.randint(0, vocab, (b, s))
        if kw is not None:
            return (), {**kw, "input_ids": ids}
        return (ids,), {}
    return make


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP(), (torch.randn(2, 3, 16),), {}, _float_inputs(16)
    if name == "odd":
        return Odd(), (torch.randn(2, 3, 6),), {}, _float_inputs(6)
    if name == "strided":
        return StridedMLP(), (torch.randn(2, 3, 32),), {}, _float_inputs(32)
    if name == "einsum":
        return EinsumAttention(), (torch.randn(2, 3, 32),), {}, _float_inputs(32)
    if name == "experts":
        return SortedExperts(), (torch.randn(2, 3, 16),), {}, _float_inputs(16)
    if name == "nanogpt":
        m, a = nanogpt.gpt(seed=seed)
        return m, a, {}, _ids(256, None)
    if name in UNEVEN:  # sizes 3 doesn't divide: vocab 257; 4 heads and 2 kv heads
        factory, vocab = UNEVEN[name]
        m, a, kw = factory(seed=seed)
        return m, a, kw, _ids(vocab, {k: v for k, v in kw.items() if k != "input_ids"})
    factory = {"gpt2": hf_models.gpt2, "llama": hf_models.llama, "bert": hf_models.bert,
               # deep enough for the cut capture (capture/stacks.py): exported for 4 layers, replicated
               "gpt2_6": lambda seed: hf_models.gpt2(n_layer=6, seed=seed),
               "llama_6": lambda seed: hf_models.llama(n_layer=6, seed=seed)}[name]
    m, a, kw = factory(seed=seed)
    return m, a, kw, _ids(256, {k: v for k, v in kw.items() if k != "input_ids"})


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and getattr(out, "logits", None) is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


MODELS = ["mlp", "odd", "strided", "experts", "einsum", "nanogpt", "gpt2", "llama", "bert"]
UNEVEN = {"gpt2_v257": (lambda seed: hf_models.gpt2(vocab=257, seed=seed), 257),
          "llama_h4": (lambda seed: hf_models.llama(heads=4, kv_heads=2, hidden=64, seed=seed), 256)}


def saved_activation_bytes(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """Bytes autograd keeps for the backward in one forward of ``model`` (unique storages,
    parameters and buffers excluded): what the cost model's activation memory predicts."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            kept[st.data_ptr()] = max(kept.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args, **kwargs)
    return sum(kept.values())
