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
