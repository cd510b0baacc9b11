"""Certified weight bit width on general graphs (ViTs, LLaMA-style LMs): rounding as a bounded
perturbation through the graph bounds.

Per width, every Linear/Conv2d weight that :func:`rounded_weights` lists may move by up to half a
quantization step (:func:`hwrel.quantize.rounding.weight_radius`, per-channel symmetric codes, the
scales Brevitas computes), and :func:`hwrel.bounds.graph.graph_bound` bounds each output's change
on each test input (the quantized model's float32 forward against the float model's). From those
bounds: the inputs (token positions, for a language model) whose top-1 provably stays, the
certified accuracy, and the smallest width whose certified accuracy drop stays within a budget.
Sound on each test input; not over the input domain, where these bounds are vacuous.
"""
from __future__ import annotations

import copy
from operator import attrgetter
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.quantize.rounding import QuantSpec, weight_radius

PER_CHANNEL = QuantSpec(per_channel=True, symmetric=True)


def rounded_weights(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full name, module, parameter name) of every Linear/Conv weight, attention input projection
    and, in an exported program, every ``linear`` / ``addmm`` weight (GPT-2's ``Conv1D``): the tensors
    weight quantization rounds (every other parameter stays float). A weight that is also read as
    something else (an output layer tied to the embedding table, as GPT-2's is) stays float: rounding
    it would move the embedding too, which no rule bounds."""
    return [(n, m, p) for n, m, p, _ in _rounded(module)]


def _rounded(module: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """:func:`rounded_weights` with, per weight, whether it is stored (in, out) (``addmm``'s layout)."""
    out: list[tuple[str, nn.Module, str, bool]] = []
    if isinstance(module, torch.fx.GraphModule):  # an exported program: weights are graph constants
        reads: dict[int, list[torch.fx.Node]] = {}  # id(tensor) -> every node that reads it
        for n in module.graph.nodes:
            if n.op == "get_attr":
                reads.setdefault(id(attrgetter(str(n.target))(module)), []).extend(n.users)
        seen: set[int] = set()
        for n in module.graph.nodes:
            w = _weight_arg(n)
            if w is None or w.op != "get_attr":
                continue
            t = attrgetter(str(w.target))(module)
            if id(t) in seen or not all(_reads_as_weight(module, u, t) for u in reads[id(t)]):
                continue
            seen.add(id(t))
            owner, _, attr = str(w.target).rpartition(".")
            out.append((str(w.target), module.get_submodule(owner) if owner else module, attr,
                        n.target in _ADDMM))
    readers: dict[int, int] = {}  # id(parameter) -> how many modules own it
    for m in module.modules():
        for p in m.parameters(recurse=False):
            readers[id(p)] = readers.get(id(p), 0) + 1
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            params = ["weight"]
        elif isinstance(m, nn.MultiheadAttention):
            params = [p for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                      if getattr(m, p, None) is not None]
        else:
            continue
        out += [(f"{name}.{p}" if name else p, m, p, False) for p in params if readers[id(getattr(m, p))] == 1]
    return out


_LINEAR = (torch.ops.aten.linear.default, torch.nn.functional.linear)
_ADDMM = (torch.ops.aten.addmm.default, torch.addmm)


def _weight_arg(n: torch.fx.Node) -> torch.fx.Node | None:
    """The weight node of a ``linear`` (``(x, W, b)``) or a plain ``addmm`` (``(b, x, W)``) node."""
    if n.op == "call_function" and n.target in _LINEAR:
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    elif n.op == "call_function" and n.target in _ADDMM and len(n.args) == 3 and not n.kwargs:
        w = n.args[2]
    else:
        return None
    return w if isinstance(w, torch.fx.Node) else None


def _reads_as_weight(module: torch.fx.GraphModule, n: torch.fx.Node, t: Tensor) -> bool:
    """Whether node ``n`` reads tensor ``t`` only as its ``linear`` / ``addmm`` weight, once."""
    w = _weight_arg(n)
    if w is None or w.op != "get_attr" or attrgetter(str(w.target))(module) is not t:
        return False
    return sum(isinstance(a, torch.fx.Node) and a.op == "get_attr" and attrgetter(str(a.target))(module) is t
               for a in [*n.args, *n.kwargs.values()]) == 1  # not also its input or bias


def _per_output_channel(w: Tensor, transposed: bool, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` (a per-channel map along dim 0) on the output channels of a weight stored (out, in) or,
    ``transposed``, (in, out)."""
    return fn(w.t()).t() if transposed else fn(w)


def round_weights(module: nn.Module, bits: int) -> nn.Module:
    """A copy of ``module`` whose rounded weights (:func:`rounded_weights`) are rounded to ``bits``-bit
    per-channel symmetric codes (:func:`hwrel.quantize.rounding.weight_storage`, one scale per output
    channel), dequantized; every other parameter, and the activations, stay float. The module itself
    is not changed."""
    from hwrel.quantize.rounding import weight_storage

    q = copy.deepcopy(module).eval()
    with torch.no_grad():
        for _, m, p, tr in _rounded(q):
            w = getattr(m, p)
            rounded = _per_output_channel(
                w.detach().float(), tr, lambda t: weight_storage(t.contiguous(), bits, PER_CHANNEL).dequantize())
            w.copy_(rounded.to(w.dtype))
    return q


def weight_radii(module: nn.Module, bits: int, spec: QuantSpec = PER_CHANNEL) -> dict[str, Tensor]:
    """Per rounded weight (:func:`rounded_weights`), the sound elementwise bound on its rounding
    error at ``bits`` (float64, the weight's units, the weight's own layout)."""
    return {name: _per_output_channel(getattr(m, p).detach().float(), tr,
                                      lambda t: weight_radius(t.contiguous(), bits, spec).expand_as(t))
            for name, m, p, tr in _rounded(module)}


@dataclass(frozen=True)
class GraphBitwidth:
    """:func:`graph_bitwidth`'s result. ``table``: per width, ``bound_max`` / ``bound_median`` over
    the inputs of the largest output change (output units), ``certified_fraction`` (inputs, or
    token positions, whose top-1 provably stays), ``certified_accuracy`` (with labels: provably kept
    and correct), ``meets_budget_certified``; below a width that certifies nothing, the narrower
    widths are not evaluated (bounds NaN, certified 0). ``certified_bits``: the smallest swept width from
    which every wider swept width meets the budget (None if none does). ``metric``: what the
    accuracy counts (``"class"``, ``"next-token"``, or ``"agreement"`` without labels)."""

    table: pd.DataFrame
    certified_bits: int | None
    clean_accuracy: float
    max_accuracy_drop: float
    metric: str
    quantized: tuple[str, ...]


def _certified(logits: Tensor, bound: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per input (or position): certified flag, and certified-and-correct flag (the flag again
    without labels). ``logits`` ``(B, C)`` or ``(B, T, V)``; ``bound`` the same elements flattened."""
    from hwrel.bounds.certify import certified_from_bounds

    flat = logits.reshape(-1, logits.shape[-1])
    pred, cert = certified_from_bounds(flat, bound.reshape(flat.shape))
    if logits.dim() == 3:
        pred, cert = pred.reshape(logits.shape[:2]), cert.reshape(logits.shape[:2])
        if y is not None:  # next token: positions 0..T-2 against the (B, T - 1) targets
            return cert[:, :-1].flatten(), (cert[:, :-1] & (pred[:, :-1] == y)).flatten()
        return cert.flatten(), cert.flatten()
    return cert, cert if y is None else cert & (pred == y)


@torch.no_grad()
def graph_bitwidth(module: nn.Module, x: Tensor, y: Tensor | None = None, *, bits: Sequence[int] = (4, 6, 8, 10, 12, 16),
                   max_accuracy_drop: float = 0.01, batch: int = 64, verify: bool = True,
                   progress: Callable[[float, str], None] | None = None) -> GraphBitwidth:
    """Certified accuracy per weight width of a general graph, sound on each test input ``x``.

    ``y``: class labels ``(B,)``, next-token targets ``(B, T - 1)`` for a language model's
    ``(B, T, V)`` logits, or None (top-1 agreement with the float model). Raises
    :class:`UnsupportedLayerError` where the graph bounds have no rule for an operation or a
    rounded weight. ``verify``: inject the rounding (:func:`round_weights`) at every evaluated width
    and count the outputs beyond their bound (NaN where the width was not evaluated)."""
    from hwrel.bounds.graph import graph_bound, trace
    from hwrel.inject.general_sites import plain_forward

    if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, (int, float)) \
            or not 0 <= max_accuracy_drop < 1:
        raise HwrelError(f"max_accuracy_drop must be a fraction in [0, 1), got {max_accuracy_drop!r}")
    widths = sorted({int(b) for b in bits})
    if not widths:
        raise HwrelError("no bit widths to sweep")
    if not rounded_weights(module):
        raise HwrelError("the model has no Linear or Conv weight to round: a certified width would certify nothing")
    gm = trace(module)
    batches = [(x[s:s + batch], None if y is None else y[s:s + batch]) for s in range(0, x.shape[0], batch)]
    with plain_forward():
        clean = [gm(xb).double() for xb, _ in batches]
    if clean[0].dim() not in (2, 3):
        raise UnsupportedLayerError(f"certified bit width needs class or next-token logits; the model outputs "
                                    f"{tuple(clean[0].shape[1:])} per input")
    metric = "agreement" if y is None else "next-token" if clean[0].dim() == 3 else "class"
    zero = [_certified(c, torch.zeros(c.numel() // c.shape[0] * c.shape[0], dtype=torch.float64), yb)[1]
            for c, (_, yb) in zip(clean, batches)]
    acc0 = float(torch.cat(zero).double().mean()) if y is not None else 1.0
    say = progress or (lambda f, m: None)
    rows = []
    for i, b in enumerate(sorted(widths, reverse=True)):
        if rows and rows[-1]["certified_fraction"] == 0.0:
            # nothing certified one width up: the radii only grow as the width falls, so 0 (a sound
            # lower end of the accuracy) is recorded without the evaluation
            rows.append({"bits": b, "bound_max": float("nan"), "bound_median": float("nan"), "certified_fraction": 0.0,
                         "certified_accuracy": 0.0, "meets_budget_certified": acc0 <= max_accuracy_drop + 1e-12,
                         **({"measured_max": float("nan"), "violations": float("nan")} if verify else {})})
            continue
        say(i / len(widths), f"certified bit width: {b} bits ({i + 1} of {len(widths)}), {x.shape[0]} inputs")
        radii = weight_radii(module, b)
        q = round_weights(module, b) if verify else None
        per, cert, good = [], [], []
        worst, bad = 0.0, 0
        for c, (xb, yb) in zip(clean, batches):
            bound = graph_bound(gm, {}, lo=xb, weight_radius=radii).bound
            per.append(bound.amax(1))
            k, g = _certified(c, bound, yb)
            cert.append(k)
            good.append(g)
            if q is not None:
                with plain_forward():
                    d = (q(xb).double() - c).abs().flatten(1)
                worst, bad = max(worst, float(d.max())), bad + int((d > bound).sum())
        per_t = torch.cat(per)
        acc = float(torch.cat(good).double().mean())
        rows.append({"bits": b, "bound_max": float(per_t.max()), "bound_median": float(per_t.median()),
                     "certified_fraction": float(torch.cat(cert).double().mean()), "certified_accuracy": acc,
                     "meets_budget_certified": acc0 - acc <= max_accuracy_drop + 1e-12,
                     **({"measured_max": worst, "violations": bad} if verify else {})})
    say(1.0, "certified bit width: done")
    table = pd.DataFrame(rows).sort_values("bits").reset_index(drop=True)
    meets = table["meets_budget_certified"].to_numpy()
    good_w = [int(table["bits"][i]) for i in range(len(table)) if meets[i:].all()]
    return GraphBitwidth(table, good_w[0] if good_w else None, acc0, float(max_accuracy_drop), metric,
                         tuple(n for n, _, _ in rounded_weights(module)))
