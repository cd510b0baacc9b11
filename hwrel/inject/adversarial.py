"""Adversarial search for the worst faults: the measured lower end that bounds are judged by.

* :func:`worst_neuron_failures`: the worst set of ``f_l`` failed neurons per hidden layer (crash:
  transmits 0; Byzantine: any value ``|v| <= C``) and the worst input in the domain box. Greedy
  over sets (add the failure that increases the output error most over a pool of candidate
  inputs, Byzantine values tried at ``+-C``), then projected gradient ascent on the input (torch
  autograd through the faulty network, random restarts from a seeded generator; Byzantine values
  follow ``C * sign(gradient)``), two rounds.
* :func:`worst_weight_flips`: the worst ``k`` stored-bit flips of weights and biases, greedy: rank
  every (element, bit) by a first-order score ``|dF/dw| * |new - old|``, then re-evaluate the best
  candidates exactly and keep the worst.

Every reported ``max_abs_delta`` is *measured*: ``max_o |F_o(x) - F~_o(x)|`` of a float32 forward
of the faulty network at the returned input (a lower bound on the true worst case, never an
estimate of it). A certified bound below it is a soundness bug.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from hwrel.errors import check
from hwrel.formats import FloatFormat, IntFormat, flip, parse_format
from hwrel.network import Network

Failures = dict[int, tuple[Tensor, Tensor | None]]  # node -> (flat indices, values or None=crash)


@dataclass(frozen=True)
class AdversarialResult:
    """A measured worst case.

    ``failure_sets``: per hidden layer (in ``net.layers`` order) the flat neuron indices that fail;
    ``values``: per hidden layer the Byzantine values sent (empty for crash); ``x``: the input
    ``(1, *input_shape)`` attaining ``max_abs_delta`` (output units). For weight flips,
    ``flips`` lists ``(layer name, "weight"|"bias", flat index, bit)`` and ``failure_sets`` is empty.
    """

    max_abs_delta: float
    failure_sets: tuple[tuple[int, ...], ...]
    x: Tensor
    values: tuple[tuple[float, ...], ...] = ()
    flips: tuple[tuple[str, str, int, int], ...] = field(default=())


# --------------------------------------------------------------------------- faulty forward

def faulty_forward(net: Network, x: Tensor, failures: Failures) -> Tensor:
    """Output of ``net`` on ``x`` with act-node outputs overwritten: ``failures[node] = (idx,
    values)``, flat per-sample indices ``(m,)`` or per row ``(B, m)``; values broadcastable to
    ``(B, m)``, or None for crash (0). Exact: the same as writing the values into the activations
    of a copy and running forward."""
    return _resume(net, [], failures, 0, x)


def _fail(v: Tensor, failure: tuple[Tensor, Tensor | None]) -> Tensor:
    """``v`` with the failed flat positions of each sample overwritten (0 for crash)."""
    idx, fv = failure
    flat = v.reshape(v.shape[0], -1)
    idx = idx.to(torch.long).expand(flat.shape[0], idx.shape[-1])
    src = torch.zeros(idx.shape, dtype=flat.dtype) if fv is None else \
        torch.as_tensor(fv, dtype=flat.dtype).expand(idx.shape)
    return flat.scatter(1, idx, src).reshape(v.shape)


def _resume(net: Network, vals: list, failures: Failures, start: int, x: Tensor | None = None) -> Tensor:
    """Run nodes ``start..`` from the values ``vals[:start]`` (entries no later node reads may be
    None), applying ``failures`` on the way; the output node's value. The same operations, node by
    node, as a forward from the input: a failure never changes the nodes before it."""
    vals = list(vals)
    for i in range(start, len(net.nodes)):
        node = net.nodes[i]
        v = x if node.op == "input" else node.apply([vals[j] for j in node.inputs])
        if i in failures:
            v = _fail(v, failures[i])
        vals.append(v)
    return vals[-1]


def _prefix(net: Network, x: Tensor, failures: Failures, upto: int) -> list:
    """Node values ``0..upto`` on ``x`` with ``failures`` of the earlier nodes applied (node ``upto``
    itself unfailed); values that no node after ``upto`` reads are dropped (None)."""
    read_later = {j for node in net.nodes[upto + 1:] for j in node.inputs}
    vals: list = []
    for i in range(upto + 1):
        node = net.nodes[i]
        v = x if node.op == "input" else node.apply([vals[j] for j in node.inputs])
        if i in failures and i < upto:
            v = _fail(v, failures[i])
        vals.append(v)
    return [v if (j in read_later or j == upto) else None for j, v in enumerate(vals)]


def _delta(ref: Tensor, out: Tensor) -> Tensor:
    """Per-sample ``max_o |out - ref|``; non-finite outputs count as ``inf``."""
    d = (out - ref).abs().reshape(out.shape[0], -1)
    d = torch.where(torch.isfinite(out.reshape(d.shape)), d, torch.full_like(d, float("inf")))
    return d.amax(1)


def _box(net: Network) -> tuple[Tensor, Tensor]:
    return net.input_lo.float()[None], net.input_hi.float()[None]


def _pool(net: Network, inputs: Tensor | None, n_random: int, g: torch.Generator) -> Tensor:
    lo, hi = _box(net)
    rand = lo + (hi - lo) * torch.rand(n_random, *net.input_shape, generator=g)
    parts = [rand, (lo + hi) / 2]
    if inputs is not None:
        xs = torch.as_tensor(inputs).float().reshape(-1, *net.input_shape)
        parts.insert(0, torch.minimum(torch.maximum(xs, lo), hi))
    return torch.cat(parts)


def _check_failures(net: Network, failures: Sequence[int]) -> list[int]:
    check(not isinstance(failures, (str, int)) and len(failures) == len(net.layers),
          f"failures must list one count per hidden layer ({len(net.layers)}), got {failures!r}")
    out = []
    for k, (f, size) in enumerate(zip(failures, net.layer_sizes())):
        ok = isinstance(f, int) and not isinstance(f, bool) and 0 <= f <= size
        check(ok, f"failures[{k}] = {f!r}: expected an integer in 0..{size} (layer {net.layer_names()[k]})")
        out.append(int(f))
    return out


# --------------------------------------------------------------------------- neuron failures

Sets = dict[int, list[int]]  # node -> failed flat indices
Values = dict[int, Tensor]  # node -> Byzantine values, (m,) or per row (B, m)


class _NeuronSearch:
    def __init__(self, net: Network, fault: str, capacity: float | None, screen: int = 0):
        self.net, self.fault, self.screen = net.to(torch.float32), fault, screen
        self.c = float(capacity) if capacity is not None else 0.0

    def fails(self, sets: Sets, values: Values) -> Failures:
        return {n: (torch.tensor(s, dtype=torch.long), None if self.fault == "crash" else values[n])
                for n, s in sets.items() if s}

    @torch.no_grad()
    def errors(self, x: Tensor, sets: Sets, values: Values) -> Tensor:
        return _delta(self.net.forward(x), faulty_forward(self.net, x, self.fails(sets, values)))

    @torch.no_grad()
    def greedy(self, pool: Tensor, budget: dict[int, int]) -> tuple[Sets, Values]:
        """Add, one at a time, the failure (and Byzantine value +-C) maximising the pool error."""
        sets: Sets = {n: [] for n in budget}
        values: Values = {n: torch.zeros(0) for n in budget}
        ref = self.net.forward(pool)
        choices = (0.0,) if self.fault == "crash" else (self.c, -self.c)
        for _ in range(sum(budget.values())):
            best = (-1.0, -1, -1, 0.0)
            for node, f in budget.items():
                if len(sets[node]) >= f:
                    continue
                taken = set(sets[node])
                cand = torch.tensor([j for j in range(self.net.nodes[node].size) if j not in taken])
                for v in choices:
                    cv = self._screen(pool, sets, values, node, cand, v)
                    err = self._try(pool, ref, sets, values, node, cv, v)
                    k = int(err.argmax())
                    if float(err[k]) > best[0]:
                        best = (float(err[k]), node, int(cv[k]), v)
            _, node, j, v = best
            sets[node].append(j)
            values[node] = torch.cat([values[node], torch.tensor([v])])
        return sets, values

    def _try(self, pool: Tensor, ref: Tensor, sets: Sets, values: Values, node: int,
             cand: Tensor, v: float) -> Tensor:
        """Per candidate neuron of ``node``: max pool error with it failed on top of ``sets``.
        The nodes before ``node`` run once on the pool, not once per candidate."""
        out = torch.empty(len(cand))
        fails = self.fails(sets, values)
        fails.pop(node, None)
        pre = _prefix(self.net, pool, fails, node)
        shared = torch.tensor(sets[node], dtype=torch.long)
        fv = None if self.fault == "crash" else torch.cat([values[node], torch.tensor([v])])
        p = len(pool)
        per = max(1, 16384 // p)
        for a in range(0, len(cand), per):
            cc = cand[a:a + per]
            m = len(cc)
            vals = [None if t is None else t.repeat(m, *([1] * (t.dim() - 1))) for t in pre]
            idx = torch.cat([shared.expand(m * p, -1), cc.repeat_interleave(p)[:, None]], 1)
            vals[node] = _fail(vals[node], (idx, fv))
            err = _delta(ref.repeat(m, *([1] * (ref.dim() - 1))), _resume(self.net, vals, fails, node + 1))
            out[a:a + m] = err.reshape(m, p).amax(1)
        return out

    def _screen(self, pool: Tensor, sets: Sets, values: Values, node: int, cand: Tensor, v: float) -> Tensor:
        """At most ``self.screen`` of the candidate neurons, those whose failure (to value ``v``)
        moves an output most to first order (``max |dF_o/da_j| * |v - a_j|`` over the pool); all
        of them when there are not more. A heuristic ranking only: the kept ones are evaluated
        exactly by :meth:`_try`."""
        if self.screen <= 0 or len(cand) <= self.screen:
            return cand
        fails = self.fails(sets, values)
        pre = _prefix(self.net, pool, fails, node)
        with torch.enable_grad():
            a = (_fail(pre[node], fails[node]) if node in fails else pre[node]).detach().requires_grad_(True)
            vals = list(pre)
            vals[node] = a
            out = _resume(self.net, vals, fails, node + 1).reshape(len(pool), -1)
            n_out = out.shape[1]
            # one backward per output; for wide outputs, seeded random sign projections instead
            dirs = torch.eye(n_out) if n_out <= 32 else \
                torch.randint(0, 2, (16, n_out), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
            delta = (v - a.detach().reshape(len(pool), -1)).abs()
            score = torch.zeros(delta.shape[1])
            for k, d in enumerate(dirs):
                (g,) = torch.autograd.grad((out * d).sum(), a, retain_graph=k < len(dirs) - 1)
                score = torch.maximum(score, (g.reshape(len(pool), -1).abs() * delta).amax(0))
        keep = score[cand].topk(self.screen).indices.sort().values
        return cand[keep]

    @torch.no_grad()
    def improve(self, pool: Tensor, sets: Sets, values: Values, passes: int = 3) -> tuple[Sets, Values]:
        """Swap local search: replace one failed neuron (and its value) by the best other neuron
        of its layer while that raises the pool error."""
        ref = self.net.forward(pool)
        sets = {n: list(s) for n, s in sets.items()}
        values = {n: v.clone() for n, v in values.items()}
        cur = float(self.errors(pool, sets, values).max()) if any(sets.values()) else 0.0
        choices = (0.0,) if self.fault == "crash" else (self.c, -self.c)
        for _ in range(passes):
            changed = False
            for node in sets:
                for p in range(len(sets[node])):
                    rest = sets[node][:p] + sets[node][p + 1:]
                    rest_v = torch.cat([values[node][:p], values[node][p + 1:]])
                    taken = set(rest)
                    cand = torch.tensor([j for j in range(self.net.nodes[node].size) if j not in taken])
                    s2, v2 = {**sets, node: rest}, {**values, node: rest_v}
                    for v in choices:
                        cv = self._screen(pool, s2, v2, node, cand, v)
                        err = self._try(pool, ref, s2, v2, node, cv, v)
                        k = int(err.argmax())
                        if float(err[k]) > cur * (1 + 1e-6):
                            cur = float(err[k])
                            sets[node] = rest[:p] + [int(cv[k])] + rest[p:]
                            values[node] = torch.cat([rest_v[:p], torch.tensor([v]), rest_v[p:]])
                            changed = True
                            break
            if not changed:
                break
        return sets, values

    def random_set(self, budget: dict[int, int], g: torch.Generator) -> tuple[Sets, Values]:
        sets = {n: torch.randperm(self.net.nodes[n].size, generator=g)[:f].tolist() for n, f in budget.items()}
        values = {n: self.c * (2 * torch.randint(0, 2, (f,), generator=g).float() - 1)
                  for n, f in budget.items()}
        return sets, values

    def ascend(self, starts: Tensor, sets: Sets, values: Values, steps: int) -> tuple[Tensor, Values]:
        """Projected sign-gradient ascent of the error over the input box, per start; Byzantine
        values (per start) are reset to ``C * sign(d error / d value)`` each step."""
        lo, hi = _box(self.net)
        x = starts.clone()
        vals = {n: values[n].expand(len(x), -1).clone() for n in sets if sets[n]} \
            if self.fault == "byzantine" else {}
        for t in range(steps):
            x.requires_grad_(True)
            for v in vals.values():
                v.requires_grad_(True)
            with torch.enable_grad():
                err = _delta(self.net.forward(x), faulty_forward(self.net, x, self.fails(sets, vals)))
                grads = torch.autograd.grad(err.sum(), [x, *vals.values()], allow_unused=True)
            with torch.no_grad():
                step = (0.1 * (1.0 - t / steps) + 0.002) * (hi - lo)
                gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
                x = torch.minimum(torch.maximum(x + step * gx.sign(), lo), hi).detach()
                new = {}
                for (n, v), gv in zip(vals.items(), grads[1:]):
                    s = torch.zeros_like(v) if gv is None else gv.sign()
                    new[n] = torch.where(s == 0, v, self.c * s).detach()
                vals = new
        return x.detach(), vals


def worst_neuron_failures(net: Network, failures: Sequence[int], fault: str = "crash",
                          capacity: float | None = None, inputs: Tensor | None = None,
                          steps: int = 50, restarts: int = 8, pool_size: int = 64,
                          seed: int = 0, screen: int = 256,
                          progress: Callable[[float, str], None] | None = None) -> AdversarialResult:
    """Measured worst output error for ``failures[l]`` failed neurons in hidden layer ``l``.

    Heuristic search, two rounds of: candidate sets (greedy over a pool of inputs, plus
    ``restarts`` seeded random sets), each refined by swap local search, then gradient ascent on
    the input from seeded restarts (the ascended inputs join the pool); the returned ``max_abs_delta`` is re-measured exactly at ``x``
    with ``failure_sets`` (and ``values``), in float32: a lower bound on the true worst case over
    the input box. ``inputs`` are extra candidate inputs (clamped to the box). Byzantine faults
    need ``capacity`` (``|v| <= C``). ``screen``: in a layer with more neurons than this, each
    greedy or swap step evaluates exactly only the ``screen`` candidates that a first-order
    estimate ranks highest (0: every neuron; the cost of a step grows with the candidates).
    ``progress(fraction, message)`` is called after every candidate set and every ascent (the
    fraction of the search done, an estimate); it does not change the search.
    """
    check(isinstance(net, Network), f"expected a hwrel Network, got {type(net).__name__}")
    check(fault in ("crash", "byzantine"), f"unknown neuron fault {fault!r}: use crash or byzantine")
    if fault == "byzantine":
        ok = isinstance(capacity, (int, float)) and not isinstance(capacity, bool)
        check(ok and 0 <= capacity < float("inf"), f"Byzantine faults need a finite capacity C >= 0, "
              f"got {capacity!r}")
    for name, v in (("steps", steps), ("restarts", restarts), ("pool_size", pool_size), ("seed", seed)):
        check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an integer >= 0")
    counts = _check_failures(net, failures)
    g = torch.Generator().manual_seed(seed)
    check(isinstance(screen, int) and not isinstance(screen, bool) and screen >= 0, "screen must be an integer >= 0")
    search = _NeuronSearch(net, fault, capacity, screen)
    lo, hi = _box(search.net)
    budget = {n: f for n, f in zip(net.layers, counts) if f > 0}
    pool = _pool(search.net, inputs, pool_size, g)
    best: tuple[float, Sets, Values, Tensor] = (-1.0, {}, {}, pool[:1])
    rounds = 2 if budget else 1
    asc = max(1, restarts // 2) if budget and steps else 0
    per_round, done = 1 + restarts + asc, [0]

    def said(what: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(min(1.0, done[0] / (rounds * per_round)), f"adversarial search: {what}")

    for rnd in range(rounds):
        # Candidate sets: greedy, then seeded random sets; each refined by swap local search.
        cands = [search.greedy(pool, budget)] + [search.random_set(budget, g) for _ in range(restarts)]
        scored = []
        for sets, values in cands:
            sets, values = search.improve(pool, sets, values) if budget else (sets, values)
            err = search.errors(pool, sets, values)
            scored.append((float(err.max()), sets, values, err))
            k = int(err.argmax())
            if float(err[k]) > best[0]:
                best = (float(err[k]), sets, values, pool[k:k + 1])
            said(f"round {rnd + 1} of {rounds}, candidate set {len(scored)} of {len(cands)}")
        if not budget or not steps:
            break
        new_x = []
        for _, sets, values, err in sorted(scored, key=lambda t: -t[0])[:max(1, restarts // 2)]:
            # restarts=0: the ascent still starts from the pool's worst input (never from nothing)
            starts = torch.cat([pool[err.argsort(descending=True)[:max(1, restarts)]],
                                lo + (hi - lo) * torch.rand(restarts, *net.input_shape, generator=g)])
            xs, vals = search.ascend(starts, sets, values, steps)
            for r in range(len(xs)):
                row = {**values, **{n: v[r] for n, v in vals.items()}}
                e = float(search.errors(xs[r:r + 1], sets, row))
                if e > best[0]:
                    best = (e, sets, row, xs[r:r + 1])
            new_x.append(xs)
            said(f"round {rnd + 1} of {rounds}, input ascent {len(new_x)}")
        pool = torch.cat([pool, *new_x])  # second round: search again over the enriched pool
    _, sets, values, x = best
    fsets = tuple(tuple(sets.get(n, [])) for n in net.layers)
    fvals = tuple(tuple(float(v) for v in values[n]) if fault == "byzantine" and sets.get(n) else ()
                  for n in net.layers)
    # Re-measure the reported configuration from scratch: this is what bounds are compared with.
    fails = {n: (torch.tensor(s, dtype=torch.long), None if fault == "crash" else torch.tensor(fv))
             for n, s, fv in zip(net.layers, fsets, fvals) if s}
    with torch.no_grad():
        measured = float(_delta(search.net.forward(x), faulty_forward(search.net, x, fails))[0])
    return AdversarialResult(measured, fsets, x.detach().clone(), fvals)


# --------------------------------------------------------------------------- weight bit flips

def _stored(net: Network, node: int, site: str, fmt: FloatFormat | IntFormat):
    """(stored values, to_real(new_stored) -> real tensor, format) of a weight or bias."""
    a = net.nodes[node].affine
    if site == "weight" and a.codes is not None:
        f = IntFormat(int(a.bit_width), bool(a.signed))
        shape = (-1,) + (1,) * (a.codes.dim() - 1)
        scale = a.scale.float().reshape(shape) if a.scale.numel() > 1 else a.scale.float().reshape(())
        zp = a.zero_point.float().reshape(shape) if a.zero_point.numel() > 1 else a.zero_point.float().reshape(())
        return a.codes, (lambda c: scale * (c.float() - zp)), f
    t = a.weight if site == "weight" else a.bias
    f = fmt if isinstance(fmt, FloatFormat) else parse_format("fp32")
    return t.float().to(f.torch_dtype).float(), (lambda v: v.float()), f


def worst_weight_flips(net: Network, k: int = 1, format: str = "fp32", inputs: Tensor | None = None,
                       candidates: int = 64, pool_size: int = 32, seed: int = 0) -> AdversarialResult:
    """Measured worst output error of ``k`` stored-bit flips in weights and biases.

    Float weights are stored in ``format`` (the nominal network is the one with weights rounded to
    it); integer-coded weights flip their codes with the scale held fixed. Greedy: at each of
    ``k`` steps, score every (element, bit) by ``max_o |dF_o/dw| * |new - old|`` summed over the
    pool, then evaluate the ``candidates`` best exactly and keep the worst. ``max_abs_delta`` is
    measured at ``x`` (``inf`` if an output becomes non-finite).
    """
    check(isinstance(net, Network), f"expected a hwrel Network, got {type(net).__name__}")
    check(isinstance(k, int) and not isinstance(k, bool) and k >= 1, f"k must be an integer >= 1, got {k!r}")
    fmt = parse_format(format)
    g = torch.Generator().manual_seed(seed)
    net32 = net.to(torch.float32)
    pool = _pool(net32, inputs, pool_size, g)
    tensors = {}  # (node, site) -> [stored, to_real, fmt]
    for n in net32.synapse_layers:
        for site in ("weight", "bias"):
            if site == "bias" and net32.nodes[n].affine.bias is None:
                continue
            tensors[(n, site)] = _stored(net32, n, site, fmt)
    nominal = {key: to_real(st) for key, (st, to_real, _) in tensors.items()}

    def forward(x: Tensor, params: dict) -> Tensor:
        vals: list[Tensor] = []
        for i, node in enumerate(net32.nodes):
            if node.op == "input":
                vals.append(x)
            elif node.op == "affine":
                vals.append(node.affine(vals[node.inputs[0]], params[(i, "weight")], params.get((i, "bias"))))
            else:
                vals.append(node.apply([vals[j] for j in node.inputs]))
        return vals[-1]

    ref = forward(pool, nominal).detach()
    current = {key: st.clone() for key, (st, _, _) in tensors.items()}
    flips: list[tuple[str, str, int, int]] = []
    for _ in range(k):
        params = {key: tensors[key][1](current[key]).detach().requires_grad_(True) for key in tensors}
        out = forward(pool, params)
        sens = {key: torch.zeros_like(p) for key, p in params.items()}
        for o in range(out.reshape(len(pool), -1).shape[1]):
            grads = torch.autograd.grad(out.reshape(len(pool), -1)[:, o].sum(), list(params.values()),
                                        retain_graph=True)
            for key, gr in zip(params, grads):
                sens[key] = torch.maximum(sens[key], gr.abs())
        scored = []
        for key, (_, to_real, f) in tensors.items():
            st = current[key]
            old = to_real(st)
            for b in range(f.bits):
                new = to_real(flip(f, st, b))
                d = (new - old).abs()
                d = torch.where(torch.isfinite(d), d, torch.full_like(d, float("inf")))
                s = (sens[key] * d).reshape(-1)
                s = torch.where(torch.isnan(s), torch.full_like(s, float("inf")), s)
                top = s.topk(min(candidates, s.numel()))
                scored += [(float(v), key, int(i), b) for v, i in zip(top.values, top.indices)]
        scored.sort(key=lambda t: -t[0])
        best = (-1.0, None)
        with torch.no_grad():
            for _, key, i, b in scored[:candidates]:
                trial = current[key].clone()
                flat = trial.view(-1)
                flat[i] = flip(tensors[key][2], flat[i], b)
                params = {kk: tensors[kk][1](trial if kk == key else current[kk]) for kk in tensors}
                e = float(_delta(ref, forward(pool, params)).max())
                if e > best[0]:
                    best = (e, (key, i, b, trial))
        key, i, b, trial = best[1]
        current[key] = trial
        flips.append((net32.nodes[key[0]].name, key[1], i, b))
    with torch.no_grad():
        params = {kk: tensors[kk][1](current[kk]) for kk in tensors}
        errs = _delta(ref, forward(pool, params))
    j = int(errs.argmax())
    return AdversarialResult(float(errs[j]), (), pool[j:j + 1].clone(), (), tuple(flips))
