"""Models that are not built in, as a user would have them: their own classes in their own module
file, trained briefly on the digits data, saved in every format hwrel reads, and test data saved
in every data format. Shared by tests/test_loading.py, tests/test_data.py, tests/test_own_model_cli.py."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

USERNETS = '''
import torch
from torch import nn


class TanhMLP(nn.Module):
    """64 -> hidden -> 10, tanh."""

    def __init__(self, hidden=16, classes=10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SmallCNN(nn.Module):
    """1x8x8 images: conv 3x3 (4 channels), ReLU, 2x2 max-pool, linear."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * 16, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


class NotAModule:
    pass
'''


@dataclass
class OwnModels:
    root: Path
    tanh: nn.Module
    cnn: nn.Module
    x_test: torch.Tensor   # (n, 64) in [0, 1]
    y_test: torch.Tensor

    def accuracy(self, module: nn.Module, x: torch.Tensor | None = None) -> float:
        x = self.x_test if x is None else x
        with torch.no_grad():
            return float((module(x).argmax(1) == self.y_test).double().mean())


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("usernets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(module: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(module(x[idx]), y[idx]).backward()
            opt.step()
    return module.eval()


def build(root: Path, n_test: int = 120) -> OwnModels:
    """Write usernets.py, train both models, and save every model and data format under root."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    (root / "usernets.py").write_text(USERNETS)
    mod = _import(root / "usernets.py")
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    x_train, y_train, x_test, y_test = x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            tanh = _train(mod.TanhMLP(hidden=16), x_train, y_train, epochs=6, seed=0)
            cnn = _train(mod.SmallCNN(), x_train.reshape(-1, 1, 8, 8), y_train, epochs=3, seed=1)
    finally:
        torch.set_num_threads(threads)
    # models
    batch = torch.export.Dim("batch")
    for name, m, ex in (("tanh", tanh, x_test[:2]), ("cnn", cnn, x_test[:2].reshape(-1, 1, 8, 8))):
        torch.export.save(torch.export.export(m, (ex,), dynamic_shapes=({0: batch},)), root / f"{name}.pt2")
        torch.save(m.state_dict(), root / f"{name}_sd.pt")
        save_file(dict(m.state_dict()), str(root / f"{name}.safetensors"))
        sys.modules["usernets"] = mod  # pickling records the class as usernets.<Class>
        try:
            torch.save(m, root / f"{name}_pickled.pt")
        finally:
            del sys.modules["usernets"]
    # data: the same test split in every format
    xn, yn = x_test.numpy(), y_test.numpy()
    np.savez(root / "test.npz", x=xn, y=yn)
    torch.save({"inputs": x_test, "labels": y_test}, root / "test.pt")
    save_file({"x": x_test.contiguous(), "y": y_test.contiguous()}, str(root / "test.safetensors"))
    import pandas as pd

    df = pd.DataFrame(xn, columns=[f"px{i}" for i in range(64)])
    df["label"] = yn
    df.to_csv(root / "test.csv", index=False)  # the label column found by its name
    df.rename(columns={"label": "digit"}).to_parquet(root / "test.parquet")  # needs --label-column digit
    np.savez(root / "calib.npz", x=x_train[:64].numpy())
    return OwnModels(root, tanh, cnn, x_test, y_test)


def build_hf_folder(folder: Path) -> nn.Module:
    """A small transformers ResNet for 1x8x8 images, random weights, saved with save_pretrained."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
                       layer_type="basic", num_labels=10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ResNetForImageClassification(cfg).eval()
    model.save_pretrained(folder)
    return model


__all__ = ["OwnModels", "USERNETS", "build", "build_hf_folder"]
