"""Network extraction: every supported layer evaluates exactly like the module; others are named."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hwrel
from hwrel.errors import HwrelError, UnsupportedLayerError

ACTS = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.Sigmoid(), nn.Hardsigmoid(), nn.Tanh(),
        nn.Hardtanh(-2, 3), nn.Identity(), nn.Dropout(0.5)]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_dense_with_every_activation_and_batchnorm_matches_module(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), act, nn.Linear(7, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.3, 3)
    net = hwrel.Network.from_module(model, (-3.0, 3.0))
    x = torch.rand(50, 5) * 6 - 3
    torch.testing.assert_close(net.forward(x), model(x), rtol=1e-5, atol=1e-5)
    hidden = 0 if isinstance(act, (nn.Identity, nn.Dropout)) else 1
    assert net.num_layers == hidden
    assert net.nodes[1].affine.folded_bn == "1"


def test_conv_pools_flatten_residual_and_functional_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, stride=1, padding=1)
            self.b1 = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
            self.mp = nn.MaxPool2d(2)
            self.ap = nn.AvgPool2d(3, stride=1, padding=1)
            self.fc = nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.sigmoid(self.c2(y)) + y
            y = self.ap(self.mp(y))
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(1)
    model = M().eval()
    with torch.no_grad():
        model.b1.running_var.uniform_(0.5, 2)
    net = hwrel.Network.from_module(model, (0.0, 1.0), (2, 6, 6))
    x = torch.rand(9, 2, 6, 6)
    torch.testing.assert_close(net.forward(x), model(x), rtol=1e-5, atol=1e-5)
    assert [n.op for n in net.nodes].count("add") == 1
    assert net.layer_sizes() == [144, 144]


def test_brevitas_layers_keep_codes_scales_and_bit_widths():
    import brevitas.nn as qnn

    torch.manual_seed(2)
    model = nn.Sequential(
        qnn.QuantIdentity(bit_width=8, return_quant_tensor=False),
        qnn.QuantConv2d(1, 3, 3, weight_bit_width=4),
        qnn.QuantReLU(bit_width=6),
        nn.Flatten(),
        qnn.QuantLinear(3 * 4 * 4, 4, bias=True, weight_bit_width=8),
    ).eval()
    net = hwrel.Network.from_module(model, (0.0, 1.0), (1, 6, 6))
    x = torch.rand(20, 1, 6, 6)
    torch.testing.assert_close(net.forward(x), model(x), rtol=0, atol=1e-6)
    conv = net.nodes[net.synapse_layers[0]].affine
    assert conv.bit_width == 4 and conv.codes.abs().max() <= 8
    torch.testing.assert_close(conv.weight, conv.scale * (conv.codes.float() - conv.zero_point))
    assert net.nodes[net.synapse_layers[1]].affine.bit_width == 8
    assert net.num_layers == 1  # the QuantReLU; the input QuantIdentity is not a hidden layer
    assert net.nodes[net.layers[0]].act.quant_step > 0


def test_summary_reports_neurons_weights_lipschitz_and_ranges():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    s = net.summary()
    assert list(s["neurons"]) == [6, 5]
    assert s["max_abs_weight"].iloc[0] == pytest.approx(float(model[0].weight.abs().max()))
    assert list(s["lipschitz"]) == [0.25, 1.0]
    x = torch.rand(2000, 4)
    with torch.no_grad():
        h = model[:2](x)
    assert float(h.min()) >= s["range_lo"].iloc[0] - 1e-6 and float(h.max()) <= s["range_hi"].iloc[0] + 1e-6


def test_user_model_is_not_modified():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hwrel.Network.from_module(model, (0.0, 1.0))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_unsupported_layer_names_path_and_type():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ELU()), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1\.0 .*ELU"):
        hwrel.Network.from_module(model, (0.0, 1.0))


def test_unsupported_function_is_named():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return torch.cat([self.l(x), x], dim=1)

    with pytest.raises(UnsupportedLayerError, match="cat"):
        hwrel.Network.from_module(M(), (0.0, 1.0))


def test_nan_weights_and_bad_domain_are_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(HwrelError, match=r"layer 2: weight contains NaN"):
        hwrel.Network.from_module(model, (0.0, 1.0))
    with pytest.raises(HwrelError, match="input_domain"):
        hwrel.Network.from_module(nn.Linear(3, 2), (1.0, 0.0))
    with pytest.raises(HwrelError, match="input_shape is required"):
        hwrel.Network.from_module(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(4, 1)), (0.0, 1.0))


def test_reference_models_extract_exactly():
    for name in hwrel.models.names():
        rm = hwrel.models.load(name)
        if name in ("mnist-vit", "text-gpt"):  # attention, norms, embeddings: general injection path only
            with pytest.raises(UnsupportedLayerError, match="permute|Embedding"):
                hwrel.Network.from_module(rm.module, rm.input_domain, rm.input_shape)
            continue
        net = hwrel.Network.from_module(rm.module, rm.input_domain, rm.input_shape)
        x = rm.x_test[:64]
        with torch.no_grad():
            torch.testing.assert_close(net.forward(x), rm.module(x), rtol=1e-4, atol=1e-4)


def test_torch_export_programs_extract_like_the_module():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(18, 5), nn.Sigmoid(), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
    exported = torch.export.export(model, (torch.rand(1, 1, 8, 8),)).module()
    net = hwrel.Network.from_module(exported, (0.0, 1.0), (1, 8, 8))
    ref = hwrel.Network.from_module(model, (0.0, 1.0), (1, 8, 8))
    x = torch.rand(7, 1, 8, 8)
    torch.testing.assert_close(net.forward(x), model(x), rtol=1e-5, atol=1e-5)
    assert net.layer_sizes() == ref.layer_sizes()
    assert hwrel.fep(net, [2, 1]).bound == pytest.approx(hwrel.fep(ref, [2, 1]).bound, rel=1e-6)
