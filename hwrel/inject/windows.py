"""Where each weight of an affine node is applied: the largest input magnitude over its positions,
and the weights that multiply only exact zeros. Exact (maxima and comparisons with 0, no
arithmetic). A light module (torch only) so that the injection engine does not import the bound
machinery of :mod:`hwrel.inject.certify` to use them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def window_max(nd, m: Tensor) -> Tensor:  # noqa: ANN001
    """Per input, the largest of ``m`` (magnitudes of affine node ``nd``'s input, ``(B, *shape)``)
    over the positions each weight is applied at: ``(B, in_features)`` for a Linear (over every
    row), ``(B, Cin, kh, kw)`` for a convolution (padding counts as 0)."""
    a = nd.affine
    B = m.shape[0]
    if a.kind == "linear":
        return m.reshape(B, -1, a.weight.shape[1]).amax(1)
    ph, pw = a.padding
    xp = F.pad(m, (pw, pw, ph, ph))
    _, kh, kw = a.weight.shape[1:]
    _, ho, wo = nd.shape
    out = torch.empty(B, m.shape[1], kh, kw, dtype=m.dtype, device=m.device)
    for ka in range(kh):
        for kb in range(kw):
            h0, w0 = ka * a.dilation[0], kb * a.dilation[1]
            sl = xp[:, :, h0: h0 + a.stride[0] * (ho - 1) + 1: a.stride[0],
                    w0: w0 + a.stride[1] * (wo - 1) + 1: a.stride[1]]
            out[:, :, ka, kb] = sl.amax((2, 3))
    return out


def zero_input_weights(nd, m: Tensor) -> Tensor:  # noqa: ANN001
    """Flat bool per weight of affine node ``nd``: ``m`` (input magnitudes, ``(B, *shape)``) is 0
    at every input and position the weight multiplies. Grouped convolutions: all False."""
    a = nd.affine
    if a.kind == "conv2d" and a.groups != 1:
        return torch.zeros(a.weight.numel(), dtype=torch.bool, device=a.weight.device)
    dead_in = (window_max(nd, m) == 0).all(0)  # (in,) or (Cin, kh, kw)
    return dead_in[None].expand(a.weight.shape[0], *dead_in.shape).reshape(-1)
