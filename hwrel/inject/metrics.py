"""Measures of harm: how a faulty output differs from the clean one, per fault configuration.

A metric compares the faulty outputs of one configuration with the clean outputs of the same
inputs and returns one number per column. Measured, exact (no estimate): every number is computed
from the two output tensors.

* :class:`ClassifierMetric` (``(B, classes)`` scores, what the fast engine reports):
  ``max_abs_delta`` (max ``|faulty - clean|`` over samples and outputs, ``inf`` when an output is
  NaN/Inf), ``mismatch_rate`` (fraction of samples whose top-1 class changed; a sample with a
  NaN/Inf output counts as changed), ``nonfinite`` (any NaN/Inf output) and, with labels,
  ``accuracy`` (fraction correct; a NaN/Inf sample is wrong).
* :class:`NextTokenMetric` (causal language models, ``(B, T, vocab)`` logits of token sequences
  ``(B, T)``): ``agreement``, the fraction of the ``B * T`` positions whose top-1 next token equals
  the clean model's (a position with a NaN/Inf logit disagrees); ``mismatch_rate = 1 - agreement``
  (so campaign summaries count a configuration that changed any prediction as an SDC);
  ``cross_entropy``, the mean next-token cross-entropy in nats of the faulty model over the
  ``B * (T - 1)`` positions that have a next token (the sequence's own next tokens, or ``targets``),
  ``inf`` when a logit there is NaN/Inf; ``cross_entropy_delta`` = faulty minus clean
  (``exp`` of it is the perplexity ratio); ``max_abs_delta`` and ``nonfinite`` as above, over
  logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hwrel.errors import HwrelError, check

METRICS = ("classifier", "next-token")


def _rowwise(faulty: Tensor, clean: Tensor) -> tuple[float, Tensor, bool]:
    """``(max |faulty - clean|, per-row nonfinite (B, ...) , any nonfinite)`` over the last dim."""
    finite = torch.isfinite(faulty)
    bad_rows = ~finite.all(-1)
    anybad = bool(bad_rows.any())
    mx = math.inf if anybad else float((faulty.double() - clean.double()).abs().max()) if faulty.numel() else 0.0
    return mx, bad_rows, anybad


@dataclass(frozen=True)
class ClassifierMetric:
    """Top-1 class changes of a ``(B, classes)`` output (see the module docstring)."""

    labels: Tensor | None = None
    name: str = field(default="classifier", init=False)

    @property
    def columns(self) -> tuple[str, ...]:
        base = ("max_abs_delta", "mismatch_rate", "nonfinite")
        return base + (() if self.labels is None else ("accuracy",))

    def check(self, clean: Tensor) -> None:
        check(clean.dim() == 2, f"the classifier metric needs (B, classes) outputs, got shape "
              f"{tuple(clean.shape)}; for (B, T, vocab) logits use metric='next-token'")
        if self.labels is not None:
            check(self.labels.numel() == clean.shape[0],
                  f"labels have {self.labels.numel()} entries for {clean.shape[0]} inputs")

    def measure(self, faulty: Tensor, clean: Tensor) -> dict[str, float]:
        mx, bad, anybad = _rowwise(faulty, clean)
        top = faulty.argmax(-1)
        changed = (top != _top(self, clean)) | bad
        out = {"max_abs_delta": mx, "mismatch_rate": float(changed.double().mean()),
               "nonfinite": anybad}
        if self.labels is not None:
            lab = self.labels.to(top.device).reshape(-1)
            out["accuracy"] = float(((top == lab) & ~bad).double().mean())
        return out


@dataclass(frozen=True)
class NextTokenMetric:
    """Next-token agreement and cross-entropy change of a causal LM (see the module docstring).

    ``tokens``: the ``(B, T)`` input sequences; ``targets``: optional ``(B, T - 1)`` next tokens
    (default ``tokens[:, 1:]``).
    """

    tokens: Tensor
    targets: Tensor | None = None
    name: str = field(default="next-token", init=False)

    columns: tuple[str, ...] = field(default=("max_abs_delta", "mismatch_rate", "nonfinite", "agreement",
                                              "cross_entropy", "cross_entropy_delta"), init=False)

    def _targets(self) -> Tensor:
        t = self.tokens[:, 1:] if self.targets is None else self.targets
        return t.long()

    def check(self, clean: Tensor) -> None:
        tok = self.tokens
        check(tok.dim() == 2 and not tok.is_floating_point(),
              f"the next-token metric needs (B, T) integer token inputs, got {tuple(tok.shape)} {tok.dtype}")
        check(clean.dim() == 3 and tuple(clean.shape[:2]) == tuple(tok.shape),
              f"the next-token metric needs (B, T, vocab) logits for (B, T) = {tuple(tok.shape)} tokens, "
              f"got output shape {tuple(clean.shape)}")
        check(tok.shape[1] >= 2, "the next-token metric needs sequences of at least 2 tokens")
        tg = self._targets()
        check(tuple(tg.shape) == (tok.shape[0], tok.shape[1] - 1),
              f"targets must be (B, T - 1) = {(tok.shape[0], tok.shape[1] - 1)}, got {tuple(tg.shape)}")
        check(bool(((tg >= 0) & (tg < clean.shape[2])).all()),
              f"target tokens must lie in 0..{clean.shape[2] - 1}")
        object.__setattr__(self, "_clean_ce", self.cross_entropy(clean))

    def cross_entropy(self, logits: Tensor, checked: bool = False) -> float:
        """Mean next-token cross-entropy in nats (float64 log-softmax); ``inf`` with NaN/Inf logits."""
        z = logits[:, :-1]
        if not checked and not bool(torch.isfinite(z).all()):
            return math.inf
        lp = torch.log_softmax(z.double(), dim=-1)
        tg = self._targets().to(lp.device)
        return float(-lp.gather(-1, tg.unsqueeze(-1)).mean())

    def measure(self, faulty: Tensor, clean: Tensor) -> dict[str, float]:
        mx, bad, anybad = _rowwise(faulty, clean)
        changed = (faulty.argmax(-1) != _top(self, clean)) | bad
        rate = float(changed.double().mean())
        ce = math.inf if anybad and bool(bad[:, :-1].any()) else self.cross_entropy(faulty, checked=True)
        return {"max_abs_delta": mx, "mismatch_rate": rate, "nonfinite": anybad, "agreement": 1.0 - rate,
                "cross_entropy": ce, "cross_entropy_delta": ce - self._clean_ce}


Metric = ClassifierMetric | NextTokenMetric


def _top(metric: Metric, clean: Tensor) -> Tensor:
    """The clean top-1 of ``clean``, computed once per metric and output tensor."""
    got = metric.__dict__.get("_clean_top")
    if got is None or got[0] is not clean:
        got = (clean, clean.argmax(-1))
        object.__setattr__(metric, "_clean_top", got)
    return got[1]


def resolve_metric(metric: Any, inputs: Tensor, clean: Tensor, labels: Tensor | None) -> Metric:
    """The metric object for ``metric`` (``None``/``"auto"``, ``"classifier"``, ``"next-token"`` or
    a metric object), checked against the clean output. Auto: next-token for ``(B, T, vocab)``
    logits of integer ``(B, T)`` inputs, else classifier."""
    if metric is None or metric == "auto":
        lm = clean.dim() == 3 and inputs.dim() == 2 and not inputs.is_floating_point() \
            and tuple(clean.shape[:2]) == tuple(inputs.shape)
        metric = "next-token" if lm else "classifier"
    if metric == "classifier":
        metric = ClassifierMetric(labels)
    elif metric == "next-token":
        check(labels is None or labels.dim() == 2, "a language model takes no class labels; "
              "give next-token targets as a (B, T - 1) tensor, or none")
        metric = NextTokenMetric(inputs, labels)
    if not isinstance(metric, (ClassifierMetric, NextTokenMetric)):
        raise HwrelError(f"unknown metric {metric!r}: valid are {', '.join(METRICS)} or a metric object")
    metric.check(clean)
    return metric
