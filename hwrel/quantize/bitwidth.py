"""``safe_bitwidth``: the smallest weight width whose certified loss stays within a budget."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd

from hwrel.errors import check
from hwrel.quantize.rounding import BITS, QuantSpec
from hwrel.quantize.safe import KINDS, _inputs, smallest_meeting, sweep

_COLUMNS = {  # kind -> (accuracy column, output-error column)
    "certified": ("certified_accuracy", "certified_error"),
    "adversarial": ("adversarial_accuracy", "adversarial_error"),
    "estimated": ("estimated_accuracy", "estimated_error"),
    "measured": ("measured_accuracy", "measured_error"),
}


@dataclass(frozen=True)
class BitwidthResult:
    """Safe widths by each kind of reasoning, never mixed up.

    ``certified_bits``: guaranteed for any rounding within half a step. ``adversarial_bits``: the
    width below which a search finds a rounding-sized perturbation breaking the budget (a lower end
    for any certificate). ``estimated_bits``: statistical model of rounding. ``measured_bits``:
    Brevitas PTQ on the test data. ``None`` where no width in the sweep meets the budget (then
    ``message`` says so with the best achievable). Memory is for the weights, against float32.
    """

    budget: dict[str, float]
    spec: str
    certified_bits: int | None
    adversarial_bits: int | None
    estimated_bits: int | None
    measured_bits: int | None
    memory_saved_bits: int | None
    memory_saved_percent: float | None
    table: pd.DataFrame
    per_layer: dict[str, int] | None = None
    per_layer_stored_bits: int | None = None
    uniform_stored_bits: int | None = None
    per_layer_check: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict:
        table = self.table.astype(object).where(self.table.notna(), None)
        return {"budget": self.budget, "spec": self.spec, "certified_bits": self.certified_bits,
                "adversarial_bits": self.adversarial_bits, "estimated_bits": self.estimated_bits,
                "measured_bits": self.measured_bits, "memory_saved_bits": self.memory_saved_bits,
                "memory_saved_percent": self.memory_saved_percent, "per_layer": self.per_layer,
                "per_layer_stored_bits": self.per_layer_stored_bits, "uniform_stored_bits": self.uniform_stored_bits,
                "per_layer_check": self.per_layer_check, "timings": self.timings, "message": self.message,
                "table": table.to_dict(orient="records")}

    def plot(self):
        """Figure: bounds per method and measured error (log scale) and accuracies, against width."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        t = self.table
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for col, label, style in (("bound_paper", "certified bound, paper (any input)", "--"),
                                  ("bound_weights", "certified bound, weight-aware (any input)", "--"),
                                  ("bound_interval", "certified bound, interval (any input)", "--"),
                                  ("certified_error", "certified, per test input (max; linearized)", "-"),
                                  ("adversarial_error", "adversarial (search, max)", ":"),
                                  ("estimated_error", "estimated (3 sigma, max)", "-."),
                                  ("measured_error", "measured (Brevitas PTQ, max)", "-")):
            if col in t:
                a1.semilogy(t["bits"], t[col], style, marker="o", ms=3, label=label)
        a1.set_xlabel("weight bit width")
        a1.set_ylabel("largest output change (logits)")
        a1.legend(fontsize=7)
        for col, label in (("certified_accuracy", "certified"), ("adversarial_accuracy", "adversarial"),
                           ("estimated_accuracy", "estimated"), ("measured_accuracy", "measured")):
            if col in t:
                a2.plot(t["bits"], t[col], marker="o", ms=3, label=label)
        a2.axhline(t["clean_accuracy"].iloc[0], color="gray", lw=0.8, label="float model")
        a2.set_xlabel("weight bit width")
        a2.set_ylabel("test accuracy")
        a2.legend(fontsize=7)
        fig.suptitle(f"quantization as bounded perturbation ({self.spec})")
        fig.tight_layout()
        return fig


def _ok(table: pd.DataFrame, kind: str, drop: float | None, eps: float | None) -> list[bool]:
    acc, err = _COLUMNS[kind]
    if acc not in table:
        return [False] * len(table)
    if eps is not None:
        return list(table[err] <= eps)
    return list(table["clean_accuracy"] - table[acc] <= drop + 1e-12)


def _accuracy_budget(sw, start: int, drop: float):
    """``meets(trial)`` for the greedy under an accuracy budget, weights only: a trial lowers one
    layer's width of the last accepted assignment, so its rounding box contains that one's, and
    only the inputs certified there are tried, each trial stopping at the first miss too many
    (:meth:`Predictor.certified_among`). Sound: an input not tried counts as not certified."""
    p = sw.p
    n, n_correct = len(p.x), int(p.correct.sum())
    need = n_correct - (drop + 1e-12) * n  # certified correct inputs a budget-meeting assignment keeps

    def cap(lb) -> float:
        return min(p.domain_bounds(lb).values())

    if start in sw.flags:  # the sweep certified every input at the uniform width already
        first = sw.flags[start]
    else:
        lb0 = p.layer_bits(start)
        first = p.certified_among(lb0, cap(lb0), p.correct)
    state = {"certified": first & p.correct}

    def meets(lb) -> bool:
        current = state["certified"]
        allowed = int(current.sum()) - math.ceil(need - 1e-9)
        if allowed < 0:
            return False
        flags = p.certified_among(lb, cap(lb), current, max_misses=allowed)
        if flags is None or p.clean_accuracy - float((flags & p.correct).sum()) / n > drop + 1e-12:
            return False
        state["certified"] = flags & p.correct
        return True

    return meets


def _greedy(sw, start: int, meets) -> dict[int, int]:
    """Lower one layer at a time (the one saving most bits) while the certified budget holds."""
    lb = {i: start for i in sw.p.layers}
    while True:
        cands = sorted((i for i in lb if lb[i] > 2), key=lambda i: -sw.p.net.nodes[i].affine.weight.numel())
        for i in cands:
            trial = {**lb, i: lb[i] - 1}
            if meets(trial):
                lb = trial
                break
        else:
            return lb


def safe_bitwidth(model: Any, data: Any, max_accuracy_drop: float | None = 0.01, epsilon: float | None = None, *,
                  per_layer: bool = False, verify: bool = True, bits: Sequence[int] = BITS, per_channel: bool = False,
                  symmetric: bool = True, act_bits: int | str | None = None, adversarial: bool = True,
                  qat_epochs: int = 0, input_domain=None, input_shape=None, device=None,
                  progress: Callable[[float, str], None] | None = None) -> BitwidthResult:
    """Smallest weight width (2..16) whose *certified* accuracy loss (or output error) meets the budget.

    ``data``: ``(x, y)``, ``(x, y, calibration_x)`` or a reference model (its test split; its
    training split calibrates). ``max_accuracy_drop``: allowed loss against the float model
    (fraction); ``epsilon``: allowed change of any logit on the test inputs instead. The per-bit
    table holds every kind of answer; ``verify`` runs Brevitas PTQ at every width (and
    ``qat_epochs`` of quantization-aware fine-tuning, reported as ``qat_accuracy``). ``device``:
    where the bounds and the search compute (``"cuda"`` for a GPU; Brevitas runs on the CPU).
    ``progress(fraction, message)``: called after each step (sweep widths, per-layer trials) with
    the fraction done (0..1, a rough guide from the reference models' timings).

    Weights only, certified accuracy comes from :meth:`Predictor.certified_flags` (each input
    bounded at the few widths that decide it) and ``certified_error`` from verification's
    per-input bounds (NaN without ``verify``); with quantized activations every input is bounded
    at every width.
    """
    if epsilon is not None:
        check(isinstance(epsilon, (int, float)) and epsilon > 0 and math.isfinite(epsilon),
              f"epsilon must be a positive number, got {epsilon!r}")
        budget = {"epsilon": float(epsilon)}
        drop = None
    else:
        check(isinstance(max_accuracy_drop, (int, float)) and 0 <= max_accuracy_drop < 1,
              f"max_accuracy_drop must be a fraction in [0, 1), got {max_accuracy_drop!r}")
        budget = {"max_accuracy_drop": float(max_accuracy_drop)}
        drop = float(max_accuracy_drop)
    bits = sorted(set(int(b) for b in bits))
    check(bool(bits), "no bit widths to sweep")
    spec = QuantSpec(per_channel, symmetric, act_bits)
    module, net, x, y, calib = _inputs(model, data, input_domain, input_shape)
    check(x is not None, "safe_bitwidth needs data: (inputs, labels) or a reference model")
    check(not verify or module is not None, "verification needs an nn.Module (Brevitas quantizes modules)")
    from hwrel.models import ReferenceModel

    say = progress or (lambda frac, msg: None)
    sweep_share = 0.8 if per_layer else 1.0  # the per-layer greedy takes about the rest
    ref = data if isinstance(data, ReferenceModel) else model if isinstance(model, ReferenceModel) else None
    train = (ref.x_train, ref.y_train) if ref is not None else (x, y)
    table, sw, timings = sweep(module, net, x, y, calib, spec, bits, adversarial=adversarial, verify=verify,
                               qat_epochs=qat_epochs, train=train, device=device,
                               # an output-error budget needs every width's largest per-input bound, which
                               # only verification computes otherwise
                               full_table=epsilon is not None and not verify,
                               max_accuracy_drop=drop if act_bits is None else None,
                               progress=(lambda frac, msg: say(frac * sweep_share, msg)))
    found = {k: smallest_meeting(list(table["bits"]), _ok(table, k, drop, epsilon)) if _COLUMNS[k][0] in table
             else None for k in KINDS}
    cb = found["certified"]
    message = ""
    if cb is None:
        acc, err = _COLUMNS["certified"]
        top = table.iloc[-1]
        best = (f"certified output error {top[err]:.4g} at {int(top['bits'])} bits" if epsilon is not None
                else f"certified accuracy drop {top['clean_accuracy'] - top[acc]:.4f} at {int(top['bits'])} bits")
        message = f"no bit width in {bits[0]}..{bits[-1]} meets the budget with a certificate; best achievable: {best}"
    saved = pct = None
    if cb is not None:
        stored = sw.p.stored_bits(cb)
        saved, pct = sw.p.float_bits - stored, 100.0 * (sw.p.float_bits - stored) / sw.p.float_bits
    pl = pl_bits = uni_bits = pl_check = None
    if per_layer and cb is not None:
        t0 = time.perf_counter()
        if epsilon is None and act_bits is None:
            meets = _accuracy_budget(sw, cb, drop)
        else:
            def meets(lb):
                c = sw.certified(lb)
                if epsilon is not None:
                    return c["certified_error"] <= epsilon
                return sw.p.clean_accuracy - c["certified_accuracy"] <= drop + 1e-12

        n_layers = len(sw.p.layers)
        trials = {"n": 0, "kept": 0}

        def meets_logged(trial):
            ok = meets(trial)
            trials["n"] += 1
            trials["kept"] += ok
            # a greedy lowers each layer a few bits at most: about 2 trials per layer and bit saved
            frac = sweep_share + (1 - sweep_share) * min(0.95, trials["n"] / (4 * n_layers + trials["kept"] * 2))
            say(frac, f"per-layer widths: trial {trials['n']} ({trials['kept']} bits saved so far)")
            return ok

        lb = _greedy(sw, cb, meets_logged)
        pl = {sw.names[i]: b for i, b in lb.items()}
        pl_bits, uni_bits = sw.p.stored_bits(lb), sw.p.stored_bits(cb)
        c = sw.certified(lb)
        pl_check = {"certified_accuracy": c["certified_accuracy"], "certified_error": c["certified_error"]}
        timings["per_layer_s"] = time.perf_counter() - t0
        say(0.98, "per-layer widths: Brevitas check of the chosen widths" if verify else "per-layer widths chosen")
        if verify:
            t0 = time.perf_counter()
            pl_check.update(sw.measured(lb, c["_bound"]))
            timings["verify_s"] += time.perf_counter() - t0
        saved, pct = sw.p.float_bits - pl_bits, 100.0 * (sw.p.float_bits - pl_bits) / sw.p.float_bits
    return BitwidthResult(budget, spec.label, cb, found["adversarial"], found["estimated"], found["measured"],
                          saved, pct, table, pl, pl_bits, uni_bits, pl_check, timings, message)
