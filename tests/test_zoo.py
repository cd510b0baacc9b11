"""The zoo (issue 15): every capability on 13 small architectures, as users hand them to hwrel.

The zoo: the six built-in reference models (shipped weights), a ``transformers`` GPT-2 and LLaMA
from tiny configs saved with ``save_pretrained`` and read back as a Hugging Face folder (the way
``hwrel inject FOLDER`` reads them), a Conv1d sequence classifier, the test ViT, squeeze-excite
MobileNet and LLaMA-style GPT of :mod:`general_models`, and a Brevitas QuantConv2d -> BatchNorm2d
model (:mod:`test_brevitas_models`).

What each entry shows:

- exactness: every row of a campaign (weight and bias bit flips in each storage format hwrel
  stores the model in, several faults at once, activation crashes and bit flips at module outputs,
  and at trace nodes including attention on the general path) equals a reference computed here:
  a deep copy of the model with the faulty value written by this file's own bit arithmetic (a
  forward hook for activations, torch.fx's Interpreter for trace nodes), forward. General path:
  bit for bit. Fast engine: within its documented float32 summation tolerance (it adds the change
  to the clean sum), against torch's own Conv-BN fusion where it folds batch norm. The campaign
  says which path ran and that is checked against the entry.
- the command line, in process: ``inject`` everywhere; ``bound``, ``tolerance``, ``seu`` and
  ``bitwidth`` everywhere (certified where the bounds cover the model, measured on the general path
  elsewhere: ``COMMANDS_ON_GENERAL``); ``bound`` and ``tolerance`` where the bounds cover the model,
  else a one-line error naming the node and the operation.
- soundness where the bounds cover the model: random neuron crash sets, applied by hooks on the
  model's own modules, never move the output by more than any bound method certifies.

Cost (measured on the shared 2-core machine, load average about 3): about 140 s for the file, of
which the slow-marked ``report --quick`` and ``seu``/``bitwidth`` tests are about 37 s. Most of it
is exporting the Hugging Face folders (every command re-exports one, about 4 s) and the
domain-wide bounds on mnist-mobilenet (about 5 s a command).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from general_models import build  # noqa: E402
from test_bounds import assert_sound  # noqa: E402
from test_general_inject import _split, flipped, reference_output, stored_reference  # noqa: E402

import hwrel  # noqa: E402
from hwrel import models  # noqa: E402
from hwrel.cli import main  # noqa: E402
from hwrel.inject.campaign import run_campaign  # noqa: E402
from hwrel.inject.general import GeneralInjector  # noqa: E402

RTOL = 1e-5  # the fast engine's float32 summation order (tests/test_inject_engine.py)
TESTS = Path(__file__).parent
VOCAB, CONTEXT = 96, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny forwards on a shared 2-core machine: intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- the zoo

@dataclass
class Entry:
    """One architecture: ``model`` (what hwrel analyses; a Hugging Face folder's exported program),
    ``reference`` (the model the references copy: the transformers model itself for a folder),
    inputs ``x``, the CLI arguments naming the model and its data, the path injection must take,
    and whether the bounds cover it."""

    name: str
    model: nn.Module
    x: torch.Tensor
    cli: list[str]
    path: str
    bounds: bool
    reference: nn.Module | None = None
    domain: tuple[float, float] = (0.0, 1.0)
    shape: tuple[int, ...] | None = None
    formats: tuple[str, ...] = field(default=("fp32", "fp16"))

    @property
    def ref(self) -> nn.Module:
        return self.model if self.reference is None else self.reference


def _builtin(name: str, root: Path) -> Entry:
    ref = models.load(name)
    general = name in ("mnist-vit", "text-gpt")
    n = 4 if name == "text-gpt" else 16
    # the commands read a part of the test split (the input domain stays the model's own)
    np.savez(root / f"{name}.npz", x=ref.x_test[:32].numpy(), y=ref.y_test[:32].numpy())
    return Entry(name, ref.module, ref.x_test[:n], [name, "--data", str(root / f"{name}.npz")],
                 "general" if general else "engine", not general, None,
                 tuple(ref.input_domain), tuple(ref.input_shape),
                 ("fp32", "fp16", "int8") if general else ("fp32", "fp16"))


def _hf(kind: str, root: Path) -> Entry:
    transformers = pytest.importorskip("transformers")
    from hwrel.loading import load_model

    folder = root / f"hf-{kind}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "gpt2":
            cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT,
                                          bos_token_id=0, eos_token_id=0)
            hf = transformers.GPT2LMHeadModel(cfg)
        else:
            cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                           max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0)
            hf = transformers.LlamaForCausalLM(cfg)
    hf.eval().save_pretrained(str(folder), safe_serialization=True)
    x = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    np.savez(root / f"hf-{kind}.npz", x=x.numpy(), y=x[:, 1:].numpy())
    lm = load_model(folder)  # as `hwrel inject FOLDER` reads it
    program = lm.module_for((x.shape[1],), x.dtype)
    return Entry(f"hf-{kind}", program, x, [str(folder), "--data", str(root / f"hf-{kind}.npz")], "general",
                 False, reference=program, formats=("fp32", "fp16", "int8"))


def _own(kind: str, cls: str, root: Path) -> Entry:
    from safetensors.torch import save_file

    model, x = build(kind)
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(root / f"{kind}.safetensors"))
    with torch.no_grad():
        out = model(x)
    y = x[:, 1:] if out.dim() == 3 else out.argmax(1)
    np.savez(root / f"{kind}.npz", x=x.numpy(), y=y.numpy())
    return Entry(kind, model, x, [str(root / f"{kind}.safetensors"), "--architecture",
                                  f"{TESTS / 'general_models.py'}:{cls}", "--data", str(root / f"{kind}.npz")],
                 "general", False, formats=("fp32", "fp16", "int8"))


def _brevitas(root: Path) -> Entry:
    pytest.importorskip("brevitas")
    from test_brevitas_models import _model

    m = _model(root)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x).argmax(1)
    torch.save(m.state_dict(), root / "q_sd.pt")
    np.savez(root / "q.npz", x=x.numpy(), y=y.numpy())
    return Entry("brevitas-conv-bn", m, x, [str(root / "q_sd.pt"), "--architecture", f"{root / 'qnets.py'}:QCNN",
                                            "--data", str(root / "q.npz")], "engine", True, shape=(1, 8, 8),
                 formats=("fp32",))


BUILDERS: dict[str, Callable[[Path], Entry]] = {
    **{n: (lambda root, n=n: _builtin(n, root)) for n in
       ("digits-mlp", "mnist-lenet", "mnist-resnet", "mnist-mobilenet", "mnist-vit", "text-gpt")},
    "hf-gpt2": lambda root: _hf("gpt2", root),
    "hf-llama": lambda root: _hf("llama", root),
    "conv1d": lambda root: _own("conv1d", "ConvSeq", root),
    "vit": lambda root: _own("vit", "TinyViT", root),
    "mobilenet": lambda root: _own("mobilenet", "TinyMobileNet", root),
    "gpt": lambda root: _own("gpt", "TinyGPT", root),
    "brevitas-conv-bn": _brevitas,
}
ZOO = list(BUILDERS)
BOUNDED = [n for n in ZOO if n.startswith(("digits", "mnist-lenet", "mnist-resnet", "mnist-mobilenet", "brevitas"))]
_CACHE: dict[str, Entry] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def entry(name: str, root: Path) -> Entry:
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name](root)
    return _CACHE[name]


def test_the_zoo_has_ten_architectures() -> None:
    assert len(ZOO) >= 10 and len(set(ZOO)) == len(ZOO)


# --------------------------------------------------------------------------- references

def _fused(model: nn.Module) -> nn.Module:
    """torch's own Conv-BN fusion on a deep copy (what the fast engine's folded weights are)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model)).eval()


class _ChannelAffine(nn.Module):
    """``x * weight[c] + bias[c]`` per channel: an inference batch norm as deployed."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.weight = nn.Parameter(scale.clone())
        self.bias = nn.Parameter((bn.bias.detach() - bn.running_mean * scale).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _deployed_bn(model: nn.Module) -> nn.Module:
    """A deep copy with every BatchNorm2d replaced by its per-channel scale and shift: the words the
    fast engine stores for a batch norm it keeps as its own node (after a quantized layer)."""
    m = copy.deepcopy(model).eval()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.BatchNorm2d):
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, _ChannelAffine(mod))
    return m


def _folds(e: Entry) -> bool:
    return e.path == "engine" and any(isinstance(m, nn.BatchNorm2d) for m in e.model.modules()) \
        and not e.name.startswith("brevitas")


def _flip_act(bit: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        a = np.array(t.numpy(), ndmin=1).view(np.uint32) ^ np.uint32(1 << bit)
        return torch.from_numpy(a.view(np.float32)).reshape(t.shape)
    return fn


def _act_fn(rec: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    if rec["kind"] == "crash":
        return torch.zeros_like
    if rec["kind"] in ("stuck", "byzantine"):
        return lambda t: torch.full_like(t, rec["value"])
    assert rec["kind"] == "bitflip", rec
    return _flip_act(rec["bit"])


class _QuantWrite:
    """A Brevitas layer's stored integer code changed, the scale held fixed: a forward hook on its
    ``weight_quant`` (the reference's own two's-complement arithmetic)."""

    def __init__(self, module: nn.Module, index: int, bits: list[int]):
        from brevitas.quant_tensor import IntQuantTensor

        with torch.no_grad():
            qw = module.quant_weight()
        width = int(qw.bit_width)
        code = int(qw.int().reshape(-1)[index]) & ((1 << width) - 1)
        for b in bits:
            code ^= 1 << b
        code = code - (1 << width) if code >= 1 << (width - 1) else code

        def hook(mod, inp, out):
            val = out.value.clone()
            val.view(-1)[index] = (torch.tensor(float(code)) - out.zero_point) * out.scale
            return IntQuantTensor(val, out.scale, out.zero_point, out.bit_width, out.signed, out.training)
        self.handle = module.weight_quant.register_forward_hook(hook)


def row_reference(e: Entry, stored: nn.Module, recs: list[dict], scales: dict[str, float]) -> tuple[torch.Tensor, list]:
    """The faulty output for one campaign row's faults, by a deep copy of ``stored`` (the model as
    stored), and the new parameter values this file computes."""
    m = copy.deepcopy(stored)
    params, mods = dict(m.named_parameters()), dict(m.named_modules())
    writes, acts, quant, news = [], [], [], []
    for rec in recs:
        bits = rec["bits"] or [rec["bit"]]
        assert rec["kind"] == "bitflip" or rec["site"] == "neuron", rec
        if rec["site"] in ("weight", "bias"):
            name = rec["layer"] if e.path == "general" else f"{rec['layer']}.{rec['site']}"
            if rec["format"].startswith("int") and rec["format"] != "int8":  # a Brevitas layer's own codes
                quant.append(_QuantWrite(mods[rec["layer"]], rec["index"], bits))
                news.append(None)
                continue
            old = float(params[name].detach().view(-1)[rec["index"]])
            new = flipped(old, rec["format"], tuple(bits), scales.get(name, 1.0))
            writes.append((name, rec["index"], new))
            news.append(new)
        else:
            label = rec["layer"]
            assert "@" not in label and not label.startswith("fx:"), label  # module outputs, first call
            mod, slot = _split(label)
            acts.append((mod, slot, rec["index"], _act_fn(rec)))
            news.append(None)
    try:
        with torch.no_grad():
            for name, index, value in writes:
                params[name].view(-1)[index] = value
        return reference_output(m, e.x, (), acts), news
    finally:
        for q in quant:
            q.handle.remove()


def _measures(out: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    """(max |faulty - clean| (inf when not finite), top-1 mismatch rate over the last dimension)."""
    finite = bool(torch.isfinite(out).all())
    mx = float((out.double() - clean.double()).abs().max()) if finite else math.inf
    bad = ~torch.isfinite(out).all(-1)
    return mx, float(((out.argmax(-1) != clean.argmax(-1)) | bad).double().mean())


def _check_rows(e: Entry, df, stored: nn.Module, fmt: str) -> int:
    """Every row of ``df`` against the reference; returns how many rows moved the output."""
    assert df.attrs["injection_path"] == e.path, (e.name, df.attrs.get("engine_refused"))
    scales = {}
    if fmt == "int8":
        scales = {n: float((p.detach().abs().max().double() / 127).float()) for n, p in e.ref.named_parameters()}
    with torch.no_grad():
        clean = reference_output(stored, e.x)
    exact = e.path == "general"
    moved = 0
    for _, row in df.iterrows():
        recs = json.loads(row["faults"])
        out, news = row_reference(e, stored, recs, scales)
        mx, mism = _measures(out, clean)
        what = (e.name, fmt, recs)
        if exact or not math.isfinite(mx):
            assert row["max_abs_delta"] == mx, (*what, row["max_abs_delta"], mx)
            assert row["mismatch_rate"] == pytest.approx(mism, abs=1e-15), what
        else:
            tol = RTOL * (1 + float(out.abs().max()))
            assert abs(row["max_abs_delta"] - mx) <= tol, (*what, row["max_abs_delta"], mx)
            assert abs(row["mismatch_rate"] - mism) <= 1.5 / len(e.x), what
        if len(recs) == 1 and news[0] is not None:
            got, want = np.float32(row["new_value"]), np.float32(news[0])
            assert got.tobytes() == want.tobytes() or (np.isnan(got) and np.isnan(want)) or \
                (not exact and abs(float(got) - float(want)) <= RTOL * (1 + abs(float(want)))), what
        moved += mx > 0
    return moved


def _stored(e: Entry, fmt: str) -> nn.Module:
    base = _fused(e.ref) if _folds(e) else e.ref
    if e.name.startswith("brevitas"):
        return _deployed_bn(base)
    return stored_reference(base, fmt)


# --------------------------------------------------------------------------- a) exactness

PARAM_CASES = [(n, f) for n in ZOO for f in ("fp32", "fp16", "int8")]


@pytest.mark.parametrize("name,fmt", PARAM_CASES)
def test_parameter_faults_equal_the_deep_copy_reference(name: str, fmt: str, root: Path) -> None:
    e = entry(name, root)
    if fmt not in e.formats:
        pytest.skip(f"{name}: {fmt} storage is not applicable (the fast engine stores float models "
                    "as float; hwrel inject quantizes first)")
    df = run_campaign(e.model, {"count": 16, "format": fmt}, e.x, progress=False, seed=3)
    assert len(df) == 16 and set(df["format"]) <= {fmt, "fp32", "int4"}
    assert set(df["site"]) <= {"weight", "bias"} and "weight" in set(df["site"])
    moved = _check_rows(e, df, _stored(e, fmt), fmt)
    assert moved >= 1, (name, fmt)  # the faults reach the output


@pytest.mark.parametrize("name", ZOO)
def test_multiple_and_activation_faults_equal_the_reference(name: str, root: Path) -> None:
    e = entry(name, root)
    stored = _stored(e, "fp32")
    multi = run_campaign(e.model, {"count": 6, "faults_per_config": 3}, e.x, progress=False, seed=5)
    assert (multi["n_faults"] == 3).all()
    _check_rows(e, multi, stored, "fp32")
    if isinstance(e.model, torch.fx.GraphModule):
        assert not GeneralInjector(e.model, e.x[:2], replay=False).sites("neuron")
        return  # an exported program has no module outputs: its trace nodes are checked below
    moved = 0
    for spec in ({"fault": "crash"}, {"fault": "byzantine", "capacity": 4.0}):
        df = run_campaign(e.model, {"count": 8, "sites": ["neuron"], **spec}, e.x, progress=False, seed=6)
        assert (df["site"] == "neuron").all()
        moved += _check_rows(e, df, stored, "fp32")
    assert moved >= 1, name
    if e.path == "general":  # activation bit flips (campaigns draw them on parameters only)
        inj = GeneralInjector(e.model, e.x)
        flips = inj.random_faults(6, site="neuron", kind="bitflip", seed=7)
        for f in flips:
            label = f.layer.split("@")[0]
            assert label == f.layer, f  # module outputs at their first call
            mod, slot = _split(label)
            want = reference_output(stored, e.x, acts=[(mod, slot, f.index, _flip_act(f.bit))])
            got = inj.outputs(f)
            assert got.shape == want.shape and torch.equal(torch.isnan(got), torch.isnan(want)), f
            assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)), f


def _find_node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """The node hwrel calls ``name``: the same name in our own trace, or (a program of aten calls,
    which hwrel re-traces and names ``<op>_<overload>[_k]``) the k-th call of that aten overload."""
    by_name = {n.name: n for n in gm.graph.nodes}
    if name in by_name:
        return by_name[name]
    base, k = re.fullmatch(r"(.+?)(?:_(\d+))?", name).groups()
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
             and f"{n.target._opname}_{n.target._overloadname}" == base]
    assert len(calls) > int(k or 0), (name, base, len(calls))
    return calls[int(k or 0)]


def _interpreter_reference(model: nn.Module, x: torch.Tensor, node: str, index: int) -> torch.Tensor:
    """torch.fx's own Interpreter on a deep copy, ``node``'s value set to 0 at ``index`` of every sample."""
    m = copy.deepcopy(model)
    gm = m if isinstance(m, torch.fx.GraphModule) else torch.fx.symbolic_trace(m)
    target = _find_node(gm, node)

    class Patch(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is target:
                out = out.clone()
                out[(slice(None), *np.unravel_index(index, tuple(out.shape[1:])))] = 0.0
            return out

    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return Patch(gm).run(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


ATTENTION = ("softmax", "scaled_dot_product", "matmul", "bmm", "baddbmm")
GENERAL = [n for n in ZOO if n not in BOUNDED]


@pytest.mark.parametrize("name", GENERAL)
def test_trace_node_faults_equal_the_interpreter_reference(name: str, root: Path) -> None:
    """Crashes at operation nodes of the trace (attention scores or outputs where the model has
    attention, and a node in the middle) on the general path."""
    e = entry(name, root)
    inj = GeneralInjector(e.model, e.x)
    nodes = {k[3:]: v for k, v in inj.sites("node").items()}
    assert nodes, name  # the replay traced the model
    batched = [k for k in nodes if inj.acts[f"fx:{k}"].batched]
    picks = [k for k in batched if k.startswith(ATTENTION)][:2] + [batched[len(batched) // 2]]
    mha = [n for n, m in e.model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if mha:  # attention is a module here: its output is the site (the trace keeps it whole)
        df = run_campaign(e.model, {"fault": "crash", "count": 4, "layer": f"{mha[0]}[0]"}, e.x, progress=False, seed=2)
        assert (df["layer"] == f"{mha[0]}[0]").all() and _check_rows(e, df, _stored(e, "fp32"), "fp32") >= 1
    elif name in ("mnist-vit", "text-gpt", "gpt") or name.startswith("hf-"):
        assert any(k.startswith(ATTENTION) for k in picks), (name, batched)
    moved = 0
    for node in picks:
        df = run_campaign(e.model, {"fault": "crash", "count": 3, "layer": f"fx:{node}"}, e.x, progress=False, seed=2)
        assert df.attrs["injection_path"] == "general" and (df["layer"] == f"fx:{node}").all()
        for _, row in df.iterrows():
            (rec,) = json.loads(row["faults"])
            out = _interpreter_reference(e.model, e.x, node, rec["index"])
            mx, mism = _measures(out, inj.clean)
            assert row["max_abs_delta"] == mx and row["mismatch_rate"] == pytest.approx(mism, abs=1e-15), (name, node)
            moved += mx > 0
    assert moved >= 1, (name, picks)


def test_hugging_face_program_computes_what_transformers_computes(root: Path) -> None:
    """The folder's exported program (what hwrel injects) against the transformers model itself."""
    from hwrel.loading import load_model

    for name in ("hf-gpt2", "hf-llama"):
        e = entry(name, root)
        hf = load_model(root / name).module
        with torch.no_grad():
            assert torch.allclose(e.model(e.x), hf(e.x), rtol=1e-5, atol=1e-6), name
            assert e.model(e.x).shape == (*e.x.shape, VOCAB)


# --------------------------------------------------------------------------- b) the command line

def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    return int(rc or 0), out.getvalue(), err.getvalue()


def _layers(e: Entry) -> int:
    net = hwrel.Network.from_module(e.model, e.domain, e.shape or tuple(e.x.shape[1:]))
    return net.num_layers


def _names_in(model: nn.Module) -> set[str]:
    """Module names and trace node names of ``model`` (by torch.fx, not by hwrel)."""
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(copy.deepcopy(model))
    return {n for n, _ in model.named_modules()} | {n.name for n in gm.graph.nodes}


def _commands(e: Entry, layers: int = 1) -> dict[str, list[str]]:
    """Small, cheap runs of every analysing command (``inject`` has its own checks)."""
    return {"bound": ["bound", *e.cli, "--failures", ",".join(["1"] + ["0"] * (layers - 1)), "--json"],
            "tolerance": ["tolerance", *e.cli, "--epsilon", "1", "--json"],
            "seu": ["seu", *e.cli, "--accelerator", "eyeriss-v1", "--mission-hours", "1000", "--campaign-size", "20",
                    "--json"],
            # an output-error budget needs the certified analysis; the measured sweep takes an accuracy drop
            "bitwidth": ["bitwidth", *e.cli, *(["--epsilon", "100"] if e.bounds else ["--max-accuracy-drop", "50%"]),
                         "--bits", "16", "--no-adversarial", "--json"]}


# The commands besides inject that run on a model the bounds do not cover (measured through the
# general injection path, since main 8165f02); REFUSED_ON_GENERAL must refuse it in one line
# naming the node and the operation.
COMMANDS_ON_GENERAL: tuple[str, ...] = ("seu", "bitwidth")
REFUSED_ON_GENERAL = ("bound", "tolerance")
# ... except ``bound`` and ``tolerance`` where the graph bounds (hwrel.bounds.graph) have a rule for every operation
GRAPH_BOUNDED = ("mnist-vit", "text-gpt", "gpt", "vit", "conv1d", "hf-llama", "hf-gpt2")


@pytest.mark.parametrize("name", ZOO)
def test_every_command_runs(name: str, root: Path) -> None:
    e = entry(name, root)
    rc, out, err = _run(["inject", *e.cli, "--count", "50", "--inputs", "16", "--no-progress", "--json"])
    assert rc == 0, err
    info = json.loads(out)
    assert info["injection_path"] == e.path and info["configs"] == 50
    assert info["summary"][-1]["layer"] == "all" and info["summary"][-1]["configs"] == 50
    if e.path == "general" and not name.startswith("hf-"):  # (a folder: each command exports it, ~4 s)
        rc, out, err = _run(["inject", *e.cli, "--count", "20", "--inputs", "16", "--format", "int8",
                             "--no-progress", "--json"])
        assert rc == 0, err
        assert json.loads(out)["injection_path"] == "general" and json.loads(out)["storage"] == "int-codes"
    if not e.bounds:
        cmds = _commands(e)
        # a folder is exported again by every command (~4 s): one refusal there, the same code path
        refused = REFUSED_ON_GENERAL[:1] if name.startswith("hf-") else REFUSED_ON_GENERAL
        if name in GRAPH_BOUNDED:
            from hwrel.bounds.graph import graph_layers

            layers = len(graph_layers(e.model))
            # one failure in the last layer (a failure in the first may overflow to inf on a folder)
            last = ",".join(["0"] * (layers - 1) + ["1"])
            rc, out, err = _run(["bound", *e.cli, "--failures", last, "--json"])
            assert rc == 0, err
            b = json.loads(out)
            assert b["path"] == "graph" and len(b["layer_sizes"]) == layers and b["failures"][-1] == 1
            assert 0 < b["per_input_max"] < math.inf and b["inputs"] >= 1
            rc, out, err = _run(["tolerance", *e.cli, "--max-accuracy-drop", "99%", "--json"])
            assert rc == 0, err
            t = json.loads(out)
            assert t["path"] == "graph" and [r["layer"] for r in t["per_layer"]] == b["layers"]
            assert all(r["tolerated"] >= 0 and float(r["bound_max_1"]) > 0 for r in t["per_layer"])
            refused = tuple(c for c in refused if c not in ("bound", "tolerance"))
        for cmd in refused:
            rc, out, err = _run(cmds[cmd])
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert rc == 2 and len(lines) == 1 and not out, (cmd, err)
            assert "bounds do not support" in lines[0] and "general injection path" in lines[0], (cmd, lines[0])
            found = re.search(r"(?:operation|layer) (\S+) \((.+?)\)", lines[0])
            assert found and found.group(1) in _names_in(e.model), (cmd, lines[0])  # a node of this model
            if name.startswith("hf-"):  # the operation itself, not the input-length query before it
                assert "aten.embedding" in lines[0] and "sym_size" not in lines[0], lines[0]
        return
    layers = _layers(e)
    cmds = _commands(e, layers)
    rc, out, err = _run(cmds["bound"])
    assert rc == 0, err
    b = json.loads(out)
    assert len(b["layer_sizes"]) == layers and 0 < b["bound"] < math.inf
    assert b["bound"] == min(b["by_method"].values())
    # a budget (the network's own error set to 0) with room for one failure in the first layer
    eps = b["bound"] * 1.001
    rc, out, err = _run(["tolerance", *e.cli, "--epsilon", repr(eps), "--epsilon-prime", "0", "--json"])
    assert rc == 0, err
    t = json.loads(out)
    assert t["maximal"][0] >= 1 and t["bound_maximal"] <= t["budget"] == pytest.approx(eps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_seu_and_bitwidth_run(name: str, root: Path) -> None:
    """The SEU analysis and the bit-width sweep (one width, 16 bits, a budget it meets): certified
    where the bounds cover the model, measured on the general path (``COMMANDS_ON_GENERAL``)
    elsewhere; 1-8 s each on the busy 2-core machine, a Hugging Face folder's export included."""
    e = entry(name, root)
    cmds = _commands(e, _layers(e) if e.bounds else 1)
    todo = ("seu", "bitwidth") if e.bounds else COMMANDS_ON_GENERAL
    if name.startswith("hf-"):  # each command exports the folder again (~4 s): one command per folder
        todo = todo[:1] if name == "hf-gpt2" else todo[1:]
    for cmd in todo:
        rc, out, err = _run(cmds[cmd])
        assert rc == 0, (cmd, err)  # bitwidth: exit 1 would say that no width met the budget
        info = json.loads(out)
        assert info["model"] and info["input_shape"] == list(e.shape or e.x.shape[1:]), cmd


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-vit"])
def test_report_quick_runs(name: str, root: Path) -> None:
    """``hwrel report --quick`` on a model the bounds do not cover (measured report, a few
    seconds); the certified quick report (digits-mlp-sigmoid) and the others are left to
    test_report*.py, where each costs 10-20 s."""
    e = entry(name, root)
    out_dir = root / f"report-{name}"
    rc, out, err = _run(["report", *e.cli, "--quick", "--quiet", "--out", str(out_dir)])
    assert rc == 0, err
    assert (out_dir / "index.html").is_file()


# --------------------------------------------------------------------------- c) soundness

@pytest.mark.parametrize("name", BOUNDED)
def test_no_bound_is_violated_by_random_crashes(name: str, root: Path) -> None:
    """Random crash sets on the hidden layers, by hooks on the model's own modules, against every
    bound method, domain-wide bounds and measured on the test inputs (which lie in the domain)."""
    e = entry(name, root)
    net = hwrel.Network.from_module(e.model, e.domain, e.shape or tuple(e.x.shape[1:]))
    mods = dict(e.model.named_modules())
    names, sizes = net.layer_names(), net.layer_sizes()
    assert all(n in mods for n in names), names
    with torch.no_grad():
        clean = e.model(e.x)
    g = torch.Generator().manual_seed(0)
    L = len(sizes)
    vectors = [[2] + [0] * (L - 1), [0] * (L - 1) + [1], [1] * L]
    for f in vectors:
        res = hwrel.fep(net, f, "crash")
        worst = 0.0
        for _ in range(12):
            calls, hooks = [0] * L, []
            for k, (n, c, size) in enumerate(zip(names, f, sizes)):
                idx = torch.randperm(size, generator=g)[:c]

                def hook(m, i, o, idx=idx, k=k):
                    calls[k] += 1
                    o = o.clone()
                    o.view(o.shape[0], -1)[:, idx] = 0
                    return o
                hooks.append(mods[n].register_forward_hook(hook))
            try:
                with torch.no_grad():
                    worst = max(worst, float((e.model(e.x) - clean).abs().max()))
            finally:
                for h in hooks:
                    h.remove()
            assert calls == [1] * L, (name, calls)  # each hidden layer is one module call
        assert worst > 0, (name, f)  # the crashes do reach the output
        assert_sound(res, worst, f"{name} f={f}")


def test_a_language_model_folder_without_data_is_exported_for_token_ids(root: Path) -> None:
    """No --data: a folder whose main input is ``input_ids`` is exported with integer token ids
    (a float example made the export fail on the embedding), so the graph bounds read the exported
    graph and ask, in one line, for the test inputs their per-input bounds need."""
    e = entry("hf-gpt2", root)
    rc, out, err = _run(["bound", e.cli[0], "--input-shape", str(e.x.shape[1]), "--failures", "1"])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and not out, err
    assert "needs test inputs" in lines[0] and "cannot export" not in lines[0], lines[0]


def test_inject_on_a_language_model_folder_without_data_draws_token_ids(root: Path) -> None:
    """No --data: seeded random token ids below the vocabulary size (random floats made the
    embedding fail), and the output says so; the same command gives the same rows."""
    e = entry("hf-gpt2", root)
    cmd = ["inject", e.cli[0], "--input-shape", str(e.x.shape[1]), "--inputs", "4", "--count", "6",
           "--no-progress", "--json"]
    rc, out, err = _run(cmd)
    assert rc == 0, err
    info = json.loads(out)
    assert info["injection_path"] == "general" and info["configs"] == 6
    rc2, out2, _ = _run(cmd)
    assert rc2 == 0 and json.loads(out2)["summary"] == info["summary"]
    rc, out, err = _run(cmd[:-1])
    assert rc == 0 and "seeded random sequences of token ids in [0, " in out, err
