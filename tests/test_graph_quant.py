"""Weight perturbations through the graph bounds (``graph_bound(weight_radius=...)``) and the
certified bit width on general graphs (``hwrel.quantize.graph``): every bound holds against the
rounded copy and against random and gradient-aligned perturbations within the radii, on a ViT, a
Conv1d sequence model, a LLaMA-style LM and mnist-vit; the harness fails when the radii are cut."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from general_models import build
from hwrel import models
from hwrel.bounds.graph import graph_bound
from hwrel.errors import UnsupportedLayerError
from hwrel.inject.general_sites import plain_forward
from hwrel.quantize.graph import graph_bitwidth, round_weights, rounded_weights, weight_radii


def _cases():
    out = []
    for kind in ("vit", "conv1d", "gpt"):
        model, x = build(kind)
        out.append((kind, model, x))
    ref = models.load("mnist-vit")
    out.append(("mnist-vit", ref.module, ref.x_test[:8]))
    return out


CASES = _cases()


def _out(model, x):
    with plain_forward():
        return model(x).double().flatten(1)


def _perturbed(model, radii, signs):
    """A copy whose rounded weights move by ``signs[name] * R`` (|signs| <= 1), stored in float32."""
    q = copy.deepcopy(model)
    mods = dict(q.named_modules())
    with torch.no_grad():
        for name, _, p in rounded_weights(q):
            m = mods[name.rpartition(".")[0]] if "." in name else q
            w = getattr(m, p)
            # 0.999: the float32 store of w + d stays within R (R is far above an ulp at these widths)
            w.copy_((w.double() + 0.999 * signs[name] * radii[name]).to(w.dtype))
    return q


@pytest.mark.parametrize("kind,model,x", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_radius_bounds_rounding_and_every_perturbation(kind, model, x, bits):
    radii = weight_radii(model, bits)
    bound = graph_bound(model, {}, lo=x, weight_radius=radii).bound
    clean = _out(model, x)
    worst = (_out(round_weights(model, bits), x) - clean).abs()
    assert bool((worst <= bound).all()), kind
    g = torch.Generator().manual_seed(bits)
    for k in range(3):  # uniform inside the box, then its corners
        signs = {n: (torch.rand(r.shape, generator=g, dtype=torch.float64) * 2 - 1) if k == 0 else
                 torch.randint(0, 2, r.shape, generator=g).double() * 2 - 1 for n, r in radii.items()}
        d = (_out(_perturbed(model, radii, signs), x) - clean).abs()
        assert bool((d <= bound).all()), (kind, k)


def _aligned_signs(model, x, radii):
    """Per weight the sign that moves the sum of outputs up, to first order (the adversarial corner)."""
    q = copy.deepcopy(model)
    params = dict(q.named_parameters())
    out = q(x)
    out.sum().backward()
    return {n: params[n].grad.sign().double() for n in radii}


def test_the_harness_finds_a_bound_built_on_smaller_radii():
    """Power: with every radius cut to an eighth, the gradient-aligned corner of the true radii
    exceeds the bound somewhere (the Conv1d model, whose bound is tight enough to tell)."""
    model, x = build("conv1d")
    radii = weight_radii(model, 4)
    signs = _aligned_signs(model, x, radii)
    d = (_out(_perturbed(model, radii, signs), x) - _out(model, x)).abs()
    full = graph_bound(model, {}, lo=x, weight_radius=radii).bound
    cut = graph_bound(model, {}, lo=x, weight_radius={n: r / 8 for n, r in radii.items()}).bound
    assert bool((d <= full).all()) and bool((d > cut).any())


def test_a_radius_no_rule_reads_is_refused():
    model, x = build("conv1d")
    radii = weight_radii(model, 8)
    with pytest.raises(UnsupportedLayerError, match="weight perturbation of nothere.weight"):
        graph_bound(model, {}, lo=x, weight_radius={**radii, "nothere.weight": torch.ones(1)})


def test_graph_bitwidth_certifies_the_conv1d_model_and_checks_itself():
    model, x = build("conv1d")
    with torch.no_grad():
        y = model(x).argmax(1)
    res = graph_bitwidth(model, x, y, bits=(2, 4, 8, 12), max_accuracy_drop=0.0)
    t = res.table.set_index("bits")
    assert res.metric == "class" and res.clean_accuracy == 1.0
    assert (t["violations"].dropna() == 0).all() and (t["measured_max"].dropna() <= t["bound_max"].dropna()).all()
    # every input certified at 8 and 12 bits here, so the certified width is at most 8
    assert res.certified_bits is not None and res.certified_bits <= 8
    assert bool(t.loc[res.certified_bits:, "meets_budget_certified"].all())
    b8 = graph_bound(model, {}, lo=x, weight_radius=weight_radii(model, 8)).bound
    assert t.loc[8, "bound_max"] == pytest.approx(float(b8.max()))
    # below a width that certifies nothing the narrower ones are not evaluated, and count 0
    empty = t[t["certified_fraction"] == 0]
    if len(empty) > 1:
        assert empty["bound_max"].iloc[:-1].isna().all()


def test_language_model_widths_count_next_token_positions():
    model, x = build("gpt")
    with torch.no_grad():
        logits = model(x)
    y = logits[:, :-1].argmax(-1)  # the clean model's own next tokens: accuracy 1 at 0 radius
    res = graph_bitwidth(model, x, y, bits=(12, 16))
    assert res.metric == "next-token" and res.clean_accuracy == 1.0
    assert (res.table["violations"].dropna() == 0).all()
    assert res.table["certified_accuracy"].between(0, 1).all()


def test_cli_bitwidth_prints_the_certified_width(tmp_path, capsys):
    from safetensors.torch import save_file

    from hwrel.cli import main

    shutil.copy(Path(__file__).parent / "general_models.py", tmp_path / "gmodels.py")
    model, x = build("conv1d")
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(tmp_path / "c.safetensors"))
    with torch.no_grad():
        y = model(x).argmax(1)
    np.savez(tmp_path / "c.npz", x=x.numpy(), y=y.numpy())
    args = [str(tmp_path / "c.safetensors"), "--architecture", f"{tmp_path / 'gmodels.py'}:ConvSeq",
            "--data", str(tmp_path / "c.npz"), "--bits", "4..8", "--max-accuracy-drop", "0"]
    assert main(["bitwidth", *args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["certified"] == "graph" and r["certified_bits"] is not None and r["certified_bits"] <= 8
    assert [row["bits"] for row in r["certified_table"]] == [4, 5, 6, 7, 8]
    assert all(row["violations"] in (0, None) for row in r["certified_table"])
    assert main(["bitwidth", *args]) == 0
    out = capsys.readouterr().out
    assert f"certified    bits: {r['certified_bits']} bits (sound on each of the test inputs" in out


def test_report_on_a_conv1d_model_shows_the_certified_width(tmp_path):
    """The general report's bit-width section and executive summary: the width certified over the
    graph, the same as graph_bitwidth computes, checked against the rounded copy."""
    import pandas as pd

    from hwrel.report import ReportConfig, build_report

    model, x = build("conv1d")
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = ReportConfig(samples=8, failure_counts=(1,), random_sets=2, adversarial=False, seu_campaign=20,
                       seu_samples=8, bits=(4, 6, 8), flip_search=False, tolerance_curve=False)
    out = build_report(model, "eyeriss-v1", out=tmp_path / "r", data=(x, y), config=cfg, progress=False,
                       input_domain=(0.0, 1.0))
    want = graph_bitwidth(model, x, y, bits=(4, 6, 8), max_accuracy_drop=0.01)
    qb = pd.read_csv(out / "tables" / "graph_bitwidth.csv")
    assert list(qb["certified_accuracy"]) == pytest.approx(list(want.table["certified_accuracy"]))
    assert (qb["violations"].dropna() == 0).all()
    s = pd.read_csv(out / "tables" / "summary.csv").set_index("item")
    assert want.certified_bits is not None
    assert s.loc["safe bit width (certified)", "kind"] == "certified"
    assert s.loc["safe bit width (certified)", "value"] == want.certified_bits


def test_every_read_of_a_perturbed_weight_is_bounded_or_refused():
    """A weight tied to an embedding table is not rounded, and a radius on it is refused (no rule
    bounds a perturbed lookup); a weight
    read twice (as a Linear and directly in a matmul) is bounded at both reads; a bare encoder layer's
    radii (named without its tracing wrapper) are found."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.lm_head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
            self.wte.weight = self.lm_head.weight

        def forward(self, ids):
            return self.lm_head(self.wte(ids))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.fc(x) + torch.matmul(x, self.fc.weight)

    torch.manual_seed(0)
    tied = Tied().eval()
    ids = torch.randint(0, 16, (2, 5))
    assert rounded_weights(tied) == []  # rounding the tied table would move the lookup too: it stays float
    radius = {"lm_head.weight": torch.full((16, 8), 1e-3, dtype=torch.float64)}
    with pytest.raises(UnsupportedLayerError, match="wte .*reads the perturbed parameter lm_head.weight"):
        graph_bound(tied, {}, lo=ids, weight_radius=radius)
    twice = Twice().eval()
    with torch.no_grad():  # every weight half a step from its grid point: the rounding moves each one far
        k = torch.arange(64.0).reshape(8, 8)
        twice.fc.weight.copy_((k % 7 + 0.51) / 7 * torch.sign(torch.randn(8, 8)))
    x = torch.sign(torch.randn(4, 8))
    radii = weight_radii(twice, 4)
    b = graph_bound(twice, {}, lo=x, weight_radius=radii).bound
    signs = {n: torch.sign(twice.fc.weight.detach()).double() for n in radii}
    for q in (round_weights(twice, 4), _perturbed(twice, radii, signs)):
        assert bool(((_out(q, x) - _out(twice, x)).abs() <= b).all())
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    xs = torch.rand(2, 3, 8)
    b = graph_bound(layer, {}, lo=xs, weight_radius=weight_radii(layer, 8)).bound
    assert bool(((_out(round_weights(layer, 8), xs) - _out(layer, xs)).abs() <= b).all())


def test_a_width_certified_without_any_certified_input_says_so():
    """A budget larger than the clean accuracy is met with nothing certified (an untrained model):
    the certified-width line says that the budget, not a certificate, carried it."""
    import pandas as pd

    from hwrel.quantize.graph import GraphBitwidth
    from hwrel.report.general_sections import _certified_width

    table = pd.DataFrame({"bits": [8, 16], "bound_max": [9.0, 8.0], "bound_median": [9.0, 8.0],
                          "certified_fraction": [0.0, 0.0], "certified_accuracy": [0.0, 0.0],
                          "meets_budget_certified": [True, True]})
    line = _certified_width(GraphBitwidth(table, 8, 0.0167, 0.05, "next-token", ("w",)), "")
    assert line.startswith("8 bits") and "no input is certified" in line and "1.67%" in line
    table["certified_fraction"] = [0.5, 0.9]
    assert "no input is certified" not in _certified_width(GraphBitwidth(table, 8, 0.9, 0.05, "class", ("w",)), "")
