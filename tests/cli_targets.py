"""Targets for the CLI tests."""
import torch
from torch import nn

from models import MLP


def mlp():
    torch.manual_seed(0)
    return MLP(), (torch.randn(2, 3, 16),)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def uncapturable():
    return nn.Sequential(nn.Linear(4, 4), _Branchy()), (torch.randn(2, 4),)


def not_a_tuple():
    return MLP()


def raises():
    raise ValueError("no weights here")


class _VocabMLP(nn.Module):
    """50257 (GPT-2's vocab) does not divide by 2: an uneven column/row split."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 50257), nn.Linear(50257, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def vocab():
    torch.manual_seed(0)
    return _VocabMLP(), (torch.randn(2, 3, 16),)


class _Heads(nn.Module):
    """A 4096-wide q projection viewed as 32 heads of 128: on 6 ranks a head-boundary split."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(4096, 4096, bias=False), nn.Linear(4096, 4096, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        h = self.q(x).view(b, s, 32, 128).softmax(-1)  # per head: splits heads, never head_dim
        return self.o(h.reshape(b, s, d))


def heads():
    with torch.device("meta"):
        model = _Heads()
    return model, (torch.randn(2, 3, 4096, device="meta"),)


class _FailsOnRanks(nn.Module):
    """Loads fine in the CLI's own process; fails only in a rank process (``autotp run``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        import torch.distributed as dist
        if dist.is_initialized():
            raise RuntimeError("only in a rank process")
        return self.lin(x)


def fails_on_ranks():
    return _FailsOnRanks(), (torch.randn(2, 4),)


class _Cum(nn.Module):
    """A weight read only by an op without a sharding rule (cumsum)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return x @ torch.cumsum(self.w, 0)


class _Whole(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk, self.lin = _Cum(), nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(self.blk(x))


def whole():
    torch.manual_seed(0)
    return _Whole(), (torch.randn(2, 3, 16),)


def llama_decode():
    """A Llama at 7B width with GQA (32 heads, 8 kv heads), 2 layers, on the meta device, bf16,
    prompt (1, 512): at this width a layer's weights take ~120 µs to read on an h100, so the
    decode step pays two all-reduces per layer to read a quarter of them (at hidden 1024 it
    would not: the solver replicates, rightly)."""
    import sys
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.hf_models import llama
    return llama(n_layer=2, hidden=4096, heads=32, kv_heads=8, intermediate=11008, vocab=32000,
                 batch=1, seq=512, meta=True, dtype=torch.bfloat16)
