"""Certified accuracy under failures: which test inputs provably keep their predicted class.

For each input ``x`` the per-sample interval bound (the box shrunk to the point) gives ``e_o(x)``
with ``|F~_o(x) - F_o(x)| <= e_o(x)`` for every output ``o`` and every failure set of the given
sizes; the domain-wide bounds also hold. The class ``c`` predicted on ``x`` is certified if
``F_c(x) - e_c(x) > max_{o != c} F_o(x) + e_o(x)`` (with a uniform bound ``e`` this is the
familiar "margin larger than twice the bound"). Certified accuracy counts inputs that are correctly
classified *and* certified: a sound lower bound on the accuracy of the faulty network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from hwrel.bounds.api import Analyzer, _check_method
from hwrel.bounds.faults import FaultModel, as_fault
from hwrel.bounds.ibp import point_rounding
from hwrel.errors import HwrelError
from hwrel.network import Network


@dataclass(frozen=True)
class CertifiedResult:
    """Certified accuracy (a sound lower bound) and the clean accuracy it is compared with."""

    certified_accuracy: float
    clean_accuracy: float
    certified_fraction: float  # inputs whose prediction is certified, correct or not
    per_sample: pd.DataFrame  # margin, bound at the predicted class, certified flag

    def to_dict(self) -> dict:
        return {"certified_accuracy": self.certified_accuracy, "clean_accuracy": self.clean_accuracy,
                "certified_fraction": self.certified_fraction, "kind": "certified"}


def check_data(net: Network, inputs: Tensor, labels: Tensor | None) -> None:
    if not isinstance(inputs, Tensor) or inputs.numel() == 0 or inputs.shape[0] == 0:
        raise HwrelError("the data set is empty")
    if tuple(inputs.shape[1:]) != tuple(net.input_shape):
        raise HwrelError(f"inputs have per-sample shape {tuple(inputs.shape[1:])}, the network expects "
                         f"{tuple(net.input_shape)}")
    if labels is not None:
        if labels.shape[0] != inputs.shape[0]:
            raise HwrelError(f"{labels.shape[0]} labels for {inputs.shape[0]} inputs")
        n_out = net.nodes[-1].size
        if labels.numel() and (int(labels.max()) >= n_out or int(labels.min()) < 0):
            raise HwrelError(f"labels must lie in [0, {n_out - 1}] for a network with {n_out} outputs")


def certified_from_bounds(logits: Tensor, bound: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted class and certified flag from logits ``(B, C)`` and per-output bounds ``(B, C)``."""
    pred = logits.argmax(1)
    lower = logits.gather(1, pred[:, None])[:, 0] - bound.gather(1, pred[:, None])[:, 0]
    upper = logits + bound
    upper = upper.scatter(1, pred[:, None], float("-inf"))
    return pred, lower > upper.max(1).values


def certified_from_margin_bounds(logits: Tensor, margin_bound: Tensor) -> Tensor:
    """Certified flags from logits ``(B, C)`` and bounds ``(B, C)`` on each margin's change.

    ``margin_bound[n, o]`` bounds ``|d(F_p - F_o)(x_n)|`` (``p`` predicted); the prediction is kept
    if every margin ``F_p - F_o`` (``o != p``) exceeds its bound.
    """
    pred = logits.argmax(1)
    margin = logits.gather(1, pred[:, None]) - logits
    ok = (margin > margin_bound).scatter(1, pred[:, None], True)
    return ok.all(1)


def per_sample_bounds(an: Analyzer, fault: FaultModel, failures: Sequence[int], inputs: Tensor,
                      method: str = "best", chunk: int = 256) -> Tensor:
    """Sound per-sample, per-output error bounds ``(B, n_out)`` for inputs inside the domain.

    ``out[n, o]`` bounds ``|F~_o(x_n) - F_o(x_n)|`` for the faulty network's float32 forward
    ``F~`` and the exact clean network ``F`` (whose outputs hwrel computes in float64): a class
    certified on ``x_n`` is the class the faulty float32 model predicts there."""
    counts = an.counts(failures, fault)
    x = inputs.to(torch.float64).to(an.device)
    lo, hi = an.net.input_lo, an.net.input_hi
    if bool(((x < lo - 1e-12) | (x > hi + 1e-12)).any()):
        raise HwrelError("some inputs lie outside the network's input_domain; per-sample certificates "
                         "assume the domain the bounds were built for")
    glob = an.all_methods(fault, failures, at_most=False)
    domain_wide = min(glob[m] for m in ("paper", "weights")) if method == "best" else glob.get(method)
    out = []
    for b in range(0, x.shape[0], chunk):
        xb = x[b:b + chunk]
        # the domain-wide bounds compare two float32 forwards: plus the clean one's own rounding
        wide = domain_wide + point_rounding(an.net, xb)[-1][:, None]
        if method in ("interval", "best"):
            e = an.interval(fault, counts, xb, xb, reference="exact")
            if method == "best":
                e = torch.minimum(e, wide)
        else:
            e = wide.expand(xb.shape[0], an.net.nodes[-1].size).clone()
        out.append(e)
    return torch.cat(out).cpu()


def certified_accuracy(net: Network, inputs: Tensor, labels: Tensor, failures: Sequence[int],
                       fault: str | FaultModel = "crash", *, capacity: float | None = None, mode: str = "safe",
                       method: str = "best", device: "torch.device | str | None" = None) -> CertifiedResult:
    """Fraction of ``inputs`` whose correct prediction provably survives the failures (sound)."""
    _check_method(method)
    check_data(net, inputs, labels)
    fm = as_fault(fault, capacity, mode)
    an = Analyzer(net, device)
    with torch.no_grad():
        logits = an.net.forward(inputs.to(torch.float64).to(an.device)).cpu()
    bound = per_sample_bounds(an, fm, failures, inputs, method)
    pred, cert = certified_from_bounds(logits, bound)
    correct = pred == labels
    top2 = logits.topk(2, dim=1).values
    df = pd.DataFrame({"label": labels.numpy(), "pred": pred.numpy(), "margin": (top2[:, 0] - top2[:, 1]).numpy(),
                       "bound": bound.gather(1, pred[:, None])[:, 0].numpy(), "certified": cert.numpy()})
    return CertifiedResult(float((correct & cert).float().mean()), float(correct.float().mean()),
                           float(cert.float().mean()), df)
