"""Campaigns: deterministic sampling, sharding, resuming, storage safety, summaries, and the
adversarial search (measured worst cases) on small networks."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hwrel import Network, models
from hwrel.errors import HwrelError
from hwrel.inject.adversarial import faulty_forward, worst_neuron_failures, worst_weight_flips
from hwrel.inject.campaign import merge_shards, parse_shard, run_campaign, summarize
from hwrel.inject.engine import Injector
from hwrel.inject.faults import Fault
from hwrel.inject.sampling import CampaignSpec, SiteSpace, ber_positions, chunk_generator, sample_chunk
from hwrel.inject.stats import wilson_interval
from hwrel.inject.store import part_name


@pytest.fixture(scope="module")
def digits() -> tuple[Network, torch.Tensor, torch.Tensor]:
    ref = models.load("digits-mlp")
    net = Network.from_module(ref.module, input_shape=ref.input_shape)
    return net, ref.x_test[:48], ref.y_test[:48]


def _run(digits, **kw):  # noqa: ANN001, ANN202
    net, x, y = digits
    kw.setdefault("progress", False)
    spec = kw.pop("spec", dict(count=90, chunk_size=16))
    return run_campaign(net, spec, x, y, **kw)


# ------------------------------------------------------------------------------ sampling

def test_sites_count_every_stored_bit(digits) -> None:  # noqa: ANN001
    net = digits[0]
    space = SiteSpace(net, CampaignSpec(count=1, format="fp16"))
    params = sum(net.nodes[i].affine.weight.numel() + net.nodes[i].affine.bias.numel()
                 for i in net.synapse_layers)
    assert space.total == 16 * params
    neurons = SiteSpace(net, CampaignSpec(fault="crash", count=1))
    assert neurons.total == sum(net.layer_sizes())
    one_bit = SiteSpace(net, CampaignSpec(exhaustive=True, layer="2", bit=5))
    assert one_bit.total == net.nodes[3].affine.weight.numel() + net.nodes[3].affine.bias.numel()


def test_configuration_is_function_of_seed_and_index(digits) -> None:  # noqa: ANN001
    net = digits[0]
    small = SiteSpace(net, CampaignSpec(count=40, chunk_size=16))
    big = SiteSpace(net, CampaignSpec(count=1000, chunk_size=16))
    for c in range(3):
        a, b = sample_chunk(small, 7, c), sample_chunk(big, 7, c)
        n = len(a.config_ids)
        assert np.array_equal(a.index, b.index[:n]) and np.array_equal(a.bit, b.bit[:n])
        again = sample_chunk(small, 7, c)
        assert np.array_equal(a.index, again.index) and np.array_equal(a.group, again.group)
    other = sample_chunk(small, 8, 0)
    assert not np.array_equal(other.index, sample_chunk(small, 7, 0).index)


def test_exhaustive_enumerates_each_site_once(digits) -> None:  # noqa: ANN001
    net = digits[0]
    space = SiteSpace(net, CampaignSpec(exhaustive=True, layer="4", chunk_size=500))
    seen = set()
    for c in range(space.num_chunks()):
        f = sample_chunk(space, 0, c)
        seen |= set(zip(f.group.tolist(), f.index.tolist(), f.bit.tolist()))
    assert len(seen) == space.total == (1280 + 10) * 32


def test_ber_positions_law() -> None:
    rng = chunk_generator(3, 0)
    total, p = 2_000_000, 1e-4
    counts = [len(ber_positions(rng, total, p)) for _ in range(200)]
    mean = np.mean(counts)
    assert abs(mean - total * p) < 4 * np.sqrt(total * p / 200)  # within 4 standard errors
    pos = ber_positions(rng, total, 0.01)
    assert len(np.unique(pos)) == len(pos) and pos.min() >= 0 and pos.max() < total
    assert len(ber_positions(rng, total, 0.0)) == 0 and len(ber_positions(rng, 100, 1.0)) == 100


@pytest.mark.parametrize("kw", [dict(count=0), dict(ber=1.5), dict(count=3, exhaustive=True),
                                dict(format="int99", count=1), dict(fault="zap", count=1),
                                dict(fault="byzantine", count=3), dict(fault="stuck0", ber=0.1),
                                dict(fault="crash", bit=3, count=2), dict(count=2, chunk_size=0)])
def test_bad_spec_raises(kw) -> None:  # noqa: ANN001
    with pytest.raises(HwrelError):
        CampaignSpec(**kw)


def test_bit_beyond_width_and_unknown_layer(digits) -> None:  # noqa: ANN001
    with pytest.raises(HwrelError, match="bit 16 out of range"):
        SiteSpace(digits[0], CampaignSpec(count=1, format="fp16", bit=16))
    with pytest.raises(HwrelError, match="not found"):
        SiteSpace(digits[0], CampaignSpec(count=1, layer="nope"))


@pytest.mark.parametrize("bad", ["2/2", "0/0", "-1/2", "1/x", "3", (1, 1), (0, -1), "1/2/3"])
def test_bad_shards(bad) -> None:  # noqa: ANN001
    with pytest.raises(HwrelError):
        parse_shard(bad)


# ------------------------------------------------------------------------------ campaigns

def test_rows_match_direct_injection(digits) -> None:  # noqa: ANN001
    df = _run(digits, spec=dict(count=20, chunk_size=8))
    net, x, y = digits
    inj = Injector(net, x, y)
    assert df["config_id"].tolist() == list(range(20))
    for row in df.itertuples():
        f = Fault(row.site, row.layer, int(row.index), row.kind, bit=int(row.bit))
        out = inj.outputs(f)
        # Batched vs single evaluation may round the changed sums differently (engine: 1e-5 rel).
        scale = float(inj.clean[-1].abs().max())
        assert float((out - inj.clean[-1]).abs().max()) == pytest.approx(row.max_abs_delta, abs=1e-5 * scale)


def test_same_seed_same_rows_and_shards_merge(digits, tmp_path: Path) -> None:  # noqa: ANN001
    whole = _run(digits, out=tmp_path / "whole")
    pd.testing.assert_frame_equal(whole, _run(digits))  # in memory == on disk
    assert not whole.equals(_run(digits, seed=1))
    for n in (2, 3, 7):
        paths = [tmp_path / f"s{n}-{i}" for i in range(n)]
        parts = [_run(digits, out=p, shard=f"{i}/{n}") for i, p in enumerate(paths)]
        assert sum(len(p) for p in parts) == len(whole)
        pd.testing.assert_frame_equal(merge_shards(paths), whole)
        if n == 3:
            with pytest.raises(HwrelError, match="incomplete"):
                merge_shards(paths[:-1])
            pd.testing.assert_frame_equal(merge_shards(paths + paths[:1]), whole)  # repeats are fine
    # Shards may also share one folder.
    for i in range(3):
        _run(digits, out=tmp_path / "shared", shard=(i, 3))
    pd.testing.assert_frame_equal(merge_shards([tmp_path / "shared"]), whole)


def test_resume_after_losing_chunks(digits, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "r"
    whole = _run(digits, out=out)
    for c in (0, 3, 5):
        os.unlink(out / part_name(c))
    (out / ".part-00003.parquet.abc.tmp").write_bytes(b"half a chunk")  # left by a killed writer
    pd.testing.assert_frame_equal(_run(digits, out=out), whole)


def test_single_file_output(digits, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "res.parquet"
    whole = _run(digits, out=path)
    assert path.is_file() and not (tmp_path / "res.parquet.parts").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(path), whole)
    pd.testing.assert_frame_equal(_run(digits, out=path), whole)  # rerun reads it back
    pd.testing.assert_frame_equal(merge_shards([path]), whole)
    with pytest.raises(HwrelError, match="another campaign"):
        _run(digits, out=path, seed=5)


def test_other_campaign_folder_refused_untouched(digits, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "c"
    _run(digits, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for kw in (dict(seed=1), dict(spec=dict(count=90, chunk_size=16, format="bf16"))):
        with pytest.raises(HwrelError, match="another campaign"):
            _run(digits, out=out, **kw)
    net, x, y = digits
    with pytest.raises(HwrelError, match="another campaign"):
        run_campaign(net, dict(count=90, chunk_size=16), x[:10], y[:10], out=out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(HwrelError, match="not empty"):
        _run(digits, out=tmp_path / "junk")
    assert [p.name for p in (tmp_path / "junk").iterdir()] == ["notes.txt"]


def test_ber_and_neuron_campaigns(digits) -> None:  # noqa: ANN001
    none = _run(digits, spec=dict(ber=0.0, count=5, chunk_size=4))
    assert (none["n_faults"] == 0).all() and (none["max_abs_delta"] == 0).all()
    ber = _run(digits, spec=dict(ber=2e-5, count=12, chunk_size=4))
    assert ber["n_faults"].sum() > 0
    byz = _run(digits, spec=dict(fault="byzantine", capacity=2.0, count=30, chunk_size=8))
    assert set(byz["layer"]) <= {"1", "3"} and (byz["new_value"].abs() <= 2.0).all()
    crash = _run(digits, spec=dict(fault="crash", exhaustive=True, layer="3", chunk_size=50))
    assert len(crash) == 128 and sorted(crash["index"]) == list(range(128))


def test_summary_rates_and_intervals(digits) -> None:  # noqa: ANN001
    df = _run(digits)
    s = summarize(df)
    total = s[s["layer"] == "all"].iloc[0]
    k = int((df["mismatch_rate"] > 0).sum())
    assert total["configs"] == len(df) and total["sdc"] == k
    lo, hi = wilson_interval(k, len(df))
    assert (total["sdc_lo"], total["sdc_hi"]) == (lo, hi)
    assert total["max_max_abs_delta"] == df["max_abs_delta"].max()
    assert s[s["layer"] != "all"]["configs"].sum() == len(df)


# ------------------------------------------------------------------------------ adversarial

def _small_net(seed: int) -> Network:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    return Network.from_module(m, input_shape=(6,))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_adversarial_beats_random_failure_sets(seed: int, fault: str) -> None:
    net = _small_net(seed)
    cap = 1.0 if fault == "byzantine" else None
    res = worst_neuron_failures(net, [2, 1], fault=fault, capacity=cap, steps=30, restarts=4, seed=0)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(256, 6, generator=g)
    ref = net.forward(x)
    best = 0.0
    for _ in range(200):
        s1, s2 = torch.randperm(12, generator=g)[:2], torch.randperm(10, generator=g)[:1]
        v1 = None if cap is None else 2 * torch.rand(2, generator=g) - 1
        v2 = None if cap is None else 2 * torch.rand(1, generator=g) - 1
        out = faulty_forward(net, x, {net.layers[0]: (s1, v1), net.layers[1]: (s2, v2)})
        best = max(best, float((out - ref).abs().amax()))
    assert res.max_abs_delta >= best
    assert [len(s) for s in res.failure_sets] == [2, 1]
    assert bool((res.x >= 0).all() and (res.x <= 1).all())
    # The reported configuration reproduces the reported error exactly (with the engine too).
    fails = [Fault("neuron", net.nodes[n].name, j, fault, value=None if cap is None else v)
             for n, s, vs in zip(net.layers, res.failure_sets, res.values or [(), ()])
             for j, v in itertools.zip_longest(s, vs)]
    out = Injector(net, res.x).outputs(fails)
    assert float((out - net.forward(res.x)).abs().max()) == pytest.approx(res.max_abs_delta, rel=1e-5)


def test_adversarial_search_progress_changes_nothing() -> None:
    """The report's progress hook: called after every candidate set and ascent, fractions
    non-decreasing in (0, 1], and the search finds the same sets, input and error without it."""
    net = _small_net(1)
    seen: list[tuple[float, str]] = []
    res = worst_neuron_failures(net, [2, 1], steps=5, restarts=3, seed=0, progress=lambda f, m: seen.append((f, m)))
    plain = worst_neuron_failures(net, [2, 1], steps=5, restarts=3, seed=0)
    assert res.max_abs_delta == plain.max_abs_delta and res.failure_sets == plain.failure_sets
    assert torch.equal(res.x, plain.x)
    fr = [f for f, _ in seen]
    assert len(seen) >= 2 * (1 + 3) and fr == sorted(fr) and 0 < fr[0] and fr[-1] <= 1.0
    assert all(m.startswith("adversarial search: round ") for _, m in seen)


def test_adversarial_crash_matches_exhaustive_sets() -> None:
    net = _small_net(1)
    res = worst_neuron_failures(net, [2, 1], steps=30, restarts=4, seed=0)
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)))
    x = torch.cat([corners, torch.rand(512, 6, generator=torch.Generator().manual_seed(0))])
    ref = net.forward(x)
    best = max(float((faulty_forward(net, x, {net.layers[0]: (torch.tensor(a), None),
                                               net.layers[1]: (torch.tensor([b]), None)}) - ref).abs().amax())
               for a in itertools.combinations(range(12), 2) for b in range(10))
    assert res.max_abs_delta >= best * (1 - 1e-6)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()
        self.c2, self.a2 = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a1(self.c1(x))
        return self.fc(torch.flatten(self.a2(self.c2(h)) + h, 1))


@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_candidate_errors_start_at_the_failed_layer_and_equal_whole_forwards(fault: str) -> None:
    """The search runs the layers before the failed one once per pool, not once per candidate:
    every candidate's error equals a whole faulty forward from the input (float32 tolerance)."""
    from hwrel.inject.adversarial import _NeuronSearch

    torch.manual_seed(0)
    net = Network.from_module(_Residual().eval(), (-1.0, 1.0), (1, 5, 5))
    search = _NeuronSearch(net, fault, 0.7 if fault == "byzantine" else None)
    pool = torch.rand(7, 1, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = search.net.forward(pool)
    node0, node1 = net.layers
    sets = {node0: [4, 30], node1: [2]}
    values = {node0: torch.tensor([0.7, -0.7]), node1: torch.tensor([0.7])}
    cand = torch.tensor([0, 5, 11, 40, 74])
    for node in (node0, node1):
        got = search._try(pool, ref, sets, values, node, cand, -0.7)
        for c, e in zip(cand.tolist(), got):
            s2 = {**sets, node: sets[node] + [c]}
            v2 = {**values, node: torch.cat([values[node], torch.tensor([-0.7])])}
            want = float(search.errors(pool, s2, v2).max())
            assert float(e) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_screening_keeps_the_first_order_best_candidates_and_measures_exactly() -> None:
    torch.manual_seed(0)
    net = Network.from_module(_Residual().eval(), (-1.0, 1.0), (1, 5, 5))
    from hwrel.inject.adversarial import _NeuronSearch

    search = _NeuronSearch(net, "crash", None, screen=6)
    pool = torch.rand(5, 1, 5, 5, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cand = torch.arange(75)
    kept = search._screen(pool, {net.layers[0]: []}, {net.layers[0]: torch.zeros(0)}, net.layers[0], cand, 0.0)
    assert len(kept) == 6 and set(kept.tolist()) <= set(cand.tolist())
    assert len(search._screen(pool, {}, {}, net.layers[0], cand[:6], 0.0)) == 6  # few: all kept
    res = worst_neuron_failures(net, [2, 1], steps=3, restarts=1, pool_size=4, seed=0, screen=6)
    fails = {n: (torch.tensor(s), None) for n, s in zip(net.layers, res.failure_sets)}
    assert res.max_abs_delta == pytest.approx(
        float((faulty_forward(net.to(torch.float32), res.x, fails) - net.to(torch.float32).forward(res.x)).abs().max()),
        rel=1e-6)
    full = worst_neuron_failures(net, [2, 1], steps=3, restarts=1, pool_size=4, seed=0, screen=0)
    assert full.max_abs_delta > 0 and res.max_abs_delta > 0
    # no random restarts: the ascent starts from the pool's worst input (it used to crash on empty starts)
    none = worst_neuron_failures(net, [1, 0], steps=2, restarts=0, pool_size=2, seed=0)
    assert none.max_abs_delta > 0 and none.x.shape == (1, 1, 5, 5)


def test_worst_weight_flips_measured() -> None:
    net = _small_net(0)
    res = worst_weight_flips(net, k=1, format="bf16", seed=0)
    assert len(res.flips) == 1 and res.max_abs_delta > 0
    layer, site, index, bit = res.flips[0]
    inj = Injector(net, res.x, format="bf16")
    out = inj.outputs(Fault(site, layer, index, "bitflip", bit=bit))
    measured = float((out - inj.clean[-1]).abs().max())
    assert measured == pytest.approx(res.max_abs_delta, rel=1e-5) or measured == res.max_abs_delta
    # Better than any single random flip of the same format on the same pool input.
    rand = Injector(net, res.x, format="bf16").run(Injector(net, res.x, format="bf16").random_faults(200, seed=1))
    assert res.max_abs_delta >= np.nanmax(rand["max_abs_delta"])


def test_adversarial_bad_input() -> None:
    net = _small_net(0)
    with pytest.raises(HwrelError):
        worst_neuron_failures(net, [13, 0])
    with pytest.raises(HwrelError):
        worst_neuron_failures(net, [1])
    with pytest.raises(HwrelError):
        worst_neuron_failures(net, [1, 1], fault="byzantine")
