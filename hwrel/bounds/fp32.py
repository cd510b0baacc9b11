"""Float32 rounding: how far one float32 evaluation of a node can land from its exact value.

The certificates are about the model as it runs: in float32. hwrel's bounds are computed in
float64 on the exact values, so every sound bound also carries, at each node, the rounding the
float32 forward may add there. Two uses:

- :func:`hwrel.bounds.ibp.interval_bounds` widens every node's interval by its rounding, so the
  nominal ranges contain the float32 values as well as the exact ones (slopes and images taken
  over them cover both);
- the error propagations (:mod:`hwrel.bounds.interval`, :mod:`hwrel.bounds.perturb`,
  :mod:`hwrel.bounds.paper`, ...) add ``2 * local`` at every node that a fault can reach (the
  faulty and the clean forward each round once; where no fault reaches, both compute the same
  float32 operations on the same values and agree to the last bit).

Assumptions (standard forward error analysis, Higham, *Accuracy and Stability of Numerical
Algorithms*, 2002, sections 2-3), with the unit roundoff ``u = 2^-24``:

- a dot product of ``n`` terms plus a bias, in any summation order, with or without fused
  multiply-adds (BLAS, im2col or direct convolution; not Winograd or FFT convolution), is within
  ``gamma_(n+1) (sum |w_i x_i| + |b|)`` of its exact value, ``gamma_n = n u / (1 - n u)``;
- tanh and sigmoid are within 8 ulps of their output (PyTorch's vectorized kernels are within a
  few); clamps, ReLU and max are exact; one add or multiply rounds once;
- the gated activations ``x g(x)`` (GELU, GELU-tanh, SiLU, Mish, Hardswish) are within
  ``16 u (|x| + |phi(x)|)``: the gate ``g`` (at most ~1.1) is within a few ulps of 1 absolutely,
  times ``|x|``, plus the final product's rounding;
- an inference batch norm evaluated after its convolution (hwrel folds it) adds a few roundings of
  its intermediate values (``Affine.fold_magnitude``).

Every rounding term is doubled (``SAFETY``) and carries an absolute ``TINY`` per operation for
underflow, so the bound holds with room to spare; it is about 1e-7 of the values involved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

U = 2.0 ** -24
SAFETY = 2.0
TINY = 2.0 ** -126
ACT_ULPS = {"sigmoid": 8.0, "tanh": 8.0, "leaky_relu": 1.0, "hardsigmoid": 2.0}
# gated activations x g(x): their rounding scales with |x| + |phi(x)| (input plus output magnitude)
GATED_ULPS = {"gelu": 16.0, "gelu_tanh": 16.0, "silu": 16.0, "mish": 16.0, "hardswish": 16.0}


def gamma(n: int) -> float:
    """``SAFETY * gamma_n``: the rounding factor of an ``n``-term float32 sum."""
    return SAFETY * n * U / (1.0 - n * U)


def local_rounding(node, mags: list[Tensor], out_mag: Tensor | None = None,
                   weight_radius: Tensor | None = None) -> Tensor | float:
    """Elementwise bound ``(B, *node.shape)`` on the rounding one float32 evaluation of ``node``
    adds to its exact output, given bounds ``mags`` on the absolute values of its inputs (and
    ``out_mag`` on its output, for activations and additions). ``weight_radius``: the weights may
    be perturbed by up to this much (their magnitude grows). Returns 0.0 for exact operations.
    """
    op = node.op
    if op == "affine":
        a = node.affine
        w = a.abs_weight if weight_radius is None else a.abs_weight + weight_radius
        s = _abs_map(a, w, mags[0])
        if a.bias is not None:
            s = s + _per_channel(a, a.bias.abs(), s)
        g = gamma(a.fan_in + 1 + (8 if a.fold_magnitude is not None else 0))
        r = g * s + (a.fan_in + 1) * TINY
        if a.fold_magnitude is not None:
            r = r + gamma(8) * _per_channel(a, a.fold_magnitude, s)
        return r
    if op == "act" and node.act.kind in GATED_ULPS:
        m = out_mag if out_mag is not None else mags[0]
        return SAFETY * GATED_ULPS[node.act.kind] * U * (mags[0] + m) + TINY
    if op == "act":
        ulps = ACT_ULPS.get(node.act.kind, 0.0)
        if ulps == 0.0:
            return 0.0
        m = out_mag if out_mag is not None else torch.full_like(mags[0], node.act.max_abs)
        if node.act.kind == "hardsigmoid":  # x / 6 + 1/2 rounds at the scale of 1
            m = torch.ones_like(mags[0])
        return SAFETY * ulps * U * m + TINY
    if op == "pool" and node.pool.kind == "avg":
        p = node.pool
        return gamma(p.kernel[0] * p.kernel[1] + 1) * p(mags[0]) + TINY
    if op == "add":
        total = mags[0]
        for m in mags[1:]:
            total = total + m
        return SAFETY * (len(mags) - 1) * U * total + TINY
    return 0.0  # input, max pool, reshape, quantized activations (the same grid computation)


def scalar_rounding(node, mags: list[float], out_mag: float, weight_radius: float = 0.0) -> float:
    """:func:`local_rounding` for the scalar recursions: a bound on any one neuron's rounding,
    given bounds on any one input's and output's absolute value."""
    op = node.op
    if op == "affine":
        a = node.affine
        row = float(a.abs_weight.flatten(1).sum(1).max()) + weight_radius * a.fan_in
        b = float(a.bias.abs().max()) if a.bias is not None and a.bias.numel() else 0.0
        g = gamma(a.fan_in + 1 + (8 if a.fold_magnitude is not None else 0))
        r = g * (row * mags[0] + b) + (a.fan_in + 1) * TINY
        if a.fold_magnitude is not None:
            r += gamma(8) * float(a.fold_magnitude.max())
        return r
    if op == "act" and node.act.kind in GATED_ULPS:
        return SAFETY * GATED_ULPS[node.act.kind] * U * (mags[0] + out_mag) + TINY
    if op == "act":
        ulps = ACT_ULPS.get(node.act.kind, 0.0)
        if ulps == 0.0:
            return 0.0
        m = 1.0 if node.act.kind == "hardsigmoid" else out_mag
        return SAFETY * ulps * U * m + TINY
    if op == "pool" and node.pool.kind == "avg":
        p = node.pool
        return gamma(p.kernel[0] * p.kernel[1] + 1) * p.gain * mags[0] + TINY
    if op == "add":
        return SAFETY * (len(mags) - 1) * U * sum(mags) + TINY
    return 0.0


def _abs_map(a, w: Tensor, x: Tensor) -> Tensor:
    if a.kind == "linear":
        return F.linear(x, w)
    return F.conv2d(x, w, None, a.stride, a.padding, a.dilation, a.groups)


def _per_channel(a, v: Tensor, like: Tensor) -> Tensor:
    """A per-output-channel vector broadcast to an affine node's output ``like``."""
    if a.kind == "linear":
        return v.expand_as(like)
    return v.reshape(1, -1, *([1] * (like.dim() - 2))).expand_as(like)
