"""The GPU path: device resolution everywhere; bounds, injection and campaigns on CUDA equal the
CPU within the stated tolerances (``hwrel.device.BOUNDS_RTOL``, ``INJECT_RTOL``). Tests that
need a GPU are marked ``cuda`` and skipped without one."""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

from hwrel import models
from hwrel.bounds.api import fep
from hwrel.device import BOUNDS_RTOL, INJECT_RTOL, exact_float32, parse_device, resolve_device
from hwrel.errors import HwrelError
from hwrel.inject.campaign import run_campaign
from hwrel.inject.engine import Injector
from hwrel.inject.executors import LocalExecutor, add_executor_args, run_with_executor
from hwrel.network import Network

GPU = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(GPU, reason="checks the error without a GPU")


@pytest.fixture(scope="module", params=["digits-mlp", "mnist-resnet"])
def model(request):
    ref = models.load(request.param)
    net = Network.from_module(ref.module, input_domain=(0.0, 1.0), input_shape=ref.input_shape)
    return net, ref.x_test[:32], ref.y_test[:32]


# ------------------------------------------------------------------------------ without a GPU

@pytest.mark.parametrize("name, want", [(None, "cpu"), ("cpu", "cpu"), (" CPU ", "cpu"),
                                        (torch.device("cpu"), "cpu")])
def test_resolve_cpu(name, want):
    assert resolve_device(name) == torch.device(want)


@pytest.mark.parametrize("name, msg", [("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device"),
                                       ("mps", "device 'mps' is not supported"),
                                       ("cpu:1", "the CPU takes no index"), ("", "device must be"),
                                       (3, "device must be")])
def test_bad_device_names(name, msg):
    with pytest.raises(HwrelError, match=msg):
        resolve_device(name)
    with pytest.raises(HwrelError, match=msg):
        parse_device(name)


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_gpu(name):
    with pytest.raises(HwrelError, match="CUDA requested but no GPU is available") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)
    assert parse_device(name).type == "cuda"  # syntax alone is fine (a Ray cluster may have GPUs)


@no_gpu
def test_cli_device_cuda_without_gpu(model, tmp_path):
    net, x, y = model
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--shard")
    add_executor_args(p)
    args = p.parse_args(["--device", "cuda", "--out", str(tmp_path / "r")])
    with pytest.raises(HwrelError, match="CUDA requested but no GPU is available"):
        run_with_executor(args, net, dict(count=8), x, y, progress=False)
    assert not (tmp_path / "r").exists()


def test_exact_float32_restores_flags():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with exact_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# ------------------------------------------------------------------------------ with a GPU

@cuda
@needs_gpu
def test_resolve_cuda_index():
    assert resolve_device("cuda").type == "cuda"
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)
    with pytest.raises(HwrelError, match=f"only {n} GPU"):
        resolve_device(f"cuda:{n}")


@cuda
@needs_gpu
def test_bounds_on_gpu_equal_cpu(model):
    net, _, _ = model
    nl = len(net.layers)
    for fault, failures, cap in (("crash", [1] * nl, None), ("byzantine", [0] * (nl - 1) + [2], 1.0)):
        cpu = fep(net, failures, fault, capacity=cap, method="best", at_most=True)
        gpu = fep(net, failures, fault, capacity=cap, method="best", at_most=True, device="cuda")
        assert set(gpu.by_method) == set(cpu.by_method)
        assert gpu.bound == pytest.approx(cpu.bound, rel=BOUNDS_RTOL)
        for k, v in cpu.by_method.items():
            assert gpu.by_method[k] == pytest.approx(v, rel=BOUNDS_RTOL), k


@cuda
@needs_gpu
def test_injection_on_gpu_equals_cpu(model):
    net, x, y = model
    faults = Injector(net, x, y).random_faults(64, seed=3)
    with exact_float32():
        cpu = Injector(net, x, y).run(faults)
        gpu = Injector(net, x, y, device="cuda").run(faults)
        f = faults[0]
        o_cpu = Injector(net, x, y).outputs(f)
        o_gpu = Injector(net, x, y, device="cuda").outputs(f)
    assert o_gpu.device.type == "cuda"
    torch.testing.assert_close(o_gpu.cpu(), o_cpu, rtol=INJECT_RTOL, atol=1e-5)
    np.testing.assert_array_equal(gpu["old_value"], cpu["old_value"])  # stored words: bit for bit
    np.testing.assert_array_equal(gpu["new_value"], cpu["new_value"])
    np.testing.assert_array_equal(gpu["nonfinite"], cpu["nonfinite"])
    fin = np.isfinite(cpu["max_abs_delta"])
    np.testing.assert_allclose(gpu["max_abs_delta"][fin], cpu["max_abs_delta"][fin],
                               rtol=INJECT_RTOL, atol=1e-5)
    np.testing.assert_array_equal(gpu["mismatch_rate"], cpu["mismatch_rate"])


@cuda
@needs_gpu
@pytest.mark.parametrize("workers", [1, 2])
def test_campaign_on_gpu_equals_cpu(model, workers, tmp_path):
    net, x, y = model
    spec = dict(count=96, chunk_size=32)
    cpu = run_campaign(net, spec, x, y, seed=2, progress=False)
    gpu = LocalExecutor(workers).run(net, spec, x, y, out=tmp_path / "g", seed=2, device="cuda",
                                     progress=False)
    exact = [c for c in cpu.columns if c not in ("max_abs_delta",)]
    pd.testing.assert_frame_equal(gpu[exact], cpu[exact])
    np.testing.assert_allclose(gpu["max_abs_delta"], cpu["max_abs_delta"], rtol=INJECT_RTOL, atol=1e-5)


# ------------------------------------------------------------------- the bit-width predictor

def _predictor_run(net, x, y, device):
    """Every per-input computation of the bit-width sweep on ``device``."""
    from hwrel.quantize import BITS, QuantSpec
    from hwrel.quantize.safe import _Sweep

    sw = _Sweep(None, net, x, y, None, QuantSpec(), device)
    p = sw.p
    caps = {b: min(p.domain_bounds(b).values()) for b in BITS}
    flags = p.certified_flags(BITS, caps)
    out, mb = p.sample_certificates([10], [caps[10]])[0]
    est = sw.estimated(11)
    adv = sw.adversarial(10, flags[10], torch.zeros(len(x), dtype=torch.bool, device=p.device), steps=3)
    return p, caps, flags, out, mb, est, adv


def test_bitwidth_predictor_creates_nothing_on_the_default_device(model):
    """The device audit that runs without a GPU: with torch's default device set to ``meta``, a
    tensor created without an explicit device (which on a GPU would land on the CPU and fail or
    silently move data) is a meta tensor, and any arithmetic mixing it with the predictor's CPU
    tensors raises. The whole prediction (certified flags with refinement, certificates, estimate,
    adversarial search) must run, and give the numbers it gives without the audit."""
    net, x, y = model
    want = _predictor_run(net, x, y, "cpu")
    torch.set_default_device("meta")
    try:
        got = _predictor_run(net, x, y, "cpu")
    finally:
        torch.set_default_device("cpu")
    for b in want[2]:
        assert torch.equal(got[2][b], want[2][b]) and got[2][b].device.type == "cpu"
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])
    assert got[5] == want[5]
    assert {k: v for k, v in got[6].items() if k[0] != "_"} == {k: v for k, v in want[6].items() if k[0] != "_"}
    assert any(bool(f.any()) and not bool(f.all()) for f in want[2].values())  # some width is undecided


@no_gpu
def test_bitwidth_cli_device_cuda_without_gpu(capsys):
    from hwrel.cli import main

    assert main(["bitwidth", "digits-mlp", "--device", "cuda", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "CUDA requested but no GPU is available" in err


@cuda
@needs_gpu
def test_bitwidth_predictor_on_gpu_equals_cpu(model):
    """Bounds in float64 on the GPU agree with the CPU to ``BOUNDS_RTOL``; certified flags, the
    estimate and the search's verdicts agree exactly (no margin of these inputs sits within that
    rounding of its bound)."""
    net, x, y = model
    cpu = _predictor_run(net, x, y, "cpu")
    gpu = _predictor_run(net, x, y, "cuda")
    assert gpu[0].device.type == "cuda" and gpu[3].device.type == "cuda"
    assert gpu[1] == pytest.approx(cpu[1], rel=BOUNDS_RTOL)
    for b in cpu[2]:
        assert torch.equal(gpu[2][b].cpu(), cpu[2][b]), b
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], rtol=BOUNDS_RTOL, atol=0)
    torch.testing.assert_close(gpu[4].cpu(), cpu[4], rtol=BOUNDS_RTOL, atol=0)
    assert gpu[5]["estimated_accuracy"] == cpu[5]["estimated_accuracy"]
    assert gpu[5]["estimated_error"] == pytest.approx(cpu[5]["estimated_error"], rel=BOUNDS_RTOL)
    assert gpu[6]["certified_but_broken"] == 0 == cpu[6]["certified_but_broken"]


@cuda
@needs_gpu
def test_bitwidth_sweep_on_gpu_matches_cpu():
    from hwrel.quantize import safe_bitwidth

    ref = models.load("digits-mlp")
    data = (ref.x_test[:128], ref.y_test[:128], ref.x_train[:128])
    cpu = safe_bitwidth(ref.module, data, 0.01, bits=range(6, 17), adversarial=False)
    gpu = safe_bitwidth(ref.module, data, 0.01, bits=range(6, 17), adversarial=False, device="cuda")
    assert (gpu.certified_bits, gpu.estimated_bits, gpu.measured_bits) == (
        cpu.certified_bits, cpu.estimated_bits, cpu.measured_bits)
    assert list(gpu.table["certified_accuracy"]) == list(cpu.table["certified_accuracy"])
    assert (gpu.table["bound_violations"] == 0).all()
