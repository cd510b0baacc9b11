"""The exact general injection path (hwrel.inject.general) on models the fast engine refuses.

Exactness contract: the faulty output equals, bit for bit, a deep copy of the stored model with the
value written (a forward hook replacing the value for activations), run forward. The reference here
rounds parameters, flips bits (numpy views) and writes values by its own code, not hwrel's.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from general_models import KINDS, build  # noqa: E402

from hwrel.errors import HwrelError  # noqa: E402
from hwrel.inject.campaign import run_campaign, summarize  # noqa: E402
from hwrel.inject.faults import Fault  # noqa: E402
from hwrel.inject.general import GeneralInjector, site_kind  # noqa: E402
from hwrel.inject.metrics import NextTokenMetric  # noqa: E402

FORMATS = ("fp32", "fp16", "bf16", "int8")

# Per model kind: (site, parameter or module output, index, bit) covering weights, biases,
# embedding rows / tokens, norm parameters and activations.
PARAMS = {
    "vit": [("weight", "blocks.0.self_attn.in_proj_weight", 37), ("bias", "blocks.1.linear1.bias", 5),
            ("weight", "pos_embed", 20), ("weight", "cls_token", 3), ("weight", "blocks.0.norm1.weight", 7),
            ("bias", "norm.bias", 2), ("weight", "embed.weight", 11), ("bias", "blocks.0.self_attn.in_proj_bias", 40)],
    "mobilenet": [("weight", "blocks.1.block.3.weight", 17), ("bias", "head.bias", 4),
                  ("weight", "blocks.0.block.1.weight", 9), ("bias", "stem.1.bias", 3),
                  ("weight", "stem.0.weight", 5), ("weight", "head.weight", 50)],
    "gpt": [("weight", "blocks.0.attn.qkv.weight", 301), ("weight", "tok.weight", 16 * 7 + 3),
            ("weight", "pos.weight", 16 * 2 + 9), ("weight", "blocks.1.norm2.weight", 6),
            ("weight", "norm.weight", 1), ("weight", "blocks.1.mlp.down.weight", 77)],
}
ACTS = {
    "vit": [("blocks.0.self_attn[0]", 13), ("blocks.1.linear1", 5), ("embed", 7), ("blocks.1.norm2", 3)],
    "mobilenet": [("blocks.2.block.5", 30), ("stem.2", 100), ("blocks.1", 12), ("pool", 2)],
    "gpt": [("blocks.0.mlp.gate", 50), ("pos", 21), ("blocks.1.attn", 9), ("blocks.0.norm1", 4)],
}


# --------------------------------------------------------------------------- the reference

def stored_reference(model: nn.Module, fmt: str) -> nn.Module:
    """A deep copy holding every parameter as stored in ``fmt`` (the reference's own rounding)."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if fmt == "fp16":
                p.copy_(p.half().float())
            elif fmt == "bf16":
                p.copy_(p.bfloat16().float())
            elif fmt == "int8" and site_kind(name) == "weight":
                scale = (p.detach().abs().max().double() / 127).float().double()
                codes = torch.round(p.double() / scale).clamp(-127, 127)
                p.copy_((codes * scale).float())
    return m


def _scale(model: nn.Module, name: str) -> float:
    p = dict(model.named_parameters())[name]
    return float((p.detach().abs().max().double() / 127).float())


def flipped(value: float, fmt: str, bits: tuple[int, ...], scale: float = 1.0) -> float:
    """The stored word of ``value`` with ``bits`` inverted, by numpy bit views."""
    mask = sum(1 << b for b in set(bits))
    if fmt == "fp32":
        return float(np.array(np.array([value], np.float32).view(np.uint32) ^ np.uint32(mask)).view(np.float32)[0])
    if fmt == "fp16":
        return float(np.array(np.array([value], np.float16).view(np.uint16) ^ np.uint16(mask)).view(np.float16)[0])
    if fmt == "bf16":  # a bf16 value is the top half of its float32 pattern
        return float(np.array(np.array([value], np.float32).view(np.uint32) ^ np.uint32(mask << 16)).view(np.float32)[0])
    code = int(round(value / scale))
    new = np.array(np.array([code], np.int8).view(np.uint8) ^ np.uint8(mask)).view(np.int8)[0]
    return float(np.float32(float(new) * scale))


def reference_output(stored: nn.Module, x: torch.Tensor, writes=(), acts=()) -> torch.Tensor:
    """Deep copy of ``stored``, values written, forward hooks for activations, forward."""
    m = copy.deepcopy(stored)
    params = dict(m.named_parameters())
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, index, value in writes:
            params[name].view(-1)[index] = value
    handles = []

    def changed(t, index, fn):
        t = t.clone()
        pos = np.unravel_index(index, tuple(t.shape[1:])) if t.shape[0] == x.shape[0] else None
        if pos is None:  # not batched (a position embedding): indexed whole
            t[np.unravel_index(index, tuple(t.shape))] = fn(t[np.unravel_index(index, tuple(t.shape))])
        else:
            at = (slice(None), *[int(v) for v in pos])
            t[at] = fn(t[at])
        return t

    for module, slot, index, fn in acts:
        if module not in mods:  # an encoder layer's activation given by name (a function): patched
            parent = mods[module.rpartition(".")[0]]
            assert isinstance(parent, nn.TransformerEncoderLayer) and not isinstance(parent.activation, nn.Module)
            parent.activation = lambda t, f0=parent.activation, index=index, fn=fn: changed(f0(t), index, fn)
            continue

        def hook(mod, inp, out, slot=slot, index=index, fn=fn):
            t = changed(out if slot is None else out[slot], index, fn)
            return t if slot is None else (t, *out[1:]) if slot == 0 else (*out[:slot], t, *out[slot + 1:])
        handles.append(mods[module].register_forward_hook(hook))
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return m(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def to_inf_or_nan(t: torch.Tensor, index: int) -> tuple[int, ...]:
    """The fp32 exponent bits that are 0 in ``t.flatten()[index]``: flipping them makes it Inf/NaN."""
    raw = int(np.array([float(t.detach().reshape(-1)[index])], np.float32).view(np.uint32)[0])
    return tuple(b for b in range(23, 31) if not raw >> b & 1)


def flip30(t: torch.Tensor) -> torch.Tensor:
    a = np.array(t.numpy(), ndmin=1).view(np.uint32) ^ np.uint32(1 << 30)
    return torch.from_numpy(a.view(np.float32)).reshape(t.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _split(label: str) -> tuple[str, int | None]:
    if label.endswith("]"):
        mod, slot = label[:-1].split("[")
        return mod, int(slot)
    return label, None


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_faults_equal_deep_copy_reference(kind: str, fmt: str) -> None:
    model, x = build(kind)
    inj = GeneralInjector(model, x, format=fmt)
    stored = stored_reference(model, fmt)
    assert same_bits(inj.clean, reference_output(stored, x))
    params = dict(stored.named_parameters())
    width = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}[fmt]
    changed = 0
    for k, (site, name, index) in enumerate(PARAMS[kind]):
        pfmt = "fp32" if fmt == "int8" and site == "bias" else fmt
        w = 32 if pfmt == "fp32" else width
        for bits in ((w - 1,), (w - 2,), (k % (w - 2), w - 3)):
            f = Fault(site, name, index, "bitflip", bits=bits)
            old = float(params[name].detach().view(-1)[index])
            new = flipped(old, pfmt, bits, _scale(model, name) if pfmt == "int8" else 1.0)
            got = inj.outputs(f)
            ref = reference_output(stored, x, writes=[(name, index, new)])
            assert same_bits(got, ref), (name, bits)
            changed += not same_bits(got, inj.clean)
            res = inj.run([f])
            assert np.float32(res["new_value"][0]).tobytes() == np.float32(new).tobytes() or \
                (math.isnan(new) and math.isnan(res["new_value"][0]))
    assert changed > len(PARAMS[kind])  # the faults do move the output


@pytest.mark.parametrize("kind", KINDS)
def test_activation_faults_equal_hooked_reference(kind: str) -> None:
    model, x = build(kind)
    inj = GeneralInjector(model, x)
    stored = stored_reference(model, "fp32")
    for k, (label, index) in enumerate(ACTS[kind]):
        mod, slot = _split(label)
        cases = [(Fault("neuron", label, index, "crash"), lambda t: torch.zeros_like(t)),
                 (Fault("neuron", label, index, "stuck", value=3.5), lambda t: torch.full_like(t, 3.5)),
                 (Fault("neuron", label, index, "bitflip", bit=30),
                  flip30)]
        for f, fn in cases:
            got = inj.outputs(f)
            ref = reference_output(stored, x, acts=[(mod, slot, index, fn)])
            assert same_bits(got, ref), (label, f.kind)
            assert not same_bits(got, inj.clean) or f.kind == "crash", (label, f.kind)


@pytest.mark.parametrize("fmt", ("fp32", "bf16"))
@pytest.mark.parametrize("kind", KINDS)
def test_multiple_faults_equal_reference(kind: str, fmt: str) -> None:
    model, x = build(kind)
    inj = GeneralInjector(model, x, format=fmt)
    stored = stored_reference(model, fmt)
    params = dict(stored.named_parameters())
    width = 32 if fmt == "fp32" else 16
    cfg, writes, acts = [], [], []
    for site, name, index in PARAMS[kind][:4]:
        bits = (width - 3, 2)
        cfg.append(Fault(site, name, index, "bitflip", bits=bits))
        writes.append((name, index, flipped(float(params[name].detach().view(-1)[index]), fmt, bits)))
    for label, index in ACTS[kind][:2]:
        cfg.append(Fault("neuron", label, index, "stuck", value=-2.0))
        acts.append((*_split(label), index, lambda t: torch.full_like(t, -2.0)))
    got = inj.outputs(cfg)
    assert same_bits(got, reference_output(stored, x, writes, acts))
    assert not same_bits(got, inj.clean)
    # restored exactly: the stored words and the clean output are bit for bit what they were
    for name, t in inj.model.named_parameters():
        assert same_bits(t.detach(), params[name].detach()), name
    assert same_bits(inj.clean, reference_output(stored, x))


def test_nan_words_and_restore_are_exact() -> None:
    model, x = build("vit")
    inj = GeneralInjector(model, x)
    before = {n: t.detach().clone() for n, t in inj.model.named_parameters()}
    f = Fault("weight", "head.weight", 3, "bitflip", bits=to_inf_or_nan(before["head.weight"], 3))
    res = inj.run([f, f])
    assert res["nonfinite"].all() and np.isinf(res["max_abs_delta"]).all()
    for n, t in inj.model.named_parameters():
        assert same_bits(t.detach(), before[n]), n
    stored = stored_reference(model, "fp32")
    assert same_bits(inj.clean, reference_output(stored, x))


def test_users_model_is_untouched_and_sampling_is_seeded() -> None:
    model, x = build("gpt")
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    inj = GeneralInjector(model, x, format="fp16")
    inj.run(inj.random_faults(20, seed=3))
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert inj.random_faults(30, seed=5) == inj.random_faults(30, seed=5)
    assert inj.random_faults(30, seed=5) != inj.random_faults(30, seed=6)


def test_bad_faults_raise_one_line() -> None:
    model, x = build("mobilenet")
    inj = GeneralInjector(model, x, format="fp16")
    bad = [Fault("weight", "nope.weight", 0, "bitflip", bit=1), Fault("weight", "head.weight", 10**6, "bitflip", bit=1),
           Fault("weight", "head.weight", 0, "bitflip", bit=16), Fault("neuron", "nope", 0, "crash"),
           [Fault("weight", "head.weight", 0, "bitflip", bit=1), Fault("weight", "head.weight", 0, "bitflip", bit=2)],
           Fault("synapse", "head", 0, "crash")]
    for f in bad:
        with pytest.raises(HwrelError) as e:
            inj.outputs(f)
        assert "\n" not in str(e.value)
    # a module path with site= names its parameter
    assert same_bits(inj.outputs(Fault("bias", "head", 1, "bitflip", bit=14)),
                     inj.outputs(Fault("bias", "head.bias", 1, "bitflip", bit=14)))


def test_agrees_with_the_fast_engine_on_an_mlp() -> None:
    from hwrel.inject import Injector

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    x = torch.rand(16, 6)
    eng = Injector(mlp, x, input_domain=(0.0, 1.0))
    gen = GeneralInjector(mlp, x)
    faults = eng.random_faults(60, seed=2)
    e = eng.run(faults)
    g = gen.run([Fault(f.site, f"{f.layer}.{f.site}", f.index, f.kind, bit=f.bit) for f in faults])
    np.testing.assert_array_equal(e["new_value"], g["new_value"])
    np.testing.assert_array_equal(e["mismatch_rate"], g["mismatch_rate"])
    np.testing.assert_allclose(e["max_abs_delta"], g["max_abs_delta"], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- language models

def test_next_token_metric_on_reference_outputs() -> None:
    model, x = build("gpt")
    inj = GeneralInjector(model, x)
    assert isinstance(inj.metric, NextTokenMetric)
    stored = stored_reference(model, "fp32")
    clean = reference_output(stored, x)
    ce_clean = float(F.cross_entropy(clean[:, :-1].double().reshape(-1, 32), x[:, 1:].reshape(-1)))
    faults = [Fault("weight", "tok.weight", 16 * int(x[0, 3]) + 2, "bitflip", bit=30),
              Fault("weight", "lm_head.weight", 5, "bitflip", bit=29),
              Fault("neuron", "blocks.1.mlp.gate", 11, "stuck", value=40.0)]
    res = inj.run(faults)
    assert res["agreement"].min() < 1  # these faults change predictions
    for k, f in enumerate(faults):
        out = inj.outputs(f)
        agree = float((out.argmax(-1) == clean.argmax(-1)).double().mean())
        ce = float(F.cross_entropy(out[:, :-1].double().reshape(-1, 32), x[:, 1:].reshape(-1)))
        assert res["agreement"][k] == pytest.approx(agree, abs=0)
        assert res["mismatch_rate"][k] == pytest.approx(1 - agree, abs=1e-15)
        assert res["cross_entropy"][k] == pytest.approx(ce, rel=1e-12)
        assert res["cross_entropy_delta"][k] == pytest.approx(ce - ce_clean, rel=1e-9, abs=1e-12)
    bits = to_inf_or_nan(dict(inj.model.named_parameters())["norm.weight"], 0)
    nan = inj.run([Fault("weight", "norm.weight", 0, "bitflip", bits=bits)])
    assert nan["cross_entropy"][0] == math.inf and nan["nonfinite"][0]


def test_language_model_campaign_and_metric_option() -> None:
    model, x = build("gpt")
    df = run_campaign(model, {"count": 24, "chunk_size": 10}, x, progress=False, seed=4)
    assert df.attrs["injection_path"] == "general" and "getattr" in df.attrs["engine_refused"]
    assert {"agreement", "cross_entropy", "cross_entropy_delta"} <= set(df.columns)
    assert np.allclose(df["agreement"], 1 - df["mismatch_rate"])
    s = summarize(df)
    assert s.iloc[-1]["sdc"] == int((df["agreement"] < 1).sum())
    # the classifier metric on (B, T, vocab) logits is refused in one line
    with pytest.raises(HwrelError, match="next-token"):
        run_campaign(model, {"count": 4}, x, progress=False, metric="classifier")
    # explicit next-token targets
    tg = torch.roll(x, -2, dims=1)[:, :-1]
    df2 = run_campaign(model, {"count": 24, "chunk_size": 10}, x, tg, progress=False, seed=4)
    assert (df2["agreement"].to_numpy() == df["agreement"].to_numpy()).all()
    assert not np.allclose(df2["cross_entropy"], df["cross_entropy"])


# --------------------------------------------------------------------------- campaigns and fallback

@pytest.mark.parametrize("kind", ("vit", "mobilenet"))
def test_campaign_falls_back_and_rows_match_reference(kind: str, tmp_path: Path) -> None:
    model, x = build(kind)
    y = torch.arange(len(x)) % 10
    spec = {"count": 12, "chunk_size": 5, "format": "fp16"}
    df = run_campaign(model, spec, x, y, progress=False, seed=7, out=tmp_path / "r")
    assert df.attrs["injection_path"] == "general"
    assert df.attrs["engine_refused"]
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["injection_path"] == "general"
    stored = stored_reference(model, "fp16")
    params = dict(stored.named_parameters())
    clean = reference_output(stored, x)
    for _, row in df.head(6).iterrows():
        (rec,) = json.loads(row["faults"])
        name, index = rec["layer"], rec["index"]
        new = flipped(float(params[name].detach().view(-1)[index]), "fp16", (rec["bit"],))
        out = reference_output(stored, x, writes=[(name, index, new)])
        finite = bool(torch.isfinite(out).all())
        mx = float((out.double() - clean.double()).abs().max()) if finite else math.inf
        assert row["max_abs_delta"] == mx
        top = out.argmax(1)
        bad = ~torch.isfinite(out).all(1)
        assert row["mismatch_rate"] == float(((top != clean.argmax(1)) | bad).double().mean())
        assert row["accuracy"] == float(((top == y) & ~bad).double().mean())
    # reproducible, resumable: the same seed gives the same rows, a rerun reads them back
    again = run_campaign(model, spec, x, y, progress=False, seed=7)
    assert again.drop(columns=[]).equals(df)
    (tmp_path / "r" / "part-00001.parquet").unlink()  # as if killed before that chunk
    assert run_campaign(model, spec, x, y, progress=False, seed=7, out=tmp_path / "r").equals(df)
    other = run_campaign(model, spec, x, y, progress=False, seed=8)
    assert not other["faults"].equals(df["faults"])


def test_neuron_campaign_on_general_path() -> None:
    model, x = build("vit")
    df = run_campaign(model, {"fault": "crash", "count": 10}, x, progress=False)
    assert df.attrs["injection_path"] == "general" and (df["site"] == "neuron").all()
    df = run_campaign(model, {"fault": "crash", "exhaustive": True, "layer": "blocks.0.self_attn[0]"},
                      x[:2], progress=False)
    assert len(df) == 5 * 16 and df["max_abs_delta"].max() > 0


def test_engine_models_keep_the_engine() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    df = run_campaign(mlp, {"count": 10}, torch.rand(8, 6), progress=False)
    assert df.attrs["injection_path"] == "engine" and df.attrs["engine_refused"] is None


def test_brevitas_conv_then_batchnorm_is_injected() -> None:
    import brevitas.nn as qnn

    torch.manual_seed(0)
    m = nn.Sequential(qnn.QuantConv2d(1, 4, 3, weight_bit_width=4), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Flatten(), qnn.QuantLinear(4 * 6 * 6, 3, bias=True, weight_bit_width=4)).eval()
    x = torch.rand(6, 1, 8, 8)
    df = run_campaign(m, {"count": 20}, x, progress=False)
    # batch norm after a quantized conv is its own affine node now, so the fast engine runs it
    assert df.attrs["injection_path"] == "engine" and not df.attrs.get("engine_refused")
    assert df["mismatch_rate"].notna().all() and len(df) == 20


# --------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def vit_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vit")
    shutil.copy(Path(__file__).parent / "general_models.py", root / "gmodels.py")
    model, x = build("vit")
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(root / "vit.safetensors"))
    with torch.no_grad():
        y = model(x).argmax(1)
    np.savez(root / "vit.npz", x=x.numpy(), y=y.numpy())
    return root


def test_cli_inject_says_general_path_and_bound_takes_the_graph(vit_files: Path, capsys) -> None:
    from hwrel.cli import main

    args = [str(vit_files / "vit.safetensors"), "--architecture", f"{vit_files / 'gmodels.py'}:TinyViT",
            "--data", str(vit_files / "vit.npz")]
    assert main(["inject", *args, "--count", "12", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "injection path: general" in text and "12 configurations" in text
    assert main(["inject", *args, "--count", "12", "--format", "int8", "--no-progress", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["injection_path"] == "general" and info["storage"] == "int-codes"
    assert info["configs"] == 12 and info["summary"][-1]["layer"] == "all"
    # bound: the Network bounds refuse the TransformerEncoderLayers, the graph bounds cover them
    assert main(["bound", *args, "--failures", "0,1", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["path"] == "graph" and b["layers"] == ["blocks.0.activation", "blocks.1.activation"]
    assert "getattr" in b["engine_refused"] and 0 < b["per_input_max"] < math.inf
    assert main(["tolerance", *args, "--epsilon", "10", "--epsilon-prime", "0", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert t["path"] == "graph" and [r["layer"] for r in t["per_layer"]] == b["layers"]
    assert t["per_layer"][1]["tolerated"] >= 1 and t["per_layer"][1]["bound_max"] <= 10
    for cmd in (["expected", *args, "-p", "0.01"],):
        assert main(cmd) == 2
        errs = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(errs) == 1 and "bounds do not support" in errs[0] and "getattr" in errs[0], cmd
    # the measuring commands run, and say that the certified figures are not applicable
    for cmd in (["bitwidth", *args, "--bits", "4..5"],
                ["seu", *args, "--accelerator", "eyeriss-v1", "--mission-hours", "1000", "--campaign-size", "10"]):
        assert main(cmd) == 0, cmd
        out = capsys.readouterr().out
        if cmd[0] == "bitwidth":  # the graph bounds give its certified column (vacuous on this ViT)
            assert "certified over the graph" in out and "certified    bits: none in the sweep" in out, out
        else:
            assert "not applicable: the bounds do not support operation" in out and "getattr" in out, cmd


# --------------------------------------------------------------------------- replay (prefix reuse)

class _Branchy(nn.Module):
    """Data-dependent control flow (fx cannot trace it) and an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.b(h) if bool(h.sum() > -1e9) else -self.b(h)


@pytest.mark.parametrize("kind", KINDS)
def test_replay_runs_only_downstream_nodes_and_equals_full_forward(kind: str) -> None:
    model, x = build(kind)
    fast = GeneralInjector(model, x)
    slow = GeneralInjector(model, x, replay=False)
    assert fast.replay is not None and slow.replay is None
    faults = fast.random_faults(25, seed=11) + fast.random_faults(8, site="neuron", kind="crash", seed=3)
    placed = 0
    for f in faults:
        writes, acts = fast._prepare((f,))
        placed += fast._seeds(writes, acts) is not None
        assert same_bits(fast.outputs(f), slow.outputs(f)), f
    assert placed >= 25  # every parameter fault, at least, starts from its own node
    last = fast.replay.param_seeds(next(reversed(fast.params)))
    assert len(fast.replay._dirty(frozenset(last))) < len(fast.replay.nodes) // 2  # a suffix, not all


def test_untraceable_or_inplace_models_forward_whole_and_stay_exact() -> None:
    torch.manual_seed(1)
    model, x = _Branchy().eval(), torch.rand(6, 5)
    inj = GeneralInjector(model, x)
    assert inj.replay is None
    stored = stored_reference(model, "fp32")
    p = dict(stored.named_parameters())["a.weight"]
    new = flipped(float(p.detach().view(-1)[4]), "fp32", (29,))
    assert same_bits(inj.outputs(Fault("weight", "a.weight", 4, "bitflip", bit=29)),
                     reference_output(stored, x, writes=[("a.weight", 4, new)]))
    inplace = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).eval()
    assert GeneralInjector(inplace, x).replay is None


class _SoftmaxAttention(nn.Module):
    """Attention written out: the scores and the softmax are operations, not module outputs."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, 4)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return self.out((torch.softmax(scores, dim=-1) @ v).mean(1))


def _fx_reference(stored: nn.Module, x: torch.Tensor, node: str, index: int, value: float) -> torch.Tensor:
    """torch.fx's own Interpreter on a fresh trace, the value of ``node`` replaced at ``index``
    of every sample."""
    gm = torch.fx.symbolic_trace(copy.deepcopy(stored))

    class Patch(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == node:
                out = out.clone()
                out[(slice(None), *np.unravel_index(index, tuple(out.shape[1:])))] = value
            return out

    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return Patch(gm).run(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


@pytest.mark.parametrize("kind,node", [("vit", "add"), ("mobilenet", "add_1"), ("gpt", "mul_4"),
                                       ("softmax", "softmax"), ("softmax", "truediv")])
def test_faults_at_any_trace_node_equal_interpreter_reference(kind: str, node: str) -> None:
    if kind == "softmax":
        torch.manual_seed(0)
        model, x = _SoftmaxAttention().eval(), torch.rand(5, 6, 8)
    else:
        model, x = build(kind)
    inj = GeneralInjector(model, x)
    assert f"fx:{node}" in inj.sites("node")
    stored = stored_reference(model, "fp32")
    size = inj.sites("node")[f"fx:{node}"]
    for index in (0, size // 2, size - 1):
        got = inj.outputs(Fault("neuron", f"fx:{node}", index, "stuck", value=2.5))
        assert same_bits(got, _fx_reference(stored, x, node, index, 2.5)), index
    # with a weight fault in the same configuration, and in a campaign
    df = run_campaign(model, {"fault": "crash", "count": 6, "layer": f"fx:{node}"}, x, progress=False)
    assert (df["layer"] == f"fx:{node}").all() and df.attrs["injection_path"] == "general"


def test_tied_embedding_and_head_are_one_site_hit_at_every_use() -> None:
    model, x = build("gpt")
    model.lm_head.weight = model.tok.weight  # weight tying, as GPT-2 does
    inj = GeneralInjector(model, x)
    assert "lm_head.weight" not in inj.params and inj.replay is not None
    stored = stored_reference(model, "fp32")
    row = int(x[1, 5])
    for bit in (30, 27, 3):
        index = 16 * row + 4
        new = flipped(float(stored.tok.weight.detach().view(-1)[index]), "fp32", (bit,))
        ref = reference_output(stored, x, writes=[("tok.weight", index, new)])
        assert same_bits(inj.outputs(Fault("weight", "tok.weight", index, "bitflip", bit=bit)), ref)
        assert same_bits(inj.outputs(Fault("weight", "tok.weight", index, "bitflip", bit=bit)),
                         GeneralInjector(model, x, replay=False).outputs(Fault("weight", "tok.weight", index, "bitflip", bit=bit)))


def test_tied_weights_on_parallel_branches_are_all_recomputed() -> None:
    torch.manual_seed(2)
    l1, l2 = nn.Linear(5, 4), nn.Linear(5, 4)
    l2.weight = l1.weight  # one stored tensor, two modules on parallel branches

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = l1, l2

        def forward(self, x):
            return self.l1(x) * self.l2(x.flip(1))

    model, x = Two().eval(), torch.rand(7, 5)
    inj = GeneralInjector(model, x)
    assert inj.replay is not None
    stored = stored_reference(model, "fp32")
    new = flipped(float(stored.l1.weight.detach().view(-1)[6]), "fp32", (28,))
    ref = reference_output(stored, x, writes=[("l1.weight", 6, new)])
    assert same_bits(inj.outputs(Fault("weight", "l1.weight", 6, "bitflip", bit=28)), ref)


@pytest.mark.slow
def test_torch_export_program_is_injected_at_its_aten_nodes(tmp_path: Path, capsys) -> None:
    from hwrel.cli import main
    from hwrel.loading import load_model

    model, x = build("mobilenet")
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=512)}})
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "m.npz", x=x.numpy(), y=np.zeros(len(x), dtype=np.int64))
    prog = load_model(str(tmp_path / "m.pt2")).module  # squeeze-excite: the program itself, not modules
    inj = GeneralInjector(prog, x)
    assert "fx:hardswish_default" in inj.sites("node") and inj.replay is not None
    new = flipped(float(dict(prog.named_parameters())["head.weight"].detach().view(-1)[7]), "fp32", (30,))
    ref = copy.deepcopy(prog)
    with torch.no_grad():
        dict(ref.named_parameters())["head.weight"].view(-1)[7] = new
        want = ref(x)
    assert same_bits(inj.outputs(Fault("weight", "head.weight", 7, "bitflip", bit=30)), want)
    args = [str(tmp_path / "m.pt2"), "--data", str(tmp_path / "m.npz")]
    assert main(["inject", *args, "--fault", "crash", "--count", "8", "--no-progress", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["injection_path"] == "general" and info["configs"] == 8
    assert main(["bound", *args, "--failures", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bounds do not support" in err


@pytest.mark.slow
def test_worker_processes_give_the_same_rows(tmp_path: Path) -> None:
    from hwrel.inject.executors import LocalExecutor

    model, x = build("vit")
    spec = {"count": 12, "chunk_size": 3}
    one = run_campaign(model, spec, x, progress=False, seed=5)
    two = LocalExecutor(workers=2, threads=1).run(model, spec, x, out=tmp_path / "r", seed=5, progress=False)
    assert two.attrs["injection_path"] == "general"
    assert two.reset_index(drop=True).equals(one)


def test_a_model_workers_cannot_import_is_a_one_line_error() -> None:
    from hwrel.inject.executors import LocalExecutor

    class Local(nn.Module):  # defined in a function: no worker can import it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.sort(self.fc(x), dim=1).values

    with pytest.raises(HwrelError, match="--workers 1") as e:
        LocalExecutor(workers=2).run(Local().eval(), {"count": 4}, torch.rand(3, 4), progress=False)
    assert "\n" not in str(e.value)


def test_brevitas_layers_flip_their_integer_codes() -> None:
    import brevitas.nn as qnn
    from brevitas.quant_tensor import IntQuantTensor

    torch.manual_seed(0)
    m = nn.Sequential(qnn.QuantConv2d(1, 4, 3, weight_bit_width=4), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Flatten(), qnn.QuantLinear(4 * 6 * 6, 3, bias=True, weight_bit_width=4)).eval()
    x = torch.rand(6, 1, 8, 8)
    inj = GeneralInjector(m, x)
    assert inj.params["0.weight"].fmt.name == "int4" and inj.params["1.weight"].fmt.name == "fp32"
    for layer, index, bit in (("0", 5, 3), ("0", 20, 1), ("4", 100, 2)):
        with torch.no_grad():
            qw = m[int(layer)].quant_weight()
        code = int(qw.int().reshape(-1)[index]) & 0xF ^ (1 << bit)
        code = code - 16 if code >= 8 else code
        ref = copy.deepcopy(m)

        def hook(mod, inp, out, code=code, index=index):
            val = out.value.clone()
            val.view(-1)[index] = (torch.tensor(float(code)) - out.zero_point) * out.scale
            return IntQuantTensor(val, out.scale, out.zero_point, out.bit_width, out.signed, out.training)
        ref[int(layer)].weight_quant.register_forward_hook(hook)
        with torch.no_grad():
            want = ref(x)
        got = inj.outputs(Fault("weight", f"{layer}.weight", index, "bitflip", bit=bit))
        assert same_bits(got, want) and not same_bits(got, inj.clean)
    df = run_campaign(m, {"count": 30}, x, progress=False)
    conv_w = df[(df["layer"] == "0") & (df["site"] == "weight")]
    assert set(conv_w["format"]) == {"int4"} and set(df.loc[df["site"] == "bias", "format"]) <= {"fp32"}


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_an_encoder_activation_given_by_name_is_an_injection_site(activation: str) -> None:
    """``TransformerEncoderLayer(activation="gelu")`` calls ``F.gelu``, no module: the injector exposes
    it as ``<layer>.activation``, the graph bounds' failure layer, and a fault there equals the same
    function with those elements changed, patched into a deep copy of the layer; the user's model
    keeps its function."""
    from hwrel.bounds.graph import crash_outputs, graph_layers

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 16)
            self.enc = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, activation=activation, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.embed(x)).mean(1))

    torch.manual_seed(0)
    model = Enc().eval()
    x = torch.randn(5, 6, 4)
    fn = model.enc.activation
    inj = GeneralInjector(model, x)
    assert model.enc.activation is fn and not isinstance(fn, nn.Module)  # the user's model untouched
    assert graph_layers(model) == ["enc.activation"] and inj.acts["enc.activation"].shape == (6, 24)

    stored = stored_reference(model, "fp32")  # fp32 storage: the model's own values

    def patched(change, index: int) -> torch.Tensor:  # the function patched into a deep copy
        return reference_output(stored, x, acts=[("enc.activation", None, index, change)])

    moved = 0
    for index in (0, 31, 6 * 24 - 1):
        for f, change in [(Fault("neuron", "enc.activation", index, "crash"), torch.zeros_like),
                          (Fault("neuron", "enc.activation", index, "stuck", value=3.5),
                           lambda t: torch.full_like(t, 3.5))]:
            got = inj.outputs(f)
            assert same_bits(got, patched(change, index)), (index, f.kind)
            moved += not same_bits(got, inj.clean)
        # the graph bounds' own crash reference at the same element agrees
        assert same_bits(inj.outputs(Fault("neuron", "enc.activation", index, "crash")),
                         crash_outputs(model, x, {"enc.activation": torch.tensor([index])}))
    assert moved >= 3
