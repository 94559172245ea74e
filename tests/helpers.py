"""Small models and training loops shared by the tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MixedNet(nn.Module):
    """Conv + linear layers: 4-d, 2-d, 1-d parameters with odd sizes (not multiples of 4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(3 * 3 * 3, 7)
        self.fc2 = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        x = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MixedNet().to(dtype)


def make_data(seed=1, n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 5, 5, generator=g).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss
    return closure


def train(model, opt, steps, seed=1, dtype=torch.float32):
    losses = []
    for t in range(steps):
        x, y = make_data(seed + t, dtype=dtype)
        losses.append(float(opt.step(closure_for(model, opt, x, y)).detach()))
    return losses


def snapshot(model, opt):
    """Mean, momentum and precision of every parameter, as float64 copies."""
    out = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        out[name] = p.detach().double().clone()
        out[name + ".gm"] = st["momentum"].double().clone()
        out[name + ".s"] = st["precision"].double().clone()
        if "mean" in st:
            out[name + ".mean"] = st["mean"].double().clone()
    return out


def amp_parts(model, opt, scaler, x, y, poison=False):
    """The two passes of a GradScaler step in the phase API, up to scaler.step(opt); poison:
    an inf in the noisy gradient."""
    opt.sample_noise()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison:
        model.fc1.weight.grad[0, 0] = float("inf")
    opt.perturb(grad_scaler=scaler)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
