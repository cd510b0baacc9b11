"""The reliability report: content, self-containment, atomic output, errors, committed example."""
from __future__ import annotations

import base64
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hwrel.cli import main
from hwrel.errors import HwrelError
from hwrel.report import QUICK, ReportConfig, build_report, render, sections

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "reports" / "example-digits-mlp-eyeriss-v1"
SECTIONS = ("executive", "summary", "fep", "bitwidth", "seu", "provenance", "iso26262", "validation", "reproduce")
FIGURES = ("fep_bounds", "fep_tolerance", "bitwidth", "seu_critical_bits", "seu_mission", "validation")
# Committed example vs regenerated: the weights ship with hwrel, so the same machine reproduces
# exactly; other machines may round float sums differently: numbers must agree to 1% (1e-6 near 0).
RTOL, ATOL = 1e-2, 1e-6
SMALL = ReportConfig(samples=96, random_sets=8, adversarial_steps=2, adversarial_inputs=8, seu_campaign=60,
                     seu_samples=48, bits=(4, 8, 12, 16))


def check_html(folder: Path) -> str:
    """Every section and figure present, every figure an embedded vector SVG, nothing external."""
    text = (folder / "index.html").read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text, sid
    assert text.index('<section id="executive">') < text.index('<section id="summary">')  # the summary opens
    for name in FIGURES:
        m = re.search(rf'<figure id="fig-{name}"><img alt="[^"]*" width="(\d+)" height="(\d+)" '
                      rf'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', text)
        assert m is not None, name
        svg = base64.b64decode(m.group(3))
        assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg and b"<text" in svg, name  # text kept as text
        assert svg == (folder / "figures" / f"{name}.svg").read_bytes()
        assert int(m.group(1)) >= 400 and int(m.group(2)) >= 250, name  # drawn at print size, not a thumbnail
    lower = text.lower()
    for bad in ("http://", "https://", "<script", "<link", "@import", "url(", "<iframe", "file://"):
        assert bad not in lower, bad
    srcs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert srcs and all(s.startswith(("data:image/svg+xml;base64,", "#")) for s in srcs)
    md = (folder / "report.md").read_text(encoding="utf-8")
    for name in FIGURES:
        assert f"(figures/{name}.svg)" in md
    return text


def test_cli_refuses_existing_folder(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["report", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hwrel: error: output folder") and "--force" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"] and (out / "keep.txt").read_text() == "mine"


def test_cli_unwritable_folder(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["report", "--out", str(blocker / "rep"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write there" in err[0] and str(blocker / "rep") in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("argv, words", [
    (["not-a-model"], "neither a built-in model"),
    (["digits-mlp", "--accelerator", "no-such-chip"], "no-such-chip"),
    (["digits-mlp", "--target", "asil-z"], "asil-z"),
    (["digits-mlp", "--max-accuracy-drop", "150%"], "--max-accuracy-drop"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, argv, words):
    assert main(["report", *argv, "--out", str(tmp_path / "rep"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hwrel: error:") and words in err[0]
    assert list(tmp_path.iterdir()) == []


def test_model_file_that_cannot_be_read(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a torch file")
    assert main(["report", str(bad), "--out", str(tmp_path / "rep"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model file" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_module_that_cannot_be_analysed(tmp_path):
    """No hidden layer: nothing can fail. (A model the bounds do not support gets a measured report:
    tests/test_report_general.py.)"""
    x = torch.rand(10, 4)
    with pytest.raises(HwrelError, match=r"cannot be analysed: it has no hidden layer") as e:
        build_report(nn.Sequential(nn.Linear(4, 3)), out=tmp_path / "rep", data=(x, torch.zeros(10, dtype=torch.long)),
                     progress=False)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


def test_no_half_written_report(tmp_path, monkeypatch):
    import hwrel.report as rep

    def boom(*a, **k):
        raise RuntimeError("disk full while analysing")

    monkeypatch.setattr(rep, "_analyse", boom)
    with pytest.raises(RuntimeError):
        build_report("digits-mlp", out=tmp_path / "rep", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_violation_is_loud():
    checks = pd.DataFrame([
        {"analysis": "Fep crash", "case": "L1 f=1", "quantity": "q", "bound": 1.0, "must_hold": "measured <= bound",
         "measured": 0.5, "violated": False},
        {"analysis": "Fep crash", "case": "L2 f=1", "quantity": "q", "bound": 1.0, "must_hold": "measured <= bound",
         "measured": 1.5, "violated": sections._violated(1.5, 1.0)},
    ])
    assert not sections._violated(1.0 + 1e-12, 1.0) and sections._violated(1.0 + 1e-6, 1.0)
    banner = sections.violation_banner(checks, [])
    assert banner.kind == "alert" and "BOUND VIOLATIONS FOUND: 1 of 2" in banner.text and "L2 f=1" in banner.text
    ok = sections.violation_banner(checks.iloc[:1], [])
    assert ok.kind == "ok" and ok.text.startswith("Bound violations: none")
    page = render.to_html(render.Report("t", "s", (sections.validation_section(checks, banner, None),), banner))
    assert page.count('class="alert"') == 2 and "BOUND VIOLATIONS FOUND" in page


def test_missing_analysis_says_so():
    for sec in (sections.bitwidth_section(None, None), sections.seu_section(None, None, None),
                sections.fep_section(None)):
        assert any(sections.NOT_AVAILABLE in b.text for b in sec.blocks)
    assert "not available in this version" in sections.violation_banner(
        pd.DataFrame(columns=["violated"]), ["SEU tolerance"]).text


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "digits"
    out.mkdir()
    (out / "stale.txt").write_text("old report")
    path = build_report("digits-mlp", "eyeriss-v1", out=out, force=True, config=SMALL, progress=False)
    return path


def test_report_contents(small_report):
    assert not (small_report / "stale.txt").exists()  # --force replaced the old folder
    assert [p.name for p in small_report.parent.iterdir()] == ["digits"]  # no temporary folder left
    text = check_html(small_report)
    assert "Bound violations: none" in text and "BOUND VIOLATIONS" not in text
    for needle in ("hwrel", "torch", "brevitas", "python", "seed", "hwrel report digits-mlp --accelerator eyeriss-v1",
                   "FIT with SECDED ECC", "asil-b", "recommended uniform width", "Tolerated failures per layer",
                   "injection path</td><td>fast engine"):
        assert needle in text, needle
    tables = {p.stem: pd.read_csv(p) for p in (small_report / "tables").glob("*.csv")}
    b = tables["fep_bounds"]
    assert set(b.fault) == {"crash", "byzantine"}
    assert (b.best <= b[["paper", "weights", "interval"]].min(axis=1) + 1e-9).all()
    v = tables["validation"]
    assert len(v) > 20 and not v.violated.any()
    le = v[v.must_hold == "measured <= bound"]
    assert (le.measured <= le.bound * (1 + 1e-4) + 1e-4).all()
    assert {"Fep crash", "Fep byzantine", "quantization", "SEU single flips"} <= set(v.analysis)
    bw = tables["bitwidth"]
    assert list(bw.bits) == [4, 8, 12, 16]
    tol = tables["fep_tolerance"]
    assert (tol.certified_accuracy_drop <= 0.01 + 1e-12).all() and (tol.tolerated <= tol.neurons).all()


def _compare_tables(committed: Path, fresh: Path) -> None:
    names = sorted(p.name for p in (committed / "tables").glob("*.csv"))
    assert names == sorted(p.name for p in (fresh / "tables").glob("*.csv"))
    for name in names:
        a, b = pd.read_csv(committed / "tables" / name), pd.read_csv(fresh / "tables" / name)
        assert list(a.columns) == list(b.columns) and a.shape == b.shape, name
        for col in a.columns:
            if pd.api.types.is_numeric_dtype(a[col]) and not pd.api.types.is_bool_dtype(a[col]):
                assert np.allclose(a[col].astype(float), b[col].astype(float), rtol=RTOL, atol=ATOL,
                                   equal_nan=True), f"{name}:{col}"
            elif (name, col) != ("summary.csv", "shown"):  # its numbers are the value column, compared above
                assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), f"{name}:{col}"


def test_committed_example_is_self_contained():
    check_html(EXAMPLE)
    total = sum(p.stat().st_size for p in EXAMPLE.rglob("*") if p.is_file())
    assert total < 2_000_000
    readme = (REPO / "reports" / "README.md").read_text()
    assert "hwrel report" in readme and "digits-mlp-eyeriss-v1" in readme


@pytest.mark.slow
def test_committed_example_matches_the_command(tmp_path):
    """Regenerate the example with the command documented in reports/README.md; compare tables."""
    readme = (REPO / "reports" / "README.md").read_text()
    cmd = re.search(r"^    (hwrel report [^\n]*)$", readme, re.M).group(1)
    argv = shlex.split(cmd)[1:]
    if "--out" in argv:
        i = argv.index("--out")
        del argv[i:i + 2]
    argv += ["--out", str(tmp_path / "fresh")]
    assert main([*argv, "--quiet"]) == 0
    _compare_tables(EXAMPLE, tmp_path / "fresh")
    check_html(tmp_path / "fresh")


def test_summary_figures_equal_the_sections(small_report):
    """Every number of the executive summary is the one its section's table holds."""
    import html as html_mod

    from hwrel.quantize.safe import smallest_meeting

    t = {p.stem: pd.read_csv(p) for p in (small_report / "tables").glob("*.csv")}
    s = t["summary"].set_index("item")
    fit = float(t["seu_fit"]["fit"].sum())
    assert s.loc["FIT", "value"] == pytest.approx(fit, rel=1e-9)
    sens = t["sensitivity"].set_index("scenario")
    assert sens.loc["as stated", "fit"] == pytest.approx(fit, rel=1e-9)
    assert s.loc["mission failure probability", "value"] == pytest.approx(sens.loc["as stated", "p_failure"], rel=1e-9)
    assert s.loc["verdict", "value"] == pytest.approx(fit / 100.0, rel=1e-9)  # asil-b: 100 FIT
    v = t["validation"]
    adv = v[(v.analysis == "SEU adversarial flips") & v.case.str.startswith("hwrel")].iloc[0]
    assert s.loc["tolerated bit flips", "value"] == adv.bound - 1  # certified k
    assert s.loc["fewest flips breaking the budget (search)", "value"] == adv.measured
    iso = t["iso26262"]
    spfm = iso[(iso.configuration == "as built") & (iso.metric == "SPFM")].iloc[0]
    assert s.loc["ISO 26262-5 (ASIL-B, estimates)", "value"] == pytest.approx(spfm.value, rel=1e-9)
    assert spfm.value == pytest.approx(1 - fit / float(t["seu_fit"]["fit_raw"].sum()), rel=1e-9)
    hard = t["hardening"]
    assert s.loc["top hardening (certified FIT removed per extra bit)", "value"] == pytest.approx(
        hard.gain_per_bit.iloc[0], rel=1e-9)
    bw = t["bitwidth"]
    ok = list(bw.clean_accuracy - bw.certified_accuracy <= 0.01 + 1e-12)
    assert s.loc["safe bit width", "value"] == smallest_meeting(list(bw.bits), ok)
    page = (small_report / "index.html").read_text(encoding="utf-8")
    exe = page[page.index('<section id="executive">'):page.index('<section id="summary">')]
    md = (small_report / "report.md").read_text(encoding="utf-8")
    for shown in s["shown"]:
        assert html_mod.escape(shown) in exe and shown.replace("|", "\\|") in md, shown
    for word in ("source", "published", "confidence", "SHA-256", "Data:", "sensitivity", "k = 0"):
        assert word in exe, word


def test_each_stated_rate_carries_its_source(small_report):
    from hwrel.seu.accelerator import load_accelerator

    acc = load_accelerator("eyeriss-v1")
    t = {p.stem: pd.read_csv(p) for p in (small_report / "tables").glob("*.csv")}
    rates = t["rates"]
    assert rates.source.notna().all() and rates.status.isin(["measured", "published", "assumed"]).all()
    for r in t["seu_fit"].itertuples():  # every rate behind the FIT, with the file's source and status
        row = rates[rates.quantity == f"raw SER of {r.memory}"].iloc[0]
        m = acc.memory(r.memory)
        assert row.value == r.ser_fit_per_mbit == m.ser_fit_per_mbit and row.source == m.ser_source
        assert row.confidence == m.confidence_of("ser_fit_per_mbit")
    page = (small_report / "index.html").read_text(encoding="utf-8")
    prov = page[page.index('<section id="provenance">'):page.index('<section id="iso26262">')]
    assert "Sensitivity:" in prov and "UG116" in prov and all(s in page for s in acc.sources[:1])


def test_report_renders_in_a_real_browser(small_report, tmp_path):
    """Headless Chromium at 1400x900: renders, every figure loads, no console error, the executive
    summary is visible without scrolling."""
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from browser import NoBrowser, inspect_page, open_browser

    try:
        driver = open_browser(1400, 900)
    except NoBrowser as exc:
        if os.environ.get("HWREL_REQUIRE_BROWSER"):
            raise
        pytest.skip(f"no headless browser on this machine: {exc}")
    try:
        info = inspect_page(driver, small_report / "index.html", tmp_path / "shot.png")
    finally:
        driver.quit()
    assert info["console"] == []
    assert info["title"].startswith("Reliability report: digits-mlp")
    imgs = {i["id"]: i for i in info["images"]}
    assert set(imgs) == {f"fig-{n}" for n in FIGURES}
    for i in imgs.values():
        assert i["complete"] and i["natural"][0] >= 400 and i["natural"][1] >= 250, i
        assert i["shown"][0] > 300 and i["src"].startswith("data:image/svg+xml"), i
    assert info["viewport"] == [1400, 900] and info["scroll"] == [0, 0]
    box = info["summary"]
    assert box is not None and 0 <= box["top"] and box["bottom"] <= 900, box  # all of it above the fold
    assert "MEETS" in info["summary_text"] and "tolerated bit flips" in info["summary_text"]
    assert info["min_summary_font"] >= 12
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tolerance_search_equals_certifying_every_input_at_every_count():
    """The tolerance search certifies each input only where no other failure count decided it
    (monotone in f) and lets the domain-wide bound settle wide margins: its curve and tolerated
    counts equal certifying every input afresh at every f."""
    from hwrel import Network
    from hwrel.bounds.api import Analyzer
    from hwrel.bounds.certify import certified_from_bounds
    from hwrel.bounds.faults import FaultModel
    from hwrel.bounds.ibp import point_rounding

    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 12), nn.Tanh(),
                      nn.Linear(12, 4)).eval()
    with torch.no_grad():
        m[5].weight.mul_(4.0)
    net = Network.from_module(m, (0.0, 1.0), (1, 5, 5))
    x = torch.rand(96, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    y = Analyzer(net).net.forward(x.double()).argmax(1)
    y[:7] = (y[:7] + 1) % 4  # some wrong predictions
    res = sections.fep_analysis(net, x, y, capacity=2.0, counts=(1,), max_accuracy_drop=0.2, random_sets=0,
                                adversarial=None, seed=0)
    an, x64 = Analyzer(net), x.double()
    logits = an.net.forward(x64)
    rho = point_rounding(an.net, x64)[-1][:, None]
    for fm in (FaultModel("crash"), FaultModel("byzantine", 2.0)):
        for k, name in enumerate(sections._layer_names(net)):
            def acc(f: int) -> float:
                vec = [0] * len(net.layers)
                vec[k] = f
                dom = an.all_methods(fm, vec, at_most=True)["best"] if f else 0.0
                e = torch.minimum(an.interval(fm, an.counts(vec, fm), x64, x64, reference="exact"), dom + rho)
                pred, cert = certified_from_bounds(logits, e)
                return float(((pred == y) & cert).double().mean())
            c = res.accuracy_curve
            curve = c[(c.fault == fm.kind) & (c.layer_name == name)]
            for r in curve.itertuples():
                assert r.certified_accuracy == pytest.approx(acc(int(r.failures)), abs=1e-12), (fm.kind, name, r)
            tol = res.tolerance[(res.tolerance.fault == fm.kind) & (res.tolerance.layer_name == name)].iloc[0]
            size = net.layer_sizes()[k]
            best = max(f for f in range(size + 1) if res.clean_accuracy - acc(f) <= 0.2 + 1e-12)
            assert int(tol.tolerated) == best


def test_quick_profile_says_so_and_shows_progress(tmp_path, capsys):
    """--quick: a smaller campaign whose reproduce command keeps --quick; stage lines with percentages."""
    out = tmp_path / "q"
    assert main(["report", "digits-mlp-sigmoid", "--quick", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    pcts = [int(m) for m in re.findall(r"^hwrel report \[\s*[0-9.]+s\s+(\d+)%\]", err, re.M)]
    assert pcts[0] == 0 and pcts[-1] == 100 and pcts == sorted(pcts) and len(set(pcts)) >= 6
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "hwrel report digits-mlp-sigmoid --quick --accelerator eyeriss-v1" in md
    bw = pd.read_csv(out / "tables" / "bitwidth.csv")
    assert list(bw.bits) == list(QUICK.bits)
    assert not QUICK.per_layer and "not computed (the --quick profile skips the per-layer search)" in md
    assert "recommended per-layer widths" not in md


def test_checksum_covers_zero_dim_buffers_and_changes_with_one_bit():
    """A model with batch norm has 0-dim buffers (num_batches_tracked); the report's checksum must
    hash them (it crashed at the end of `hwrel report mnist-resnet`) and must see a one-bit change."""
    from hwrel.report.summary import model_checksum

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    assert m[1].num_batches_tracked.dim() == 0
    a = model_checksum(m)
    assert a == model_checksum(m) and re.fullmatch(r"[0-9a-f]{64}", a)
    with torch.no_grad():
        w = m[0].weight.view(-1)
        w[0:1] = (w[0:1].view(torch.int32) ^ 1).view(torch.float32)
    assert model_checksum(m) != a
    m[1].num_batches_tracked += 1
    assert model_checksum(m) not in (a,)


@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_random_failure_sets_batched_from_the_faulty_layer_equal_full_forwards(fault):
    """The report's random failure-set measurement runs the layers before the failed one once; it
    must equal one faulty forward from the input per set, bit for bit."""
    from hwrel import Network
    from hwrel.bounds.faults import FaultModel
    from hwrel.inject.adversarial import faulty_forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 36, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    net = Network.from_module(model, (0.0, 1.0), (1, 6, 6)).to(torch.float32)
    x = torch.rand(7, 1, 6, 6)
    fm = FaultModel(fault, 2.0) if fault == "byzantine" else FaultModel(fault)
    for node in net.layers:
        got = sections._random_worst(net, x, node, 2, fm, 9, torch.Generator().manual_seed(3))
        g, want = torch.Generator().manual_seed(3), 0.0
        ref = net.forward(x)
        for _ in range(9):
            idx = torch.randperm(net.nodes[node].size, generator=g)[:2]
            vals = 2.0 * (2 * torch.randint(0, 2, (2,), generator=g).float() - 1) if fm.byzantine else None
            want = max(want, float((faulty_forward(net, x, {node: (idx, vals)}) - ref).abs().max()))
        assert got == want and want > 0, (node, got, want)
