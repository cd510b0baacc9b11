"""Users' own Brevitas models (issue 15): a 4-bit QuantConv2d followed by BatchNorm2d (kept as its
own per-channel affine node, not folded into the integer codes), ReLU, flatten, 4-bit QuantLinear.
Soundness of every bound method against exhaustive neuron faults on the model itself, single bit
flips against the SEU damage bounds, the torch.export path, and the CLI commands on the model saved
as a state dict (+ --architecture) and as a .pt2."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

qnn = pytest.importorskip("brevitas.nn")

import hwrel  # noqa: E402
from hwrel.errors import UnsupportedLayerError  # noqa: E402

USERNETS = '''
import torch
from torch import nn
import brevitas.nn as qnn


class QCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = qnn.QuantConv2d(1, 4, 3, weight_bit_width=4)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = qnn.QuantLinear(4 * 36, 3, bias=True, weight_bit_width=4)

    def forward(self, x):
        return self.fc(self.flatten(self.relu(self.bn(self.conv(x)))))
'''


def _model(root: Path):
    (root / "qnets.py").write_text(USERNETS)
    sys.path.insert(0, str(root))
    try:
        import importlib

        mod = importlib.import_module("qnets")
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    m = mod.QCNN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.3, 0.3)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def qm(tmp_path_factory):
    root = tmp_path_factory.mktemp("brevitas")
    m = _model(root)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = m(x).argmax(1)
    torch.save(m.state_dict(), root / "q_sd.pt")
    torch.export.save(torch.export.export(m, (x[:2],)), root / "q.pt2")
    np.savez(root / "test.npz", x=x.numpy(), y=y.numpy())
    return root, m, x


def test_batch_norm_after_a_quantized_layer_is_its_own_node(qm):
    _, m, x = qm
    net = hwrel.Network.from_module(m, input_shape=(1, 8, 8))
    kinds = [(n.name, n.affine.bit_width, n.affine.batch_norm) for n in net.nodes if n.op == "affine"]
    assert kinds == [("conv", 4, None), ("bn", None, "bn"), ("fc", 4, None)]
    assert net.nodes[1].affine.codes is not None  # the conv keeps its integer codes
    with torch.no_grad():
        assert torch.allclose(net.forward(x), m(x), atol=1e-5)


def test_float_batch_norm_is_still_folded():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    net = hwrel.Network.from_module(m, input_shape=(1, 4, 4))
    assert [n.affine.folded_bn for n in net.nodes if n.op == "affine"] == ["1", None]


def _measured(m, x, faults: dict[int, float]) -> torch.Tensor:
    """max over inputs and outputs of |faulty - clean|, neurons of the ReLU (flat index) replaced."""
    def hook(mod, inp, out):
        out = out.clone().flatten(1)
        for i, v in faults.items():
            out[:, i] = v
        return out.reshape(-1, 4, 6, 6)

    with torch.no_grad():
        clean = m(x)
        h = m.relu.register_forward_hook(hook)
        try:
            faulty = m(x)
        finally:
            h.remove()
    return (faulty - clean).abs().max()


@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_every_bound_method_holds_under_exhaustive_neuron_faults(qm, fault):
    _, m, x = qm
    net = hwrel.Network.from_module(m, (0.0, 1.0), input_shape=(1, 8, 8))
    cap = 1.5
    values = [0.0] if fault == "crash" else [-cap, cap]
    n = net.layer_sizes()[0]
    worst1 = max(float(_measured(m, x, {i: v})) for i in range(n) for v in values)
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.choice(n, 2, replace=False)) for _ in range(150)]
    worst2 = max(float(_measured(m, x, {int(i): a, int(j): b})) for i, j in pairs
                 for a, b in itertools.product(values, repeat=2))
    for f, worst in ((1, worst1), (2, worst2)):
        res = hwrel.fep(net, [f], fault, capacity=cap if fault == "byzantine" else None)
        assert worst > 0
        for method, bound in res.by_method.items():
            assert bound >= worst, (fault, f, method, bound, worst)


def test_seu_flip_bounds_hold_with_a_batch_norm_node(qm):
    """Every single flip of the conv and batch-norm words stays within its certified damage."""
    from hwrel.seu import load_accelerator
    from hwrel.seu.flips import FlipModel, flip_bounds
    from hwrel.seu.mapping import map_model

    _, m, x = qm
    net = hwrel.Network.from_module(m, (0.0, 1.0), input_shape=(1, 8, 8))
    mapping = map_model(net, load_accelerator("gemmini"), "int8")
    net64 = mapping.deployed(net.to())
    fb = flip_bounds(net64, mapping.tensors, False)
    xs = x.double()
    fm = FlipModel(net64, mapping.tensors, [s.limit for s in fb.sites], xs)
    dmg = fb.single(fb.inputs_sup(net64.input_lo[None], net64.input_hi[None], 1))
    tol = 1e-12 * (1 + float(fm.output.abs().max()))
    checked = set()
    for ti, t in enumerate(mapping.tensors):
        if not t.name.startswith(("conv", "bn")):
            continue
        for e in range(t.numel):
            for bit in range(t.fmt.bits):
                d = float((fm.run([(ti, e, bit)]) - fm.output).abs().max())
                assert d <= float(dmg[ti][e, bit]) + tol, (t.name, e, bit, d, float(dmg[ti][e, bit]))
                checked.add(t.name.split(".")[0])
    assert {"conv", "bn"} <= checked


def test_torch_export_program_of_a_brevitas_model(qm):
    root, m, x = qm
    gm = torch.export.load(root / "q.pt2").module()
    net = hwrel.Network.from_module(gm, input_shape=(1, 8, 8))
    with torch.no_grad():
        assert torch.allclose(net.forward(x), m(x), atol=1e-5)


def test_export_slice_that_drops_values_is_refused_naming_it():
    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x[:, :4])

    gm = torch.export.export(Cut().eval(), (torch.rand(2, 6),)).module()
    with pytest.raises(UnsupportedLayerError, match=r"slice.*drops part"):
        hwrel.Network.from_module(gm, input_shape=(6,))

    class Keep(Cut):
        def forward(self, x):
            return self.fc(x[:, :].detach())

    gm = torch.export.export(Keep().eval(), (torch.rand(2, 4),)).module()
    net = hwrel.Network.from_module(gm, input_shape=(4,))
    x = torch.rand(2, 4)
    with torch.no_grad():
        assert torch.allclose(net.forward(x), gm(x))


def _hwrel(root: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("hwrel")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hwrel.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*cmd, *args], cwd=root, capture_output=True, text=True, env=env, timeout=600)


ARCH = ["--architecture", "qnets:QCNN", "--input-shape", "1,8,8"]
COMMANDS = [("bound", ["--failures", "1"]), ("bitwidth", ["--data", "test.npz", "--bits", "4..8"]),
            ("seu", ["--data", "test.npz", "--accelerator", "gemmini", "--mission-hours", "1000", "--campaign-size", "200"]),
            ("inject", ["--data", "test.npz", "--count", "50", "--seed", "0"])]


@pytest.mark.parametrize("model", ["q_sd.pt", "q.pt2"])
@pytest.mark.parametrize("command,opts", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_cli_commands_on_a_brevitas_model(qm, model, command, opts):
    root = qm[0]
    where = ARCH if model == "q_sd.pt" else ["--input-shape", "1,8,8"]
    proc = _hwrel(root, command, model, *where, *opts)
    assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-1500:])
    if command == "bitwidth" and model == "q_sd.pt":
        assert "already quantized (conv int4, fc int4 weights)" in proc.stderr
