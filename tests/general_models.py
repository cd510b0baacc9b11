"""Small models the fast injection engine has no rule for, as users write them: a ViT-style
classifier, a MobileNetV2-style CNN and a causal GPT-style language model. Random weights from a
seed (the tests and ``benchmarks/bench_general.py`` use them)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hwrel.models import InvertedResidual  # the reference MobileNet's block


class TinyViT(nn.Module):
    """Patches by reshape/permute, class token, learned position embedding,
    ``nn.TransformerEncoderLayer`` (GELU, LayerNorm, multi-head attention), LayerNorm head."""

    def __init__(self, image: int = 8, patch: int = 4, dim: int = 16, heads: int = 2, depth: int = 2,
                 classes: int = 10, channels: int = 1):
        super().__init__()
        self.patch, self.grid = patch, image // patch
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, dim) * 0.1)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        p, g = self.patch, self.grid
        x = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class SqueezeExcite(nn.Module):
    """MobileNetV3's channel gate: ``x * hardsigmoid(fc(pool(x)))``, a product of two activations
    (the fast engine and the bounds have no rule for it, so this model takes the general path)."""

    def __init__(self, channels: int, squeeze: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class TinyMobileNet(nn.Module):
    """MobileNetV2/V3-style: depthwise convolutions, ReLU6 and Hardswish, BatchNorm, residuals,
    a squeeze-excite gate."""

    def __init__(self, classes: int = 10, channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 4, nn.ReLU6), InvertedResidual(8, 12, 2, 4, nn.ReLU6),
                                    InvertedResidual(12, 12, 1, 4, nn.Hardswish))
        self.se = SqueezeExcite(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.se(self.blocks(self.stem(x)))).flatten(1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), CausalSelfAttention(dim, heads)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Causal LLaMA-style LM: token and position ``nn.Embedding``, RMSNorm, causal attention via
    ``F.scaled_dot_product_attention``, SwiGLU; output ``(B, T, vocab)`` logits."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, depth: int = 2, context: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


class ConvSeq(nn.Module):
    """LSTM-free sequence classifier: ``(B, channels, T)`` signals, two ``nn.Conv1d`` (the second
    grouped) with ReLU and GELU, max and mean pooling over time, a ``nn.Linear`` head."""

    def __init__(self, channels: int = 2, width: int = 8, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, width, 5, padding=2)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, groups=2)
        self.act2 = nn.GELU()
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.pool(self.act1(self.conv1(x)))))
        return self.head(h.mean(-1))


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def build(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, a batch of inputs)`` for ``kind`` in vit, mobilenet, gpt, conv1d."""
    torch.manual_seed(seed)  # nn.Module initialisers draw from the global generator
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        model, x = TinyViT(), torch.rand(8, 1, 8, 8, generator=g)
    elif kind == "mobilenet":
        model, x = TinyMobileNet(), torch.rand(8, 1, 12, 12, generator=g)
        with torch.no_grad():
            _randomize_bn(model, g)
    elif kind == "gpt":
        model, x = TinyGPT(), torch.randint(0, 32, (4, 12), generator=g)
    elif kind == "conv1d":
        model, x = ConvSeq(), torch.rand(8, 2, 24, generator=g)
    else:
        raise ValueError(kind)
    return model.eval(), x


KINDS = ("vit", "mobilenet", "gpt")
__all__ = ["KINDS", "ConvSeq", "TinyGPT", "TinyMobileNet", "TinyViT", "build", "math"]
