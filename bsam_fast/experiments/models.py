"""The models of the paper's experiments: MLP 784-500-300-10, LeNet-5, ResNet-20 with
filter response normalisation (FRN + TLU), and ResNet-18; and a stack of transformer
blocks over an image's rows (the benchmarks' transformer)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Fully connected 784-500-300-10 (ReLU), on flattened inputs."""

    def __init__(self, in_features: int = 784, hidden=(500, 300), classes: int = 10):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28 inputs (padding 2 on the first convolution)."""

    def __init__(self, in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class FRN(nn.Module):
    """Filter response normalisation with a thresholded linear unit (Singh & Krishnan, 2020):
    y = max(gamma * x / sqrt(mean_hw(x^2) + eps) + beta, tau). No batch statistics, so the
    model behaves the same in train and eval mode."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.tau = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x):
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        x = x * torch.rsqrt(nu2 + self.eps)
        return torch.maximum(self.gamma * x + self.beta, self.tau)


class _FRNBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.frn1 = FRN(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.frn2 = FRN(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), FRN(cout))

    def forward(self, x):
        out = self.frn2(self.conv2(self.frn1(self.conv1(x))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class ResNet20FRN(nn.Module):
    """ResNet-20 (3 stages x 3 basic blocks) with FRN instead of BatchNorm; `width` scales
    the channels (16, 32, 64) * width."""

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 1):
        super().__init__()
        c = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False), FRN(c[0]))
        blocks, cin = [], c[0]
        for stage, cout in enumerate(c):
            for i in range(3):
                blocks.append(_FRNBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), BatchNorm."""

    def __init__(self, in_channels: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(_BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """A pre-LN transformer block: x + attention(LN(x)), then + MLP(LN(.)) (GELU, width 4d).
    Attention written out in matrix products (not scaled_dot_product_attention, which vmap
    runs one example at a time on CPUs)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.out((weights @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TransformerStack(nn.Module):
    """Transformer blocks over an image's rows as tokens: each row (channels x width values)
    embedded to `d`, plus a learned position per row; the blocks; the tokens' mean; a
    linear classifier. No dropout and no batch statistics, so vmap and step_batched take it."""

    def __init__(self, in_channels: int = 1, height: int = 28, width: int = 28, d: int = 128, heads: int = 4,
                 blocks: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(in_channels * width, d)
        self.position = nn.Parameter(torch.zeros(height, d))
        self.blocks = nn.Sequential(*(TransformerBlock(d, heads) for _ in range(blocks)))
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, classes)

    def forward(self, x):
        tokens = x.permute(0, 2, 1, 3).flatten(2)          # (batch, rows, channels * width)
        h = self.blocks(self.embed(tokens) + self.position)
        return self.fc(self.norm(h).mean(dim=1))


MODELS = {"mlp": MLP, "lenet5": LeNet5, "resnet20_frn": ResNet20FRN, "resnet18": ResNet18,
          "transformer_stack": TransformerStack}

# Input shape (C, H, W) each model is built for by default.
INPUT_SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28), "resnet20_frn": (3, 32, 32), "resnet18": (3, 32, 32),
                "transformer_stack": (1, 28, 28)}


def make_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def model_for(name: str, x) -> nn.Module:
    """The named model, sized for inputs like x (the MLP takes any flattened size)."""
    if name == "mlp":
        return make_model(name, in_features=x[0].numel())
    if name == "transformer_stack":
        return make_model(name, in_channels=x.shape[1], height=x.shape[-2], width=x.shape[-1])
    return make_model(name, in_channels=x.shape[1])
