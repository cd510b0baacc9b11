"""The report of a model the bounds do not support: "not applicable" where a bound would be, no
certified number anywhere, the measured analyses (general injection path) present and consistent."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwrel.inject.target import GeneralModel, as_target
from hwrel.report import ReportConfig, build_report
from hwrel.report.general import bounds_reason, measured_bitwidth, round_weights

sys.path.insert(0, str(Path(__file__).parent))
import general_models  # noqa: E402

# The smallest settings the report takes: a handful of inputs, flips and widths.
TINY = ReportConfig(samples=24, failure_counts=(1,), random_sets=2, adversarial=False, seu_campaign=40,
                    seu_samples=12, bits=(4, 8), flip_search=False, tolerance_curve=False)
SECTIONS = ("executive", "summary", "fep", "bitwidth", "seu", "provenance", "iso26262", "validation", "reproduce")
# tables that only a certified analysis writes
CERTIFIED_TABLES = ("fep_bounds", "fep_tolerance", "validation", "seu_critical_bits", "seu_critical_layers",
                    "seu_protection_plan", "hardening", "iso26262", "sensitivity", "layers", "mapping")


def _vit_data(n: int = 24, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, _ = general_models.build("vit", seed)
    for blk in model.blocks:  # ELU: an activation the graph bounds have no rule for either (they
        blk.activation = F.elu  # cover the GELU TransformerEncoderLayer), so no bound covers this model
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10  # some inputs misclassified: the accuracy is not trivially 1
    return model, x, y


@pytest.fixture(scope="module")
def vit_report(tmp_path_factory):
    model, x, y = _vit_data()
    out = tmp_path_factory.mktemp("rep") / "vit"
    return build_report(model, "eyeriss-v1", out=out, data=(x, y), config=TINY, progress=False,
                        input_domain=(0.0, 1.0)), model


def test_general_report_says_not_applicable_with_the_operation(vit_report):
    folder, model = vit_report
    target = as_target(model, (0.0, 1.0), (1, 8, 8))
    assert isinstance(target, GeneralModel)
    reason = bounds_reason(target.reason)
    assert reason.startswith("the bounds do not support operation ") and "getattr" in reason  # node and op
    html = (folder / "index.html").read_text(encoding="utf-8")
    md = (folder / "report.md").read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    for text in (html, md):
        assert f"not applicable: {reason}" in text
        assert "Injection path: <strong>general</strong>" in text or "Injection path: **general**" in text
    # every certified section says so, and none shows a bound
    for sid in ("fep", "iso26262", "validation"):
        body = html.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "not applicable" in body and "<table" not in body, sid
    for bad in ("certified k =", "Certified bounds per layer", "recommended uniform width (certified)</td><td>4",
                "BOUND VIOLATIONS", "upper bound)</td><td>0"):
        assert bad not in html, bad


def test_general_report_has_no_certified_number(vit_report):
    folder, _ = vit_report
    tables = {p.stem: pd.read_csv(p) for p in (folder / "tables").glob("*.csv")}
    assert not set(CERTIFIED_TABLES) & set(tables)
    for name, df in tables.items():  # no column silently all-empty
        for col in df.columns:
            assert df[col].notna().any(), (name, col)
        assert not any(c.startswith(("certified", "bound")) for c in df.columns), name
    s = tables["summary"]
    assert "certified" not in set(s["kind"])
    na = s[s["kind"] == "not applicable"]
    assert len(na) >= 4 and na["shown"].str.startswith("not applicable: ").all() and na["value"].isna().all()
    assert set(s["kind"]) <= {"not applicable", "measured", "exact", "estimate given the rates"}


def test_general_report_measures_seu_and_bitwidth(vit_report):
    folder, _ = vit_report
    t = folder / "tables"
    per_tensor, camp = pd.read_csv(t / "seu_tensors.csv"), pd.read_csv(t / "seu_campaign.csv")
    params = pd.read_csv(t / "parameters.csv")
    assert len(camp) == TINY.seu_campaign == int(per_tensor["flips"].sum())
    assert set(per_tensor["tensor"]) <= set(params["tensor"]) and set(camp["tensor"]) <= set(params["tensor"])
    assert (camp["vulnerable"] == ((camp["mismatch_rate"] > 0) | camp["nonfinite"])).all()
    assert int(per_tensor["vulnerable"].sum()) == int(camp["vulnerable"].sum())
    fit = pd.read_csv(t / "seu_fit.csv")
    assert int(fit["bits"].sum()) == int(params["bits"].sum())
    frac = camp["vulnerable"].mean()
    assert fit["vulnerable_fraction_measured"].eq(frac).all()
    bw = pd.read_csv(t / "bitwidth.csv")
    assert list(bw["bits"]) == list(TINY.bits)
    assert bw["measured_accuracy"].between(0, 1).all()
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert "Measured vulnerable flips per parameter tensor" in md
    assert "measured on the test inputs (an estimate, not a certificate)" in md
    assert "Brevitas PTQ cannot quantize this model" in md  # TransformerEncoderLayer: weight rounding instead


def test_round_weights_is_per_channel_symmetric_and_leaves_the_model():
    from hwrel.quantize.rounding import QuantSpec, weight_storage

    model, _ = general_models.build("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = round_weights(model, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    spec = QuantSpec(per_channel=True)
    w = model.head.weight.detach()
    assert torch.equal(q.head.weight, weight_storage(w, 4, spec).dequantize())
    for row in q.head.weight:  # per output channel: at most 2^(b-1) - 1 = 7 levels either side
        step = row.abs().max() / 7
        assert torch.allclose(row / step, (row / step).round(), atol=1e-4)
    attn = q.blocks[0].self_attn.in_proj_weight  # attention input projections are rounded too
    assert not torch.equal(attn, model.blocks[0].self_attn.in_proj_weight)
    assert torch.equal(q.norm.weight, model.norm.weight)  # LayerNorm stays float


def test_measured_bitwidth_uses_brevitas_where_it_quantizes():
    model, x = general_models.build("mobilenet")  # squeeze-excite: no bounds, but Brevitas PTQ runs
    with torch.no_grad():
        y = model(x).argmax(1)
    res = measured_bitwidth(model, x, y, x, (4, 16), 0.01)
    assert res.method.startswith("Brevitas PTQ") and res.note is None
    assert res.table["measured_accuracy_drop"].iloc[-1] <= 0.01 and res.measured_bits in (4, 16)
    assert not any(math.isnan(v) for v in res.table["measured_accuracy"])


def test_model_with_an_unsupported_operation_gets_a_measured_report(tmp_path):
    class Sorting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.sort(self.fc(x), dim=1).values)  # no bound rule for sort

    torch.manual_seed(0)
    x = torch.rand(16, 4)
    out = build_report(Sorting(), out=tmp_path / "rep", data=(x, torch.zeros(16, dtype=torch.long)),
                       config=TINY, progress=False)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "not applicable: the bounds do not support operation sort" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folder left


def test_language_model_report_measures_next_tokens(tmp_path):
    """A causal LM ((B, T) tokens, (B, T - 1) next-token labels): next-token accuracy, and the
    campaign's own measures (agreement, cross-entropy) instead of a class accuracy."""
    model, tokens = general_models.build("gpt")
    out = build_report(model, out=tmp_path / "rep", data=(tokens, tokens[:, 1:]), config=TINY, progress=False)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "not applicable: the bounds do not support" in md and "next-token top-1" in md
    per_tensor = pd.read_csv(out / "tables" / "seu_tensors.csv")
    assert "max_cross_entropy_delta" in per_tensor and int(per_tensor["flips"].sum()) == TINY.seu_campaign
    assert "not measured: a language model's campaign" in md


@pytest.mark.slow
def test_cli_report_on_the_built_in_vit(tmp_path, capsys):
    """`hwrel report mnist-vit --quick`: the command of the task, end to end (about 15 s on 2 cores)."""
    from hwrel.cli import main

    out = tmp_path / "rvit"
    assert main(["report", "mnist-vit", "--quick", "--out", str(out), "--force", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "not applicable: the bounds do not support operation permute (tensor method .permute) yet" in md
    assert "hwrel report mnist-vit --quick --accelerator eyeriss-v1" in md  # the command that reproduces it
    assert "weight rounding (per-channel symmetric" in md and "LayerNorm" in md  # Brevitas refused, said why
    summary = pd.read_csv(out / "tables" / "summary.csv")
    # the graph bounds and the tolerance on them are the only certified items (the graph test checks them)
    assert list(summary[summary["kind"] == "certified"]["section"]) == ["fep", "fep", "bitwidth"]


def test_report_on_a_graph_bounded_model_shows_the_graph_fep(tmp_path):
    """mnist-vit: the Network bounds refuse it, the graph bounds cover it: the Fep section shows a
    certified bound per failure layer with its validation (no violation), the banner says that only
    these are certified, and the other certified sections still say not applicable."""
    from hwrel import models
    from hwrel.bounds.graph import graph_bound

    ref = models.load("mnist-vit")
    x, y = ref.x_test[:24], ref.y_test[:24]
    out = build_report(ref.module, "eyeriss-v1", out=tmp_path / "vit", data=(x, y), config=TINY, progress=False,
                       input_domain=(0.0, 1.0))
    t = pd.read_csv(out / "tables" / "graph_fep.csv")
    assert list(t["layer"]) == ["blocks.0.act", "blocks.1.act"] and (t["violations"] == 0).all()
    want = graph_bound(ref.module, {"blocks.1.act": 1}, lo=x).bound.amax(1)
    assert t.loc[1, "bound_max"] == pytest.approx(float(want.max()))
    assert (t["measured_max"] <= t["bound_max"]).all() and t["certified_top1_fraction"].between(0, 1).all()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "only the neuron-crash bounds and tolerance over the model" in html
    assert "the certified bit width over it (section Safe bit width)" in html
    body = html.split('<section id="iso26262">')[1].split("</section>")[0]
    assert "not applicable" in body
    assert "no violation: every measured change is within its certified bound" in html
    # the certified tolerance per layer at the report's budget, as graph_tolerance computes it
    from hwrel.bounds.tolerance import graph_tolerance

    tol = pd.read_csv(out / "tables" / "graph_tolerance.csv")
    want_tol = graph_tolerance(ref.module, x, y, max_drop=0.01).table
    assert list(tol["layer"]) == list(t["layer"]) and list(tol["tolerated"]) == list(want_tol["tolerated"])
    assert tol["certified_fraction"].tolist() == pytest.approx(want_tol["certified_fraction"].tolist())
    s = pd.read_csv(out / "tables" / "summary.csv")
    row = s[s["kind"] == "certified"]
    assert len(row) == 3 and row["value"].iloc[0] == pytest.approx(t.loc[1, "bound_max"])
    assert row["value"].iloc[1] == tol["tolerated"].iloc[-1]
    # the certified bit width over the graph, checked against the rounded copy (vacuous on this ViT)
    qb = pd.read_csv(out / "tables" / "graph_bitwidth.csv")
    assert (qb["violations"].dropna() == 0).all() and list(qb["bits"]) == [4, 8]
    assert "Certified bit width against the rounded copy at every evaluated width: no violation" in html
    assert "No number in this report is a bound" not in html
