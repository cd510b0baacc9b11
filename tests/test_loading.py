"""hwrel.loading: every model format, the user's own architectures, Hugging Face folders, and the
one-line errors for models that cannot be loaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hwrel import models
from hwrel.errors import HwrelError
from hwrel.loading import build_architecture, load_model, parse_architecture_args

from own_models import OwnModels, build, build_hf_folder


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> OwnModels:
    return build(tmp_path_factory.mktemp("own"))


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("suffix", ["_sd.pt", ".safetensors"])
@pytest.mark.parametrize("name,cls,shape", [("tanh", "TanhMLP", (64,)), ("cnn", "SmallCNN", (1, 8, 8))])
def test_state_dict_into_the_users_class(own: OwnModels, monkeypatch: pytest.MonkeyPatch, suffix: str,
                                         name: str, cls: str, shape: tuple) -> None:
    monkeypatch.chdir(own.root)  # package.module:Class resolves from the current folder
    args = '{"hidden": 16}' if name == "tanh" else None
    lm = load_model(own.root / f"{name}{suffix}", architecture=f"usernets:{cls}", architecture_args=args)
    assert lm.kind == ("safetensors" if suffix == ".safetensors" else "state dict")
    assert lm.name == f"{name}{suffix}".split(".")[0] and not lm.module.training
    x = own.x_test.reshape(-1, *shape)
    assert _same(lm.module, getattr(own, name), x)
    # the file path form of the class, from another folder
    monkeypatch.chdir(own.root.parent)
    lm2 = load_model(own.root / f"{name}{suffix}", architecture=f"{own.root / 'usernets.py'}:{cls}",
                     architecture_args=args)
    assert _same(lm2.module, getattr(own, name), x)


def test_constructing_the_users_class_leaves_the_global_rng_alone(own: OwnModels,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(own.root)
    before = torch.get_rng_state()
    build_architecture("usernets:TanhMLP", {"hidden": 16})
    assert torch.equal(before, torch.get_rng_state())


def test_pt2_records_its_input_shape_and_pickles_need_trust(own: OwnModels) -> None:
    lm = load_model(own.root / "cnn.pt2")
    assert lm.kind == "torch.export" and lm.input_shape == (1, 8, 8)
    assert _same(lm.module, own.cnn, own.x_test.reshape(-1, 1, 8, 8))
    with pytest.raises(HwrelError) as info:
        load_model(own.root / "tanh_pickled.pt")
    _one_line(info, "tanh_pickled.pt", "--trust-pickle")
    lm = load_model(own.root / "tanh_pickled.pt", trust_pickle=True)
    assert lm.kind == "pickle" and _same(lm.module, own.tanh, own.x_test)


def test_builtin_architecture_state_dict(tmp_path: Path) -> None:
    ref = models.load("digits-mlp-sigmoid")
    path = tmp_path / "sig.safetensors"
    save_file(dict(ref.module.state_dict()), str(path))
    lm = load_model(path, architecture="digits-mlp-sigmoid")
    assert lm.input_shape == (64,) and _same(lm.module, ref.module, ref.x_test)
    with pytest.raises(HwrelError) as info:
        load_model(path, architecture="digits-mlp-sigmoid", architecture_args='{"a": 1}')
    _one_line(info, "takes no arguments")


@pytest.mark.parametrize("arch,args,words", [
    ("usernets:NoSuchNet", None, ["usernets", "no class 'NoSuchNet'", "TanhMLP"]),
    ("nosuchpackage.nets:Net", None, ["cannot import nosuchpackage.nets", "ModuleNotFoundError"]),
    ("usernets:NotAModule", None, ["not an nn.Module class"]),
    ("usernets:TanhMLP", '{"hidden": 32}', ["tanh_sd.pt", "does not fit architecture", "fc1.weight",
                                            "(16, 64) in the file, (32, 64) in the model"]),
    ("usernets:SmallCNN", None, ["tanh_sd.pt", "does not fit", "missing conv.weight"]),
    ("usernets:TanhMLP", '{"hidden": ', ["--architecture-args must be JSON"]),
    ("usernets:TanhMLP", '{"width": 3}', ["constructing it", "TypeError", "width"]),
    ("usernets:TanhMLP", '3', ["JSON object", "got int"]),
    ("resnet", None, ["neither a built-in architecture", "package.module:ClassName"]),
    ("mnist-lenet", None, ["does not fit architecture 'mnist-lenet'"]),
])
def test_architecture_errors_are_one_line(own: OwnModels, monkeypatch: pytest.MonkeyPatch, arch: str,
                                          args: str | None, words: list[str]) -> None:
    monkeypatch.chdir(own.root)
    with pytest.raises(HwrelError) as info:
        load_model(own.root / "tanh_sd.pt", architecture=arch, architecture_args=args)
    _one_line(info, *words)


def test_state_dict_without_architecture_and_unknown_model(own: OwnModels, tmp_path: Path) -> None:
    with pytest.raises(HwrelError) as info:
        load_model(own.root / "tanh.safetensors")
    _one_line(info, "tanh.safetensors", "--architecture", "package.module:ClassName")
    with pytest.raises(HwrelError) as info:
        load_model(tmp_path / "nope.pt2")
    _one_line(info, "nope.pt2", "neither a built-in model")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(HwrelError) as info:
        load_model(bad, architecture="digits-mlp")
    _one_line(info, "bad.safetensors", "not a readable .safetensors")
    with pytest.raises(HwrelError) as info:
        load_model("digits-mlp", architecture="digits-mlp")
    _one_line(info, "built in")


def test_parse_architecture_args() -> None:
    assert parse_architecture_args(None) == ([], {})
    assert parse_architecture_args('{"hidden": 8}') == ([], {"hidden": 8})
    assert parse_architecture_args("[8, 3]") == ([8, 3], {})


# ---------------------------------------------------------------------------------- Hugging Face

def test_hugging_face_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transformers ResNet folder (random weights) loads offline, computes what transformers
    computes, and becomes an analysable network with the same forward."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hf-resnet"
    original = build_hf_folder(folder)
    lm = load_model(folder)
    assert lm.kind == "Hugging Face" and lm.name == "hf-resnet"
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(pixel_values=x).logits
        assert torch.allclose(lm.module(x), want, atol=1e-6)
        exported = lm.module_for((1, 8, 8))
        assert torch.allclose(exported(x), want, atol=1e-6)
        assert torch.allclose(exported(x[:1]), want[:1], atol=1e-6)  # any batch size
    from hwrel.network import Network

    net = Network.from_module(exported, (0.0, 1.0), (1, 8, 8))
    assert net.num_layers >= 3
    assert torch.allclose(net.to().forward(x.double()).float(), want, atol=1e-4)


@pytest.mark.parametrize("damage,words", [
    ("empty", ["not a Hugging Face model folder", "no config.json"]),
    ("bad-json", ["config.json is not valid JSON"]),
    ("no-weights", ["no model.safetensors"]),
    ("unknown-arch", ["names architecture 'MyNet'", "--architecture"]),
])
def test_folder_that_is_not_a_model(tmp_path: Path, damage: str, words: list[str]) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    if damage != "empty":
        (folder / "config.json").write_text("{not json" if damage == "bad-json" else
                                            json.dumps({"architectures": ["MyNet"]}))
    if damage == "unknown-arch":
        save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(HwrelError) as info:
        load_model(folder)
    _one_line(info, str(folder), *words)
