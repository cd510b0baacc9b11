"""Exactness of the injection engine against plain, independent references.

References: deep-copy the nn.Module once, write the faulty weight (restored afterwards) or replace an
activation / a synapse's transmitted value through forward hooks, and forward. Brevitas references
replace the integer code through a forward hook on ``weight_quant`` with the scale held fixed.

Tolerances: stored words (old/new values of weights and biases) are compared bit for bit (raw
float32 patterns, two's-complement codes). Outputs are compared with ``|engine - ref| <= RTOL *
(1 + max|ref|)`` per configuration, RTOL = 1e-5 (float32 sums in another order: the engine adds
``dw * y_i`` to the clean sum instead of recomputing it), and NaN/Inf positions must agree.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwrel.models as M
from hwrel.errors import HwrelError
from hwrel.inject import Fault, Injector, inject

RTOL = 1e-5
B = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # thousands of tiny reference forwards: intra-op threads only add contention on shared machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mlp():
    return M.load("digits-mlp")


@pytest.fixture(scope="module")
def lenet():
    return M.load("mnist-lenet")


@pytest.fixture(scope="module")
def resnet():
    return M.load("mnist-resnet")


def _quant_model() -> nn.Module:
    import brevitas.nn as qnn

    torch.manual_seed(0)  # brevitas initialises from the global RNG; only the test model depends on it
    m = nn.Sequential(
        qnn.QuantIdentity(), qnn.QuantConv2d(1, 3, 3, weight_bit_width=8, bias=True), qnn.QuantReLU(),
        nn.Flatten(), qnn.QuantLinear(3 * 6 * 6, 16, bias=True, weight_bit_width=4), qnn.QuantReLU(),
        qnn.QuantLinear(16, 10, bias=True, weight_bit_width=8))
    return m.eval()


# --- reference helpers ------------------------------------------------------------------------

def f32_bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)


def bits_f32(u) -> np.ndarray:
    return np.asarray(u, dtype=np.int64).astype(np.uint32).view(np.float32)


def close(eng: torch.Tensor, ref: torch.Tensor) -> bool:
    eng, ref = eng.double(), ref.double()
    if not torch.equal(torch.isnan(eng), torch.isnan(ref)):
        return False
    inf_e, inf_r = torch.isinf(eng), torch.isinf(ref)
    if not torch.equal(inf_e, inf_r) or not torch.equal(eng[inf_e], ref[inf_r]):
        return False
    fin = torch.isfinite(ref)
    if not fin.any():
        return True
    scale = 1 + ref[fin].abs().max()
    return bool(((eng[fin] - ref[fin]).abs() <= RTOL * scale).all())


def neuron_hook(e: int, kind: str, value: float | None, bit: int | None):
    def hook(mod, inp, out):
        out = out.clone()
        flat = out.view(out.shape[0], -1)
        if kind == "crash":
            flat[:, e] = 0.0
        elif kind == "bitflip":
            old = flat[:, e].detach().numpy()
            flat[:, e] = torch.from_numpy(bits_f32(f32_bits(old) ^ (1 << bit)).copy())
        else:
            flat[:, e] = value
        return out
    return hook


def synapse_hook(mod: nn.Module, widx: int, source: int, v: float):
    """Receiver = the output that depends on input ``source`` through weight ``widx`` (found by
    probing the layer with one-hot input and one-hot kernel); its value is recomputed with the
    sender's value replaced by ``v``."""
    w = mod.quant_weight().value if hasattr(mod, "quant_weight") else mod.weight  # Brevitas: codes * scale
    def hook(m, inp, out):
        x = inp[0].clone()
        flat_x = x.view(x.shape[0], -1)
        flat_x[:, source] = v
        if isinstance(m, nn.Linear):
            j = widx // w.shape[1]
            out = out.clone()
            out[:, j] = F.linear(x, w[j:j + 1], None if m.bias is None else m.bias[j:j + 1])[:, 0]
            return out
        probe = torch.zeros_like(inp[0][:1]).view(1, -1)
        probe[0, source] = 1.0
        kern = torch.zeros_like(w).view(-1)
        kern[widx] = 1.0
        hit = F.conv2d(probe.view_as(inp[0][:1]), kern.view_as(w), None, m.stride, m.padding, m.dilation, m.groups)
        recv = int(hit.view(-1).nonzero()[0])
        full = F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        out = out.clone()
        out.view(out.shape[0], -1)[:, recv] = full.view(full.shape[0], -1)[:, recv]
        return out
    return hook


def reference(model: nn.Module, x: torch.Tensor, faults, new_values: dict) -> torch.Tensor:
    """Output of ``model`` (already a private copy) with the faults applied; restores it after."""
    mods = dict(model.named_modules())
    handles, saved = [], []
    with torch.no_grad():
        for k, f in enumerate(faults):
            mod = mods[f.layer]
            if f.site in ("weight", "bias"):
                t = mod.weight if f.site == "weight" else mod.bias
                saved.append((t, f.index, t.view(-1)[f.index].clone()))
                t.view(-1)[f.index] = new_values[k]
            elif f.site == "neuron":
                handles.append(mod.register_forward_hook(neuron_hook(f.index, f.kind, f.value, f.bit)))
            else:
                v = 0.0 if f.kind == "crash" else f.value
                src = f.source if f.source is not None else f.index % mod.weight.shape[1]
                handles.append(mod.register_forward_hook(synapse_hook(mod, f.index, src, v)))
        try:
            return model(x)
        finally:
            for h in handles:
                h.remove()
            for t, i, v in saved:
                t.view(-1)[i] = v


def fused(model: nn.Module) -> nn.Module:
    """Copy of a model with every Conv2d->BatchNorm2d pair fused by torch (independent of hwrel)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    pairs = [("stem.0", "stem.1")]
    for blk in ("block1", "block2"):
        pairs += [(f"{blk}.conv1", f"{blk}.bn1"), (f"{blk}.conv2", f"{blk}.bn2")]
        if isinstance(mods[f"{blk}.skip"], nn.Sequential):
            pairs.append((f"{blk}.skip.0", f"{blk}.skip.1"))
    for conv, bn in pairs:
        parent, _, leaf = conv.rpartition(".")
        pp, _, bleaf = bn.rpartition(".")
        setattr(mods[parent], leaf, fuse_conv_bn_eval(mods[conv], mods[bn]))
        setattr(mods[pp], bleaf, nn.Identity())
    return m


def random_faults(rng: np.random.Generator, inj: Injector, model: nn.Module, n: int, *, synapse_src=True):
    """Random faults of every kind over every layer, chosen without the engine."""
    mods = dict(model.named_modules())
    affine = [nm for nm, m in mods.items() if hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.Tensor)
              and m.weight.dim() in (2, 4) and nm in inj._affine]
    hidden = list(inj._hidden)
    out = []
    for _ in range(n):
        site = ["weight", "weight", "bias", "neuron", "synapse"][rng.integers(5)]
        if site == "neuron":
            nm = hidden[rng.integers(len(hidden))]
            size = inj.nodes[inj._hidden[nm]].size
            kind = ["crash", "stuck", "byzantine", "bitflip"][rng.integers(4)]
            out.append(Fault("neuron", nm, int(rng.integers(size)), kind,
                             bit=int(rng.integers(32)) if kind == "bitflip" else None,
                             value=float(rng.normal() * 3) if kind in ("stuck", "byzantine") else None))
            continue
        nm = affine[rng.integers(len(affine))]
        w = mods[nm].weight
        if site == "synapse":
            idx = int(rng.integers(w.numel()))
            kind = ["crash", "byzantine"][rng.integers(2)]
            val = float(rng.normal() * 5) if kind == "byzantine" else None
            if w.dim() == 2:
                out.append(Fault("synapse", nm, idx, kind, value=val))
                continue
            node = inj.nodes[inj._affine[nm]]
            co, ci, a, b = np.unravel_index(idx, tuple(w.shape))
            _, ho, wo = node.shape
            aff = node.affine
            oh, ow = int(rng.integers(ho)), int(rng.integers(wo))
            h = oh * aff.stride[0] - aff.padding[0] + a * aff.dilation[0]
            x = ow * aff.stride[1] - aff.padding[1] + b * aff.dilation[1]
            cin_shape = inj.nodes[node.inputs[0]].shape
            if not (0 <= h < cin_shape[1] and 0 <= x < cin_shape[2]):
                continue  # that tap reads padding here: no synapse
            cin = (co // (w.shape[0] // aff.groups)) * w.shape[1] + ci
            src = int(np.ravel_multi_index((cin, h, x), cin_shape))
            out.append(Fault("synapse", nm, idx, kind, value=val, source=src))
            continue
        t = w if site == "weight" else mods[nm].bias
        if t is None:
            continue
        kind = ["bitflip", "bitflip", "stuck0", "stuck1"][rng.integers(4)]
        if kind == "bitflip" and rng.random() < 0.3:
            bits = tuple(int(b) for b in rng.choice(32, size=2, replace=False))
            out.append(Fault(site, nm, int(rng.integers(t.numel())), kind, bits=bits))
        else:
            out.append(Fault(site, nm, int(rng.integers(t.numel())), kind, bit=int(rng.integers(32))))
    return out


def expected_float_word(f: Fault, old_bits: int) -> int:
    mask = sum(1 << b for b in f.bits)
    if f.kind == "bitflip":
        return old_bits ^ mask
    return old_bits | mask if f.kind == "stuck1" else old_bits & ~mask


def check_model(model: nn.Module, ref_model: nn.Module, x: torch.Tensor, faults, *, input_shape=None,
                multi: int = 0, seed: int = 0, word_exact: bool = True):
    inj = Injector(model, x, input_shape=input_shape)
    assert close(inj.clean[-1], ref_model(x).detach())
    mods = dict(ref_model.named_modules())
    configs = [(f,) for f in faults]
    rng = np.random.default_rng(seed)
    for _ in range(multi):  # several simultaneous faults, distinct words
        pick = rng.choice(len(faults), size=int(rng.integers(2, 4)), replace=False)
        cfg = tuple(faults[i] for i in pick)
        if len({(f.site, f.layer, f.index, f.source) for f in cfg}) == len(cfg):
            configs.append(cfg)
    res = inj.run(configs)
    clean = inj.clean[-1]
    n_checked = 0
    with torch.no_grad():
        for c, cfg in enumerate(configs):
            news = {}
            for k, f in enumerate(cfg):
                if f.site in ("weight", "bias"):
                    t = mods[f.layer].weight if f.site == "weight" else mods[f.layer].bias
                    old = float(t.view(-1)[f.index])
                    if len(cfg) == 1:
                        if word_exact:
                            assert f32_bits(res["old_value"][c]) == f32_bits(old), (f, res["old_value"][c], old)
                        exp = int(bits_f32(expected_float_word(f, int(f32_bits(res["old_value"][c])))).view(np.uint32))
                        assert f32_bits(res["new_value"][c]) == exp, f
                    new = bits_f32(expected_float_word(f, int(f32_bits(old))))
                    news[k] = torch.from_numpy(np.array(new))
            ref = reference(ref_model, x, cfg, news)
            eng = inj.outputs(cfg if len(cfg) > 1 else cfg[0])
            assert close(eng, ref), (cfg, (eng - ref).abs().max())
            d = (ref.double() - clean.double()).abs()
            if torch.isfinite(ref).all():
                assert abs(res["max_abs_delta"][c] - float(d.max())) <= RTOL * (1 + float(ref.abs().max())), cfg
                mism = float((ref.argmax(1) != clean.argmax(1)).double().mean())
                assert abs(res["mismatch_rate"][c] - mism) <= 1.5 / x.shape[0], cfg
            else:
                assert res["nonfinite"][c] and math.isinf(res["max_abs_delta"][c])
            n_checked += 1
    return n_checked


def test_mlp_every_kind_exact(mlp):
    x = mlp.x_test[:B]
    model = copy.deepcopy(mlp.module)
    inj = Injector(model, x)
    faults = random_faults(np.random.default_rng(1), inj, model, 2500)
    assert len({f.kind for f in faults}) == 6 and len({f.site for f in faults}) == 4
    assert check_model(mlp.module, model, x, faults, multi=300) >= 2700


def test_lenet_subset_exact(lenet):
    x = lenet.x_test[:16]
    model = copy.deepcopy(lenet.module)
    inj = Injector(model, x)
    faults = random_faults(np.random.default_rng(2), inj, model, 500)
    assert check_model(lenet.module, model, x, faults, multi=60) >= 500


def test_resnet_exact(resnet):
    """Residual additions and folded batch norm: weights are the folded (deployed) ones, so the
    reference is torch's own Conv-BN fusion; hwrel's folding may differ from it by float rounding,
    hence words compared through the tolerance, not bit for bit."""
    x = resnet.x_test[:16]
    ref_model = fused(resnet.module)
    inj = Injector(resnet.module, x)
    faults = random_faults(np.random.default_rng(3), inj, ref_model, 400)
    # neurons and synapses through hooks on the unfused model too (BN after the conv hook)
    assert check_model(resnet.module, ref_model, x, faults, multi=40, word_exact=False) >= 400
    syn = [f for f in faults if f.site in ("synapse", "neuron")][:60]
    assert check_model(resnet.module, copy.deepcopy(resnet.module), x, syn) == len(syn)


# --- Brevitas: integer codes, scale held fixed ------------------------------------------------

def _twos(code: int, bits: int) -> int:
    code &= (1 << bits) - 1
    return code - (1 << bits) if code >= 1 << (bits - 1) else code


def test_brevitas_int_codes_exact():
    from brevitas.quant_tensor import IntQuantTensor

    model = _quant_model()
    x = torch.rand(24, 1, 8, 8)
    inj = Injector(model, x)
    mods = dict(model.named_modules())
    rng = np.random.default_rng(4)
    layers = {"1": 8, "4": 4, "6": 8}
    configs = []
    for _ in range(900):
        nm = list(layers)[rng.integers(3)]
        bw = layers[nm]
        kind = ["bitflip", "stuck0", "stuck1"][rng.integers(3)]
        n = mods[nm].weight.numel()
        if kind == "bitflip" and rng.random() < 0.3:
            configs.append(Fault("weight", nm, int(rng.integers(n)), kind,
                                 bits=tuple(int(b) for b in rng.choice(bw, 2, replace=False))))
        else:
            configs.append(Fault("weight", nm, int(rng.integers(n)), kind, bit=int(rng.integers(bw))))
    configs += random_faults(rng, inj, model, 300)  # neurons, synapses, float biases
    configs = [c for c in configs if not (c.site == "weight" and c.bits and c.bits[-1] >= layers[c.layer])]
    res = inj.run(configs)
    with torch.no_grad():
        for c, f in enumerate(configs):
            if f.site != "weight":
                news = {}
                if f.site == "bias":
                    old = mods[f.layer].bias.view(-1)[f.index].clone()
                    news[0] = torch.from_numpy(bits_f32(expected_float_word(f, int(f32_bits(float(old))))).copy())
                ref = reference(model, x, [f], news)
                assert close(inj.outputs(f), ref), f
                continue
            layer = mods[f.layer]
            qw = layer.quant_weight()
            codes = qw.int().to(torch.int32).view(-1)
            bw = int(qw.bit_width)
            code = int(codes[f.index])
            mask = sum(1 << b for b in f.bits)
            raw = code & ((1 << bw) - 1)
            raw = raw ^ mask if f.kind == "bitflip" else (raw | mask if f.kind == "stuck1" else raw & ~mask)
            new_code = _twos(raw, bw)
            new_val = (torch.tensor(float(new_code)) - qw.zero_point) * qw.scale
            assert f32_bits(res["old_value"][c]) == f32_bits(float(qw.value.view(-1)[f.index]))
            assert f32_bits(res["new_value"][c]) == f32_bits(float(new_val)), (f, code, new_code)

            def hook(mod, inp, out, i=f.index, v=new_val):
                val = out.value.clone()
                val.view(-1)[i] = v
                return IntQuantTensor(val, out.scale, out.zero_point, out.bit_width, out.signed, out.training)
            h = layer.weight_quant.register_forward_hook(hook)
            try:
                ref = model(x)
            finally:
                h.remove()
            eng = inj.outputs(f)
            assert close(eng, ref), (f, (eng - ref).abs().max())


# --- pytorchfi ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits-mlp", "mnist-lenet"])
def test_same_as_pytorchfi(name):
    core = pytest.importorskip("pytorchfi.core")
    ref = M.load(name)
    x = ref.x_test[:16]
    inj = Injector(ref.module, x)
    layers = [nm for nm, m in ref.module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    pfi = core.fault_injection(copy.deepcopy(ref.module), 16, input_shape=list(ref.input_shape),
                               layer_types=[nn.Linear, nn.Conv2d], use_cuda=False)
    faults = inj.random_faults(25, seed=5)
    res = inj.run(faults)
    for c, f in enumerate(faults):
        w = dict(ref.module.named_modules())[f.layer].weight
        pos = [int(p) for p in np.unravel_index(f.index, tuple(w.shape))] + [None, None]
        corrupted = pfi.declare_weight_fi(layer_num=[layers.index(f.layer)], k=[pos[0]], dim1=[pos[1]],
                                          dim2=[pos[2]], dim3=[pos[3]], value=[float(res["new_value"][c])])
        with torch.no_grad():
            assert close(inj.outputs(f), corrupted(x)), f


# --- formats ------------------------------------------------------------------------------------

def test_float_formats_round_weights_and_flip_in_format(mlp):
    x = mlp.x_test[:B]
    for fmt, dtype, width in (("fp16", torch.float16, 16), ("bf16", torch.bfloat16, 16)):
        inj = Injector(mlp.module, x, format=fmt)
        model = copy.deepcopy(mlp.module)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(m.weight.to(dtype).float())
                    m.bias.copy_(m.bias.to(dtype).float())
            assert close(inj.clean[-1], model(x))
        faults = inj.random_faults(200, seed=6)
        assert max(f.bit for f in faults) < width
        res = inj.run(faults)
        for c, f in enumerate(faults):
            old = torch.tensor([res["old_value"][c]]).to(dtype)
            raw = old.view(torch.int16).item() & 0xFFFF
            new = torch.tensor([raw ^ (1 << f.bit)], dtype=torch.int32).to(torch.int16).view(dtype).float()
            assert f32_bits(res["new_value"][c]) == f32_bits(float(new)) or (math.isnan(new) and math.isnan(res["new_value"][c]))
            with torch.no_grad():
                ref = reference(model, x, [f], {0: new[0]})
            assert close(inj.outputs(f), ref), f


def test_range_limit_restricts_faulty_weights(mlp):
    x = mlp.x_test[:B]
    inj = Injector(mlp.module, x, range_limit=1.0)
    f = Fault("weight", "2", 5, "bitflip", bit=30)  # exponent MSB: huge or Inf
    res = inj.run([f])
    assert abs(res["new_value"][0]) <= 1.0 and np.isfinite(res["max_abs_delta"][0])
    plain = Injector(mlp.module, x).run([f])
    assert plain["max_abs_delta"][0] > res["max_abs_delta"][0]


def test_inject_dataframe(mlp):
    x, y = mlp.x_test[:B], mlp.y_test[:B]
    df = inject(mlp.module, [Fault("neuron", "1", 3, "crash"), [Fault("weight", "0", 1, "bitflip", bit=3),
                                                               Fault("bias", "4", 2, "stuck1", bit=30)]], x, y)
    for col in ("layer", "kind", "site", "index", "bit", "old_value", "new_value", "max_abs_delta",
                "mismatch_rate", "accuracy", "nonfinite"):
        assert col in df.columns
    assert list(df["n_faults"]) == [1, 2] and df["layer"][1] == "0;4"
    assert df["new_value"][0] == 0.0 and np.isnan(df["old_value"][0])
    assert df["nonfinite"][1] or df["max_abs_delta"][1] > 1.0  # bias bit 30 set: 2^128-scale value
    acc = float((mlp.module(x).argmax(1) == y).double().mean())
    r = inject(mlp.module, 20, x, y, seed=3)
    assert len(r) == 20 and (r["accuracy"] <= 1).all()
    assert r.equals(inject(mlp.module, 20, x, y, seed=3))
    clean = r[r["max_abs_delta"] == 0]
    assert (clean["accuracy"] == acc).all()


# --- bad input ----------------------------------------------------------------------------------

def test_errors_name_the_problem(mlp):
    x = mlp.x_test[:8]
    inj = Injector(mlp.module, x)
    cases = [
        (Fault("weight", "nope", 0, "bitflip", bit=1), "unknown layer 'nope'.*0, 2, 4"),
        (Fault("neuron", "0", 0, "crash"), "unknown layer '0'.*1, 3"),
        (Fault("weight", "0", 64 * 128, "bitflip", bit=1), "layer 0: index 8192 outside"),
        (Fault("bias", "4", 10, "stuck0", bit=1), "layer 4: index 10 outside"),
        (Fault("neuron", "1", 128, "crash"), "layer 1: index 128 outside"),
        (Fault("weight", "0", 3, "bitflip", bit=32), "layer 0 index 3: bit 32 beyond fp32"),
        (Fault("weight", "0", 3, "bitflip", bit=3, format="int8"), "layer 0: format int8 does not match"),
        (Fault("neuron", "1", 3, "bitflip", bit=3, format="int8"), "layer 1 index 3: .*float format"),
        (Fault("neuron", "1", 3, "bitflip", bit=16, format="fp16"), "bit 16 beyond fp16"),
        (Fault("synapse", "2", 5, "crash", source=6), "source 6 is not the sender 5"),
        ([Fault("weight", "0", 1, "bitflip", bit=1), Fault("weight", "0", 1, "stuck1", bit=2)], "two weight faults"),
    ]
    for cfg, pattern in cases:
        with pytest.raises(HwrelError, match=pattern) as e:
            inj.run([cfg])
        assert "\n" not in str(e.value)
    with pytest.raises(HwrelError, match="layer 0: format int8 given but the layer holds float weights"):
        Injector(mlp.module, x, format="int8")
    with pytest.raises(HwrelError, match="kind 'bitflip' is not valid for a synapse"):
        Fault("synapse", "0", 1, "bitflip", bit=1)
    with pytest.raises(HwrelError, match="needs bit="):
        Fault("weight", "0", 1, "bitflip")
    with pytest.raises(HwrelError, match="needs a numeric value"):
        Fault("neuron", "1", 1, "stuck")
    q = Injector(_quant_model(), torch.rand(4, 1, 8, 8))
    with pytest.raises(HwrelError, match="layer 4 index 0: bit 4 beyond int4"):
        q.run([Fault("weight", "4", 0, "bitflip", bit=4)])
    with pytest.raises(HwrelError, match="layer 4: format int8 does not match the layer's weight storage int4"):
        q.run([Fault("weight", "4", 0, "bitflip", bit=1, format="int8")])
    with pytest.raises(HwrelError, match="layer 1: format int4 given but the layer stores int8"):
        Injector(_quant_model(), torch.rand(4, 1, 8, 8), format="int4")
    with pytest.raises(HwrelError, match="needs source="):
        q.run([Fault("synapse", "1", 0, "crash")])
    with pytest.raises(HwrelError, match=r"weight \(0, 0, 2, 2\) does not connect source 0"):
        q.run([Fault("synapse", "1", 8, "crash", source=0)])  # tap (2, 2) never reads input (0, 0)


def test_model_not_mutated(mlp):
    before = {k: v.clone() for k, v in mlp.module.state_dict().items()}
    inject(mlp.module, 50, mlp.x_test[:8])
    assert all(torch.equal(before[k], v) for k, v in mlp.module.state_dict().items())


@pytest.mark.parametrize("layer", ["1", "3"])
def test_tail_thresholds_match_reference_near_class_flips(mlp, layer):
    """Stuck neurons swept densely across the values where top-1 classes flip and ReLUs of the
    tail switch: run()'s metrics (read off per-sample tables where safe) equal a plain forward's,
    with labels (accuracy) too."""
    x, y = mlp.x_test[:B], mlp.y_test[:B]
    inj = Injector(mlp.module, x, y)
    model = copy.deepcopy(mlp.module)
    clean = inj.clean[-1]
    neurons = [0, 7, 31, 64, 100]
    faults = [Fault("neuron", layer, j, "stuck", value=float(v)) for j in neurons
              for v in np.concatenate([np.linspace(-6, 30, 120), np.geomspace(1e-6, 5, 40)])]
    res = inj.run(faults)
    flips = 0
    with torch.no_grad():
        for c, f in enumerate(faults):
            ref = reference(model, x, [f], {})
            d = float((ref.double() - clean.double()).abs().max())
            assert abs(res["max_abs_delta"][c] - d) <= RTOL * (1 + float(ref.abs().max())), f
            mism = float((ref.argmax(1) != clean.argmax(1)).double().mean())
            flips += mism > 0
            assert abs(res["mismatch_rate"][c] - mism) <= 1.5 / B, f
            acc = float((ref.argmax(1) == y).double().mean())
            assert abs(res["accuracy"][c] - acc) <= 1.5 / B, f
    assert flips > 50  # the sweep does cross class boundaries


def test_quantized_tail_matches_plain_path():
    """Brevitas MLP (quantized ReLUs): run() with tables and bin shortcuts equals outputs() of every
    configuration, and outputs() equals a hooked Brevitas forward."""
    import brevitas.nn as qnn

    torch.manual_seed(1)
    m = nn.Sequential(qnn.QuantLinear(12, 16, bias=True, weight_bit_width=8), qnn.QuantReLU(bit_width=4),
                      qnn.QuantLinear(16, 16, bias=True, weight_bit_width=8), qnn.QuantReLU(bit_width=4),
                      qnn.QuantLinear(16, 5, bias=True, weight_bit_width=8)).eval()
    x = torch.rand(40, 12)
    inj = Injector(m, x, format="int8")
    faults = inj.random_faults(600, seed=3) + inj.random_faults(100, site="neuron", kind="crash", seed=4)
    res = inj.run(faults)
    clean = inj.clean[-1]
    for c, f in enumerate(faults):
        out = inj.outputs(f)
        if torch.isfinite(out).all():
            d = float((out.double() - clean.double()).abs().max())
            assert abs(res["max_abs_delta"][c] - d) <= RTOL * (1 + float(out.abs().max())), f
            assert res["mismatch_rate"][c] == float((out.argmax(1) != clean.argmax(1)).double().mean()), f
        else:
            assert res["nonfinite"][c]


def test_tail_exact_pieces_do_not_change_results(monkeypatch):
    """Rows forwarded past a tail are processed in pieces: tiny pieces (a few rows, so many pieces and
    ragged ends) give bit-identical metrics to one piece holding every row."""
    import brevitas.nn as qnn
    import importlib

    eng = importlib.import_module("hwrel.inject.engine")
    torch.manual_seed(2)
    m = nn.Sequential(qnn.QuantLinear(12, 16, bias=True, weight_bit_width=8), qnn.QuantReLU(bit_width=4),
                      qnn.QuantLinear(16, 16, bias=True, weight_bit_width=8), qnn.QuantReLU(bit_width=4),
                      qnn.QuantLinear(16, 5, bias=True, weight_bit_width=8)).eval()
    inj = Injector(m, torch.rand(40, 12), torch.randint(0, 5, (40,)), format="int8")
    faults = inj.random_faults(400, seed=5)
    monkeypatch.setattr(eng, "_PIECE", 1 << 30)
    whole = inj.run(faults)
    monkeypatch.setattr(eng, "_PIECE", 16 * 3)  # 3 rows per piece
    pieces = inj.run(faults)
    # quantized tails read off zero change: a nonzero delta comes from the exact (pieced) path
    assert float(np.mean(whole["max_abs_delta"] > 0)) > 0.2
    for k in whole:
        np.testing.assert_array_equal(pieces[k], whole[k], err_msg=k)
