"""The array path for single bit faults (``Injector.run_words``, ``campaign.word_rows``) gives
the same results, row for row and column for column, as the general path over Fault objects."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import hwrel.inject.campaign as C
from hwrel import models
from hwrel.inject.engine import Injector, campaign_chunk
from hwrel.network import Network


@pytest.fixture(scope="module", params=["digits-mlp", "mnist-lenet"])
def net_data(request):  # noqa: ANN001, ANN201
    ref = models.load(request.param)
    net = Network.from_module(ref.module, input_shape=ref.input_shape)
    return net, ref.x_test[:24], ref.y_test[:24]


@pytest.mark.parametrize("kind", ["bitflip", "stuck0", "stuck1"])
def test_run_words_equals_run(net_data, kind: str) -> None:  # noqa: ANN001
    net, x, y = net_data
    inj = Injector(net, x, y)
    faults = [f.__class__(f.site, f.layer, f.index, kind, bit=f.bit) for f in inj.random_faults(600, seed=4)]
    a = inj.run(faults)
    b = inj.run_words([f.layer for f in faults], "weight", np.array([f.index for f in faults]),
                      np.array([f.bit for f in faults]), kind)
    assert set(b) == set(a) | {"certified"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["max_abs_delta"].max() > 0  # the sample holds faults that change outputs


@pytest.mark.parametrize("spec", [dict(fault="bitflip", count=300, chunk_size=128),
                                  dict(fault="stuck1", count=200, chunk_size=64, sites=("bias",)),
                                  dict(fault="bitflip", exhaustive=True, bit=23, sites=("bias",), chunk_size=64)])
def test_word_rows_equal_chunk_rows(net_data, spec, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    net, x, y = net_data
    fast = C.run_campaign(net, spec, x, y, seed=3, progress=False)
    monkeypatch.setattr(C, "single_words", lambda s: False)
    slow = C.run_campaign(net, spec, x, y, seed=3, progress=False)
    assert not slow["certified"].any()
    pd.testing.assert_frame_equal(fast.drop(columns="certified"), slow.drop(columns="certified"))


def test_campaign_chunk_is_a_power_of_two_within_bounds(net_data) -> None:  # noqa: ANN001
    net, x, _ = net_data
    for configs in (1, 100, 200_000, 10**9):
        c = campaign_chunk(net, len(x), configs)
        assert 64 <= c <= 65536 and c & (c - 1) == 0
        assert configs < 64 * 8 or -(-configs // c) >= 8 or c == 65536
