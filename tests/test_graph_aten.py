"""Graph bounds on torch.export ATen graphs (a Hugging Face LLaMA folder as ``hwrel`` loads it):
the translated graph computes the exported program bit for bit, the bounds hold against exact crash
injection, an overflowed bound reads inf (never NaN), and ``hwrel bound FOLDER`` takes the graph."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hwrel.bounds import graph_rules as R
from hwrel.bounds.graph import _no_nan, crash_outputs, graph_bound, graph_layers, layer_sizes, trace, validate
from hwrel.inject.general_sites import plain_forward

VOCAB, T = 64, 16


def _folder(tmp_path_factory, kind: str):
    """A tiny transformers model saved as a folder and read back as ``hwrel`` loads it: (folder,
    exported program, token ids)."""
    transformers = pytest.importorskip("transformers")
    from hwrel.loading import load_model

    folder = tmp_path_factory.mktemp("hf") / kind
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "llama":
            cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                           max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
            hf = transformers.LlamaForCausalLM(cfg)
        else:
            cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)
            hf = transformers.GPT2LMHeadModel(cfg)
        hf.eval().save_pretrained(str(folder), safe_serialization=True)
    x = torch.randint(0, VOCAB, (6, T), generator=torch.Generator().manual_seed(1))
    program = load_model(folder).module_for((T,), x.dtype)
    return folder, program, x


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _folder(tmp_path_factory, "llama")


def test_translated_graph_computes_the_exported_program(llama):
    _, program, x = llama
    gm = trace(program)
    assert not any(n.op == "call_function" and str(n.target).startswith("aten.linear") for n in gm.graph.nodes)
    with plain_forward():
        assert torch.equal(program(x), gm(x))
    assert graph_layers(program) == ["silu", "silu_1"] and trace(program) is gm  # translated once


def test_bounds_hold_against_exact_crashes(llama):
    _, program, x = llama
    sizes = layer_sizes(program, x)
    b = graph_bound(program, {"silu_1": 1}, lo=x).bound
    assert bool(torch.isfinite(b).all()) and float(b.max()) < 1.0
    check = validate(program, x, "silu_1", b, sets=16)
    assert check["violations"] == 0 and 0 < check["measured_max"] <= float(b.max())
    f = 4  # several crashes at once, random sets
    b4 = graph_bound(program, {"silu_1": f}, lo=x).bound
    clean = crash_outputs(program, x, {})
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx = torch.randperm(sizes["silu_1"], generator=g)[:f]
        d = (crash_outputs(program, x, {"silu_1": idx}) - clean).abs().flatten(1).double()
        assert bool((d <= b4).all())
    # the first block overflows (interval precision through attention): inf, never NaN or a huge finite
    first = graph_bound(program, {"silu": 1}, lo=x).bound
    assert not bool(torch.isnan(first).any()) and math.isinf(float(first.max()))


def test_nan_errors_read_inf():
    v = R.Val(torch.zeros(2), torch.ones(2), torch.tensor([math.nan, 1.0]))
    assert _no_nan(v).e.tolist() == [math.inf, 1.0]


def test_cli_bound_on_a_hugging_face_folder(llama, tmp_path, capsys):
    from hwrel.cli import main

    folder, _, x = llama
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=x[:, 1:].numpy())
    assert main(["bound", str(folder), "--data", str(tmp_path / "d.npz"), "--failures", "0,1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["path"] == "graph" and r["layers"] == ["silu", "silu_1"] and r["inputs"] == 6
    assert 0 < r["per_input_max"] < 1.0


def test_weights_of_an_exported_program_are_rounded_and_bounded(llama):
    import copy

    from hwrel.quantize.graph import graph_bitwidth, round_weights, rounded_weights

    _, program, x = llama
    names = [n for n, _, _ in rounded_weights(program)]
    assert len(names) == 15 and all(n.endswith("_proj.weight") or n.endswith("lm_head.weight") for n in names)
    q = round_weights(program, 8)
    with plain_forward():
        assert not torch.equal(q(x), program(x))  # the copy computes with the rounded weights
    # a deep copy is translated anew (its own weights), never served the original's translation
    assert trace(copy.deepcopy(program)) is not trace(program)
    with torch.no_grad():
        y = program(x)[:, :-1].argmax(-1)
    res = graph_bitwidth(program, x, y, bits=(12, 16))
    assert (res.table["violations"].dropna() == 0).all() and res.clean_accuracy == 1.0


# --------------------------------------------------------------------------- GPT-2 (Conv1D = addmm)

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A transformers GPT-2: ``Conv1D`` layers (``addmm`` with weights stored (in, out)), the tanh
    GELU written out (``x ** 3``), q/k/v by ``split``, the output layer tied to the embedding."""
    return _folder(tmp_path_factory, "gpt2")


def test_gpt2_translated_graph_computes_the_exported_program(gpt2):
    _, program, x = gpt2
    gm = trace(program)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.addmm in targets and torch.split in targets and torch.ops.aten.addmm.default not in targets
    with plain_forward():
        assert torch.equal(program(x), gm(x))
    assert graph_layers(program) == ["tanh", "tanh_1"]


def test_gpt2_bounds_hold_against_exact_crashes(gpt2):
    _, program, x = gpt2
    sizes = layer_sizes(program, x)
    b = graph_bound(program, {"tanh_1": 1}, lo=x).bound
    assert bool(torch.isfinite(b).all())
    check = validate(program, x, "tanh_1", b, sets=16)
    assert check["violations"] == 0 and 0 < check["measured_max"] <= float(b.max())
    f = 4
    b4 = graph_bound(program, {"tanh_1": f}, lo=x).bound
    clean = crash_outputs(program, x, {})
    g = torch.Generator().manual_seed(0)
    for layer in ("tanh", "tanh_1"):
        bl = b4 if layer == "tanh_1" else graph_bound(program, {"tanh": f}, lo=x).bound
        assert not bool(torch.isnan(bl).any())
        for _ in range(6):
            idx = torch.randperm(sizes[layer], generator=g)[:f]
            d = (crash_outputs(program, x, {layer: idx}) - clean).abs().flatten(1).double()
            assert bool((d <= bl).all()), layer


def test_gpt2_weights_are_rounded_per_output_channel_and_the_tied_output_layer_stays_float(gpt2):
    from hwrel.quantize.graph import graph_bitwidth, round_weights, rounded_weights, weight_radii
    from hwrel.quantize.rounding import weight_storage
    from hwrel.quantize.graph import PER_CHANNEL

    _, program, x = gpt2
    found = rounded_weights(program)
    names = [n for n, _, _ in found]
    assert len(names) == 8 and all(n.split(".")[-2] in ("c_attn", "c_proj", "c_fc") for n in names), names
    assert not any("wte" in n or "lm_head" in n for n in names)  # tied to the embedding: not rounded
    q = round_weights(program, 4)
    radii = weight_radii(program, 4)
    qs = dict(q.named_parameters(remove_duplicate=False)) | dict(q.named_buffers())
    for name, m, p in found:
        w = getattr(m, p).detach()
        wq = qs[name].detach() if name in qs else None
        if wq is None:  # constants of an exported program live as attributes
            owner, _, attr = name.rpartition(".")
            wq = getattr(q.get_submodule(owner), attr).detach()
        # one scale per output channel: the stored (in, out) tensor is rounded column by column
        assert torch.equal(wq, weight_storage(w.t().contiguous(), 4, PER_CHANNEL).dequantize().t())
        assert bool(((wq.double() - w.double()).abs() <= radii[name]).all()) and radii[name].shape == w.shape
    with torch.no_grad():
        y = program(x)[:, :-1].argmax(-1)
    res = graph_bitwidth(program, x, y, bits=(12, 16))
    assert (res.table["violations"].dropna() == 0).all() and res.table["violations"].notna().any()


def test_weight_radii_on_a_raw_exported_module_are_found_and_sound():
    """``torch.export(...).module()`` given as it is: the bounds run on its translation (a copy of its
    weights), and the radii, named as in the module, still reach them (they were refused before)."""
    from torch import nn

    from hwrel.quantize.graph import round_weights, weight_radii

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6)
    ep = torch.export.export(model, (x,)).module()
    radii = weight_radii(ep, 6)
    assert len(radii) == 2
    b = graph_bound(ep, {}, lo=x, weight_radius=radii).bound
    with plain_forward():
        d = (round_weights(ep, 6)(x) - ep(x)).abs().flatten(1).double()
    assert bool((d <= b).all()) and float(d.max()) > 0
