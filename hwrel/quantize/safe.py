"""Safe bit widths: certified, adversarial, estimated and measured answers side by side.

- *certified*: a guarantee for any rounding within half a step (sound per-input bounds);
- *adversarial*: damage a gradient search actually finds within half a step (a lower end for any
  certificate: no sound method may certify an input it breaks);
- *estimated*: independent uniform rounding errors propagated through the Jacobian (no guarantee);
- *measured*: Brevitas post-training quantization, run on the test data (one actual rounding).

A width "meets the budget" for a kind of reasoning when it and every larger width in the sweep
meet it (the answers are then stable under small changes).

Certified vs adversarial widths. The per-input certificate is the smaller of the interval bound
and the linearized bound (:mod:`hwrel.bounds.linearized`): the exact worst case of the first-order
change, where a shared convolution kernel weight rounds once for every output position, plus a
sound remainder, whose radii are refined neuron by neuron where an activation is near its kink.
It is within one bit of the adversarial width on every reference model
(``benchmarks/results/bitwidth.md``); the interval bound alone, which lets every position take its
own worst rounding, was 4 bits above on ``mnist-lenet`` and certified nothing up to 16 bits on
``mnist-resnet``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from hwrel.errors import HwrelError, check
from hwrel.network import Network
from hwrel.quantize import brevitas_ptq as bq
from hwrel.quantize.estimate import estimated_accuracy, estimated_deviation
from hwrel.quantize.predict import Predictor
from hwrel.quantize.rounding import BITS, QuantSpec, weight_radius, weight_storage
from hwrel.quantize.search import per_input_attack, shared_attack

KINDS = ("certified", "adversarial", "estimated", "measured")


def _inputs(model: Any, data: Any, input_domain, input_shape):
    """(module or None, Network, x, y, calibration inputs) from the accepted argument forms."""
    from hwrel.models import ReferenceModel

    ref = data if isinstance(data, ReferenceModel) else model if isinstance(model, ReferenceModel) else None
    module = model.module if isinstance(model, ReferenceModel) else model if isinstance(model, nn.Module) else None
    if module is not None:
        # already quantized (Brevitas): the weights it computes with are the float reference, so that a
        # batch norm after a quantized layer folds as in the Brevitas re-quantization (see bq.dequantize)
        module = bq.dequantize(module)
    if isinstance(model, Network):
        net = model
    elif module is not None:
        dom = input_domain if input_domain is not None else (ref.input_domain if ref else (0.0, 1.0))
        shape = input_shape if input_shape is not None else (ref.input_shape if ref else None)
        net = Network.from_module(module, dom, shape)
    else:
        raise HwrelError(f"expected an nn.Module, a hwrel.Network or a reference model, got {type(model).__name__}")
    if data is None:
        return module, net, None, None, None
    if isinstance(data, ReferenceModel):
        return module, net, data.x_test, data.y_test, data.x_train[:512]
    if not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
        raise HwrelError("data must be (inputs, labels), (inputs, labels, calibration inputs) or a reference model")
    x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    calib = torch.as_tensor(data[2]) if len(data) == 3 else x
    return module, net, x.float(), y.long(), calib


class _Sweep:
    """Everything per bit width, sharing one Predictor, Jacobian and Brevitas model cache."""

    def __init__(self, module, net: Network, x, y, calib, spec: QuantSpec, device=None):
        self.module, self.spec, self.calib = module, spec, calib
        self._ptq: dict[tuple, nn.Module] = {}
        act_quant = self._act_quant if spec.act_bits is not None else None
        check(spec.act_bits is None or module is not None, "activation quantization needs an nn.Module")
        self.p = Predictor(net, spec, x, y, act_quant=act_quant, device=device)
        self.names = {i: self.p.net.nodes[i].name for i in self.p.layers}
        self.flags: dict[int, Tensor] = {}  # per width, the sweep's certified flags (when it computed them)

    def qmodel(self, lb: Mapping[int, int]) -> nn.Module:
        key = tuple(sorted(lb.items()))
        if key not in self._ptq:
            uniform = len(set(lb.values())) == 1
            bits = next(iter(lb.values())) if uniform else {self.names[i]: b for i, b in lb.items()}
            self._ptq[key] = bq.ptq(self.module, self.calib, bits, per_channel=self.spec.per_channel,
                                    symmetric=self.spec.symmetric,
                                    act_bits=self.spec.act_width(max(lb.values())))
        return self._ptq[key]

    def _act_quant(self, lb: dict[int, int]) -> list[tuple[float, float, float]]:
        box = (self.p.net.input_lo.float().cpu(), self.p.net.input_hi.float().cpu())  # Brevitas: CPU
        qnet = Network.from_module(self.qmodel(lb), box, self.p.net.input_shape)
        return [(n.act.quant_step, n.act.lo, n.act.hi) for n in qnet.nodes if n.op == "act" and n.act.kind == "quant"]

    # ------------------------------------------------------------------------------- kinds

    def certified(self, bits, dom: dict[str, float] | None = None,
                  certs: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
        """Domain-wide bounds by every method and per-input certificates at ``bits``.

        ``certs``: the per-input ``(output, margin)`` bounds if already computed."""
        dom = self.p.domain_bounds(bits) if dom is None else dom
        out, mb = self.p.sample_certificates([bits], [min(dom.values())])[0] if certs is None else certs
        acc, cert = self.p.certify(mb)
        return {"bound_paper": dom["paper"], "bound_weights": dom["weights"], "bound_interval": dom["interval"],
                "certified_error": float(out.max()), "certified_accuracy": acc, "_cert": cert, "_bound": out}

    def estimated(self, bits) -> dict[str, float]:
        p = self.p
        steps = {}
        for i, b in p.layer_bits(bits).items():
            w = p.net.nodes[i].affine.weight
            st = weight_storage(w, b, self.spec)
            steps[i] = st.scale.to(torch.float64).expand(w.shape[0]) if st.scale.dim() == 0 else st.scale.double()
        acts = {i: s for i, (s, _, _) in p.act_scales(bits).items()}
        var_out, var_m = p.jacobian_sums().variances(steps, acts)
        return {"estimated_error": float(estimated_deviation(var_out).max()),
                "estimated_accuracy": estimated_accuracy(p.logits, p.correct, var_m)}

    def adversarial(self, bits, cert: Tensor, known_broken: Tensor, steps: int = 20, *, shared: bool = True,
                    check_certified: int = 16) -> dict[str, Any]:
        """Measured: accuracy under the strongest rounding-box perturbations found (an upper bound
        on the true worst-case accuracy at ``bits``).

        The shared attack (one perturbation for every input, like one quantized model) targets the
        correct inputs not certified at ``bits``: a certified input cannot be broken, and leaving it
        out makes the attack both cheaper and aimed at what it can break. ``shared=False`` skips it
        (``adversarial_shared_accuracy`` is NaN): the sweep does so below a width whose attacks
        already broke the budget. The per-input attack runs on every correct input neither certified
        nor already broken, plus up to ``check_certified`` certified ones as a check of the
        certificates (``certified_but_broken``; any break is a soundness bug)."""
        p = self.p
        wr = {i: weight_radius(p.net.nodes[i].affine.weight, b, self.spec) for i, b in p.layer_bits(bits).items()}
        allv = p.all_values
        pert = p.perturbation(bits, (allv, allv))
        ar = {i: torch.as_tensor(r, dtype=torch.float64, device=p.device).expand(len(p.x), *p.net.nodes[i].shape)
              for i, r in pert.act_radius.items()}
        broken = known_broken.clone()
        shared_acc = math.nan
        if shared:
            target = torch.nonzero(p.correct & ~cert)[:, 0]
            n_broken = 0
            if len(target):
                m_sh, _ = shared_attack(p.net, p.x[target], p.pred[target], wr, steps=2 * steps)
                broken[target[m_sh < 0]] = True
                n_broken = int((m_sh < 0).sum())
            shared_acc = (int(p.correct.sum()) - n_broken) / len(p.x)
        todo = torch.nonzero(p.correct & ~cert & ~broken)[:, 0]
        certified = torch.nonzero(p.correct & cert)[:, 0]
        if check_certified and len(certified):  # evenly spread over the (seeded, shuffled) inputs
            k = min(check_certified, len(certified))
            pick = torch.arange(k, device=certified.device) * len(certified) // k  # distinct, spread out
            todo = torch.cat([todo, certified[pick]])
        dev = 0.0
        if len(todo):
            m, d = per_input_attack(p.net, p.x[todo], p.pred[todo], wr, {k: v[todo] for k, v in ar.items()}, steps)
            broken[todo[m < 0]] = True
            dev = float(d.max())
        return {"adversarial_accuracy": float((p.correct & ~broken).double().mean()),
                "adversarial_shared_accuracy": shared_acc,
                "adversarial_error": dev, "certified_but_broken": int((cert & broken).sum()), "_broken": broken}

    def measured(self, bits, bound: Tensor, qat_epochs: int = 0, train=None) -> dict[str, Any]:
        p = self.p
        q = self.qmodel(p.layer_bits(bits))
        x = p.x.float().cpu()  # Brevitas runs on the CPU
        # the certificates bound the quantized float32 model against the exact clean one
        f = p.logits.cpu()  # the network's exact (float64) outputs
        fq = bq.forward(q, x).double()
        dev = (fq - f).abs()
        out = {"measured_error": float(dev.max()),
               "measured_accuracy": float((fq.argmax(1) == p.y.cpu()).double().mean()),
               "bound_violations": int((dev > bound.cpu()).sum())}
        if qat_epochs:
            qq = bq.qat(q, train[0], train[1], epochs=qat_epochs)
            out["qat_accuracy"] = float((bq.forward(qq, x).argmax(1) == p.y.cpu()).double().mean())
        return out


def smallest_meeting(bits: Sequence[int], ok: Sequence[bool]) -> int | None:
    """Smallest width that, with every larger width in the sweep, meets the budget."""
    best = None
    for b, good in sorted(zip(bits, ok), reverse=True):
        if not good:
            break
        best = b
    return best


def sweep(module, net: Network, x, y, calib, spec: QuantSpec, bits: Sequence[int], *, adversarial: bool = True,
          verify: bool = True, qat_epochs: int = 0, train=None, steps: int = 20,
          full_table: bool = True, device=None, max_accuracy_drop: float | None = None,
          progress: Callable[[float, str], None] | None = None) -> tuple[pd.DataFrame, _Sweep, dict]:
    """One row per bit width with every kind of answer; also the sweep state and timings (s).

    ``full_table=False`` (weights only): certified accuracy at every width from per-input
    certificates evaluated only where undecided (:meth:`Predictor.certified_flags`);
    ``certified_error`` (the largest per-input bound, which needs every input at every width) is
    then NaN unless ``verify``, whose per-input bounds (computed on its own clock) fill it in.
    ``predict_s`` covers building the predictor and every width's prediction. ``device``: where
    the predictor computes (``"cuda"`` for a GPU); Brevitas verification runs on the CPU.

    ``max_accuracy_drop``: when given (weights only), widths below one whose attacks already broke
    this budget skip the shared attack (the budget is broken there too: the rounding boxes grow as
    the width falls, so an input broken at ``b + 1`` is broken at ``b``). ``progress(fraction,
    message)`` is called after each step (fraction of the sweep done, 0..1).
    """
    say = progress or (lambda frac, msg: None)
    t = {"predict_s": 0.0, "adversarial_s": 0.0, "verify_s": 0.0}
    t0 = time.perf_counter()
    sw = _Sweep(module, net, x, y, calib, spec, device)
    rows: dict[int, dict] = {}
    broken = torch.zeros(len(x), dtype=torch.bool, device=sw.p.device)
    monotone = spec.act_bits is None  # radii shrink with the width: broken at b+1 => broken at b
    # rough shares of a sweep's time (measured on the reference CNNs), for the progress fraction
    share = {"domain": 0.08, "flags": 0.12, "certs": 0.1}
    per_width = (1 - sum(share.values())) / len(bits)
    done = 0.0
    doms = {}
    for b in bits:
        doms[b] = sw.p.domain_bounds(b)
        done += share["domain"] / len(bits)
        say(done, f"domain-wide bounds at {b} bits")
    caps = {b: min(d.values()) for b, d in doms.items()}
    flags = certs = None
    if full_table or not monotone:
        certs = dict(zip(bits, sw.p.sample_certificates(bits, [caps[b] for b in bits])))
    else:
        start = done
        flags = sw.flags = sw.p.certified_flags(bits, caps,
                                                progress=lambda f, m: say(start + f * share["flags"], m))
    done += share["flags"]
    say(done, f"per-input certificates of {len(x)} inputs")
    t["predict_s"] += time.perf_counter() - t0
    if verify and certs is None:  # the per-input bounds verification checks, on its own clock
        t0 = time.perf_counter()
        # sound per-output bounds; the refined radii only serve certification, so skip them here
        certs = dict(zip(bits, sw.p.sample_certificates(bits, [caps[b] for b in bits], refine=False)))
        t["verify_s"] += time.perf_counter() - t0
    done += share["certs"]
    say(done, "per-width checks: adversarial search and Brevitas PTQ, from the largest width down")
    over_budget = False  # a larger width's attacks already broke max_accuracy_drop
    for b in sorted(bits, reverse=True):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"bits": b, "stored_bits": sw.p.stored_bits(b), "clean_accuracy": sw.p.clean_accuracy}
        if flags is None:
            row.update(sw.certified(b, doms[b], certs[b]))
        else:
            d = doms[b]
            row.update({"bound_paper": d["paper"], "bound_weights": d["weights"], "bound_interval": d["interval"],
                        "certified_error": float(certs[b][0].max()) if certs is not None else float("nan"),
                        "certified_accuracy": float((sw.p.correct & flags[b]).double().mean()),
                        "_cert": flags[b], "_bound": None})
        row.update(sw.estimated(b))
        t["predict_s"] += time.perf_counter() - t0
        if adversarial:
            t0 = time.perf_counter()
            row.update(sw.adversarial(b, row["_cert"], broken if monotone else torch.zeros_like(broken), steps,
                                      shared=not over_budget))
            broken = row.pop("_broken")
            over_budget = over_budget or (monotone and max_accuracy_drop is not None and
                                          row["clean_accuracy"] - row["adversarial_accuracy"] > max_accuracy_drop + 1e-12)
            t["adversarial_s"] += time.perf_counter() - t0
        if verify:
            t0 = time.perf_counter()
            row.update(sw.measured(b, certs[b][0], qat_epochs, train))
            t["verify_s"] += time.perf_counter() - t0
        row.pop("_cert"), row.pop("_bound")
        rows[b] = row
        done += per_width
        say(done, f"{b} bits: certified accuracy {row['certified_accuracy']:.2%}"
            + (f", adversarial {row['adversarial_accuracy']:.2%}" if adversarial else "")
            + (f", Brevitas PTQ {row['measured_accuracy']:.2%}" if verify else ""))
    df = pd.DataFrame([rows[b] for b in sorted(rows)])
    df.insert(1, "spec", spec.label)
    df["paper_over_certified"] = df["bound_paper"] / df["certified_error"]
    return df, sw, t


def predict_quantization_error(model_or_net: Any, bits: int | Sequence[int] = BITS, data: Any = None, *,
                               per_channel: bool = False, symmetric: bool = True, act_bits: int | str | None = None,
                               input_domain=None, input_shape=None, adversarial: bool = False,
                               verify: bool = False, device=None) -> pd.DataFrame:
    """Predicted worst-case output error of quantizing the weights (and activations), per bit width.

    Columns ``bound_paper``/``bound_weights``/``bound_interval``: sound bounds on the largest change
    of any output over the whole input domain (theory 3.1, 4), in logits. With ``data`` (inputs,
    labels): ``certified_error`` (largest sound per-input bound on the test inputs),
    ``certified_accuracy`` (sound lower bound on the quantized accuracy), ``estimated_*`` (statistical
    estimate, no guarantee), and when asked ``adversarial_*`` (found by search) and ``measured_*``
    (Brevitas PTQ). ``device``: where the bounds are computed (``"cuda"`` for a GPU).
    """
    bits = [bits] if isinstance(bits, int) else list(bits)
    spec = QuantSpec(per_channel, symmetric, act_bits)
    module, net, x, y, calib = _inputs(model_or_net, data, input_domain, input_shape)
    if x is None:
        check(act_bits is None, "activation quantization needs data for calibration")
        p = Predictor(net, spec, device=device)
        rows = [{"bits": b, "spec": spec.label, **{f"bound_{k}": v for k, v in p.domain_bounds(b).items()},
                 "stored_bits": p.stored_bits(b)} for b in bits]
        return pd.DataFrame(rows)
    check(not verify or module is not None, "verification needs an nn.Module (Brevitas quantizes modules)")
    return sweep(module, net, x, y, calib, spec, bits, adversarial=adversarial, verify=verify, device=device)[0]
