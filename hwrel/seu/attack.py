"""Adversarial bit-flip search: the fewest flips in stored parameters that break an accuracy budget.

Two searches over the same fault space (every bit of every stored parameter tensor, weights and
biases, as :mod:`hwrel.seu.mapping` stores them) and the same goal (the measured accuracy on the
evaluated inputs drops by more than ``max_accuracy_drop`` below the clean deployed accuracy):

- :func:`progressive_bit_search`: the published baseline, Rakin et al., *Bit-Flip Attack:
  Crushing Neural Network with Progressive Bit Search* (ICCV 2019). Per iteration: the gradient of
  the cross-entropy loss with respect to every bit (first order: ``dL/dw * dw`` of flipping it),
  the best bit of each tensor (in-layer search), each of those flipped alone and the loss measured
  exactly, the tensor whose flip raises the loss most keeps it (cross-layer search).
- :func:`adversarial_flips`: hwrel's search. It aims at the budget itself. Three greedy runs,
  each taking at every step a measured flip that breaks the budget at once when there is one:
  (1) its loss is the sum of the margins of the correct inputs closest to the decision boundary
  (as many as must break) and its candidates the best bits of that loss overall *and* the
  baseline's per-tensor candidates (first order under both losses), every candidate measured
  exactly; (2) the same with cross-entropy as the criterion; (3) the baseline's own schedule.
  Each run stops where the best so far stopped; the shortest that breaks the budget is kept, and
  flips it does not need are dropped again (each removal measured). So it never needs more flips
  than the baseline's schedule with the same finishing check.

Both are *measurements*: the flips found really break the budget (exact float64 forwards of the
deployed model, :class:`hwrel.seu.flips.FlipModel`), so the count is an upper bound on the fewest
flips that can, and any certified tolerance ``k`` must stay below it (``k < flips``); the report
checks that. Neither proves that fewer flips cannot break the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from hwrel.errors import HwrelError
from hwrel.formats import flip
from hwrel.network import Network
from hwrel.seu.flips import FlipModel
from hwrel.seu.mapping import StoredTensor

Flip = tuple[int, int, int]  # (tensor index, flat element, bit)


@dataclass(frozen=True, eq=False)
class AttackResult:
    """Outcome of one search. ``flips``: the flips kept, in the order found; ``broke``: whether
    the measured accuracy drop exceeds the budget with them (``flips_needed`` is then their number,
    else None: the search gave up after ``max_flips``). ``history``: one row per kept flip (tensor,
    element, bit, measured accuracy after it). ``forwards``: exact forwards measured."""

    method: str
    flips: tuple[Flip, ...]
    names: tuple[str, ...]
    broke: bool
    clean_accuracy: float
    accuracy: float
    max_accuracy_drop: float
    history: pd.DataFrame
    forwards: int

    @property
    def flips_needed(self) -> int | None:
        return len(self.flips) if self.broke else None

    def describe(self, limit: int = 4) -> str:
        """``'4.weight[123] bit 7, ...'`` for the first ``limit`` flips."""
        parts = [f"{self.names[t]}[{e}] bit {b}" for t, e, b in self.flips[:limit]]
        return ", ".join(parts) + (" ..." if len(self.flips) > limit else "")


class _State:
    """The stored tensors with the flips applied so far, and exact and differentiable forwards."""

    def __init__(self, net64: Network, stored: Sequence[StoredTensor], x: Tensor, y: Tensor):
        self.net, self.stored = net64, list(stored)
        self.x, self.y = x.to(torch.float64), y.to(torch.int64)
        self.fm = FlipModel(net64, self.stored, [None] * len(self.stored), self.x)
        self.flips: list[Flip] = []
        self.forwards = 0

    def _words(self, flips: Sequence[Flip]) -> list[Flip]:
        """Flips with pairs on the same bit cancelled (flipping twice restores the bit)."""
        seen: dict[Flip, int] = {}
        for f in flips:
            seen[f] = seen.get(f, 0) + 1
        return [f for f, n in seen.items() if n % 2]

    def run(self, extra: Sequence[Flip] = ()) -> Tensor:
        self.forwards += 1
        return self.fm.run(self._words([*self.flips, *extra]))

    def deltas(self, values: list[Tensor]) -> list[Tensor]:
        """Per tensor ``(numel, bits)``: value change of flipping each bit now (inf/nan where the
        flip gives a non-finite value)."""
        out = []
        touched = self._words(self.flips)
        for ti, t in enumerate(self.stored):
            bits = torch.arange(t.fmt.bits)
            if t.codes is not None:
                codes = t.codes.reshape(-1).clone()
                for (tj, e, b) in touched:
                    if tj == ti:
                        codes[e] = flip(t.fmt, codes[e], b)
                s = t.scale.expand_as(t.codes).reshape(-1).to(torch.float64)
                z = t.zero_point.expand_as(t.codes).reshape(-1)
                new = s[:, None] * (flip(t.fmt, codes[:, None], bits) - z[:, None]).to(torch.float64)
            else:
                new = flip(t.fmt, values[ti][:, None].to(torch.float32), bits).to(torch.float64)
            out.append(new - values[ti][:, None])
        return out

    def gradients(self, values: list[Tensor], loss_fn) -> list[Tensor]:
        """d loss / d stored value of every tensor (flat), at the current values."""
        leaves = [v.clone().requires_grad_(True) for v in values]
        params: dict[int, dict[str, Tensor]] = {}
        for ti, t in enumerate(self.stored):
            params.setdefault(t.node, {})[t.part] = leaves[ti].reshape(t.values.shape)
        vals: list[Tensor] = []
        with torch.enable_grad():
            for i, node in enumerate(self.net.nodes):
                if node.op == "input":
                    vals.append(self.x)
                elif i in params:
                    vals.append(node.affine(vals[node.inputs[0]], params[i].get("weight"), params[i].get("bias")))
                else:
                    vals.append(node.apply([vals[j] for j in node.inputs]))
            loss = loss_fn(vals[-1])
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(v) if g is None else torch.nan_to_num(g.detach()) for v, g in zip(values, grads)]


def _state_values(st: _State) -> list[Tensor]:
    """Current stored values of every tensor with the flips so far applied (exact)."""
    out = []
    touched = st._words(st.flips)
    for ti, t in enumerate(st.stored):
        if t.codes is not None:
            codes = t.codes.reshape(-1).clone()
            for (tj, e, b) in touched:
                if tj == ti:
                    codes[e] = flip(t.fmt, codes[e], b)
            s = t.scale.expand_as(t.codes).reshape(-1).to(torch.float64)
            z = t.zero_point.expand_as(t.codes).reshape(-1)
            out.append(s * (codes - z).to(torch.float64))
        else:
            v = t.values.reshape(-1).to(torch.float32).clone()
            for (tj, e, b) in touched:
                if tj == ti:
                    v[e] = flip(t.fmt, v[e], b)
            out.append(v.to(torch.float64))
    return out


def _accuracy(out: Tensor, y: Tensor) -> float:
    ok = (out.argmax(1) == y) & torch.isfinite(out).all(1)
    return float(ok.double().mean())


def _first_order(grads: list[Tensor], deltas: list[Tensor]) -> list[Tensor]:
    """First-order loss increase of each single flip; non-finite flips rank first."""
    out = []
    for g, d in zip(grads, deltas):
        gain = g[:, None] * torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)
        out.append(torch.where(torch.isfinite(d), gain, torch.full_like(gain, math.inf)))
    return out


def _best_per_tensor(scores: list[Tensor], exclude: set[Flip]) -> list[Flip]:
    picks = []
    for ti, s in enumerate(scores):
        flat = s.reshape(-1)
        order = torch.argsort(flat, descending=True)
        for idx in order[:len(exclude) + 1].tolist():
            e, b = divmod(int(idx), s.shape[1])
            if (ti, e, b) not in exclude and float(flat[idx]) > 0:
                picks.append((ti, e, b))
                break
    return picks


def _best_overall(scores: list[Tensor], n: int, exclude: set[Flip]) -> list[Flip]:
    cand: list[tuple[float, Flip]] = []
    for ti, s in enumerate(scores):
        flat = s.reshape(-1)
        k = min(flat.numel(), n + len(exclude))
        vals, idx = flat.topk(k)
        for v, i in zip(vals.tolist(), idx.tolist()):
            e, b = divmod(int(i), s.shape[1])
            if v > 0 and (ti, e, b) not in exclude:
                cand.append((v, (ti, e, b)))
    cand.sort(key=lambda c: -c[0])
    return [f for _, f in cand[:n]]


def _check(stored: Sequence[StoredTensor], x: Tensor, y: Tensor, drop: float, max_flips: int) -> None:
    if not stored:
        raise HwrelError("adversarial flips: the model stores no parameters")
    if x.shape[0] == 0 or y.shape[0] != x.shape[0]:
        raise HwrelError(f"adversarial flips: need inputs and as many labels, got {x.shape[0]} and {y.shape[0]}")
    if not 0 <= drop < 1:
        raise HwrelError(f"max_accuracy_drop must be a fraction in [0, 1), got {drop!r}")
    if isinstance(max_flips, bool) or not isinstance(max_flips, int) or max_flips < 1:
        raise HwrelError(f"max_flips must be an integer >= 1, got {max_flips!r}")


def _result(method: str, st: _State, clean: float, drop: float, rows: list[dict]) -> AttackResult:
    acc = _accuracy(st.run(), st.y)
    names = tuple(t.name for t in st.stored)
    return AttackResult(method, tuple(st.flips), names, clean - acc > drop + 1e-12, clean, acc, drop,
                        pd.DataFrame(rows, columns=["step", "tensor", "element", "bit", "accuracy"]), st.forwards)


def progressive_bit_search(net64: Network, stored: Sequence[StoredTensor], x: Tensor, y: Tensor, *,
                           max_accuracy_drop: float, max_flips: int = 64) -> AttackResult:
    """Rakin et al. (ICCV 2019) progressive bit search until the measured accuracy drops by more
    than ``max_accuracy_drop`` (or ``max_flips`` flips). ``net64``: the deployed float64 network
    computing with ``stored``'s values. Deterministic (no random choice)."""
    _check(stored, x, y, max_accuracy_drop, max_flips)
    st = _State(net64, stored, x, y)
    clean = _accuracy(st.run(), st.y)
    ce = torch.nn.functional.cross_entropy
    rows: list[dict] = []
    while len(st.flips) < max_flips:
        if clean - _accuracy(st.run(), st.y) > max_accuracy_drop + 1e-12:
            break
        vals = _state_values(st)
        grads = st.gradients(vals, lambda out: ce(out, st.y, reduction="sum"))
        cands = _best_per_tensor(_first_order(grads, st.deltas(vals)), set(st.flips))
        if not cands:
            break
        best, best_loss = None, -math.inf
        for f in cands:  # cross-layer search: the loss after each tensor's candidate, measured
            out = st.run([f])
            loss = math.inf if not bool(torch.isfinite(out).all()) else float(ce(out, st.y, reduction="sum"))
            if loss > best_loss:
                best, best_loss = f, loss
        st.flips.append(best)
        rows.append({"step": len(st.flips), "tensor": stored[best[0]].name, "element": best[1], "bit": best[2],
                     "accuracy": _accuracy(st.run(), st.y)})
    return _result("progressive bit search (Rakin et al. 2019)", st, clean, max_accuracy_drop, rows)


def _score(out: Tensor, y: Tensor, correct: Tensor, need: int) -> tuple[float, float]:
    """(accuracy broken relative to clean: inputs wrong now, -sum of the ``need`` smallest
    margins among the clean-correct inputs still correct); larger is better for the attack."""
    finite = torch.isfinite(out).all(1)
    wrong = (out.argmax(1) != y) | ~finite
    o = torch.nan_to_num(out, nan=0.0, posinf=1e300, neginf=-1e300)
    true = o.gather(1, y[:, None])[:, 0]
    other = o.scatter(1, y[:, None], -math.inf).amax(1)
    m = (true - other)[correct & ~wrong]
    tail = -float(m.sort().values[:max(need, 1)].sum()) if m.numel() else 0.0
    return float(wrong.double().sum()), tail


def _greedy(st: _State, clean: float, correct: Tensor, need_wrong: int, drop: float, max_flips: int,
            candidates: int, criterion: str) -> list[dict]:
    """Greedy flips until the budget breaks; each step measures the candidates exactly and keeps
    the one that breaks the budget, else the best by ``criterion``: "margin" (the margins of the
    correct inputs closest to the boundary), "loss" (cross-entropy) or "baseline" (cross-entropy
    over the baseline's candidates only: the progressive bit search with a finishing check)."""
    ce = torch.nn.functional.cross_entropy
    y = st.y
    rows: list[dict] = []

    def margin_loss(out: Tensor) -> Tensor:
        true = out.gather(1, y[:, None])[:, 0]
        m = true - out.scatter(1, y[:, None], -1e300).amax(1)
        still = correct & (m > 0)
        need = max(1, need_wrong - int((~still).sum()))
        sel = torch.where(still, m, torch.full_like(m, math.inf)).detach().argsort()[:need]
        return -m[sel].sum()

    def ce_loss(out: Tensor) -> Tensor:
        return ce(out, y, reduction="sum")

    while len(st.flips) < max_flips:
        if clean - _accuracy(st.run(), y) > drop + 1e-12:
            break
        vals = _state_values(st)
        deltas = st.deltas(vals)
        s_margin = _first_order(st.gradients(vals, margin_loss), deltas)
        s_ce = _first_order(st.gradients(vals, ce_loss), deltas)
        taken = set(st.flips)
        if criterion == "baseline":  # the baseline's own candidates: the best bit of each tensor
            cands = _best_per_tensor(s_ce, taken)
        else:
            main = s_ce if criterion == "loss" else s_margin
            cands = list(dict.fromkeys(_best_overall(main, candidates, taken) + _best_per_tensor(s_margin, taken)
                                       + _best_per_tensor(s_ce, taken)))
        if not cands:
            break
        best, best_key = None, None
        for f in cands:
            out = st.run([f])
            w, tail = _score(out, y, correct, need_wrong)
            loss = math.inf if not bool(torch.isfinite(out).all()) else float(ce(out, y, reduction="sum"))
            key = (w >= need_wrong, tail if criterion == "margin" else loss, w)
            if best_key is None or key > best_key:
                best, best_key = f, key
        st.flips.append(best)
        rows.append({"step": len(st.flips), "tensor": st.stored[best[0]].name, "element": best[1], "bit": best[2],
                     "accuracy": _accuracy(st.run(), y)})
    return rows


def adversarial_flips(net64: Network, stored: Sequence[StoredTensor], x: Tensor, y: Tensor, *,
                      max_accuracy_drop: float, max_flips: int = 64, candidates: int = 16,
                      criteria: Sequence[str] = ("margin", "loss", "baseline"), prune: bool = True
                      ) -> AttackResult:
    """hwrel's search (module docstring): the fewest flips it finds whose measured accuracy drop
    exceeds ``max_accuracy_drop`` on ``x, y``. One greedy run per criterion ("margin": the margins
    that must break; "loss": cross-entropy; each measuring per step the ``candidates`` best flips
    of its criterion plus the best flip of every tensor under both; "baseline": the progressive bit
    search's own schedule), each run stopping where the best so far stopped, and every step first
    taking a flip that breaks the budget at once; the shortest run that breaks the budget is pruned
    (flips not needed dropped, each removal measured). Deterministic."""
    _check(stored, x, y, max_accuracy_drop, max_flips)
    best: tuple[_State, list[dict]] | None = None
    forwards = 0
    for crit in criteria:
        st = _State(net64, stored, x, y)
        out0 = st.run()
        clean = _accuracy(out0, st.y)
        correct = (out0.argmax(1) == st.y) & torch.isfinite(out0).all(1)
        n = int(st.y.shape[0])
        need_wrong = int(math.floor((1 - clean + max_accuracy_drop) * n + 1e-9)) + 1  # wrong inputs to break
        limit = max_flips if best is None or not _broke(best[0], clean, max_accuracy_drop) \
            else len(best[0].flips) - 1
        rows = _greedy(st, clean, correct, need_wrong, max_accuracy_drop, max(limit, 0), candidates, crit)
        forwards += st.forwards
        if best is None or (_broke(st, clean, max_accuracy_drop) and
                            (not _broke(best[0], clean, max_accuracy_drop) or len(st.flips) < len(best[0].flips))):
            best = (st, rows)
    st, rows = best
    forwards -= st.forwards  # counted again below, with the pruning's forwards
    if prune and len(st.flips) > 1 and _broke(st, clean, max_accuracy_drop):
        for f in list(st.flips):  # drop every flip the budget breaks without
            saved = st.flips
            st.flips = [g for g in saved if g != f]
            if not _broke(st, clean, max_accuracy_drop):
                st.flips = saved
        kept = set(st.flips)
        rows = [r for r in rows if (stored_index(stored, r["tensor"]), r["element"], r["bit"]) in kept]
    st.forwards += forwards  # total over the runs
    return _result("hwrel adversarial search", st, clean, max_accuracy_drop, rows)


def _broke(st: _State, clean: float, drop: float) -> bool:
    return clean - _accuracy(st.run(), st.y) > drop + 1e-12


def stored_index(stored: Sequence[StoredTensor], name: str) -> int:
    for i, t in enumerate(stored):
        if t.name == name:
            return i
    raise KeyError(name)


def attack_on_accelerator(net: Network, accelerator: Any, x: Tensor, y: Tensor, *, max_accuracy_drop: float,
                          seed: int = 0, max_samples: int = 256, max_flips: int = 64,
                          format: str | None = None) -> tuple[AttackResult, AttackResult]:
    """(hwrel's search, the progressive bit search) on ``net`` stored on ``accelerator`` as
    :func:`hwrel.seu.analysis.seu_analysis` stores it, on the inputs it evaluates (same
    ``max_samples`` and ``seed``), against the same accuracy budget: every stored bit may flip."""
    from hwrel.seu.accelerator import Accelerator, load_accelerator
    from hwrel.seu.analysis import evaluated_subset
    from hwrel.seu.mapping import map_model

    acc = accelerator if isinstance(accelerator, Accelerator) else load_accelerator(accelerator)
    keep = evaluated_subset(int(x.shape[0]), max_samples, seed)
    if keep is not None:
        x, y = x[keep], y[keep]
    mapping = map_model(net, acc, format)
    net64 = mapping.deployed(net.to())
    stored = list(mapping.tensors)
    ours = adversarial_flips(net64, stored, x, y, max_accuracy_drop=max_accuracy_drop, max_flips=max_flips)
    base = progressive_bit_search(net64, stored, x, y, max_accuracy_drop=max_accuracy_drop, max_flips=max_flips)
    return ours, base
