"""``hwrel inject``: a resumable, shardable fault-injection campaign with a summary of rates."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hwrel.cli.common import add_model_args, check_writable, load, model_info
from hwrel.errors import HwrelError, check
from hwrel.formats import IntFormat, IntStorage, parse_format
from hwrel.network import Network

DESCRIPTION = """\
Inject faults into MODEL (a built-in name, see 'hwrel models', or a model file) and measure, per
fault configuration, the output change (and, with labels, the accuracy) on the test inputs: --data,
or a built-in model's test split, or else seeded random inputs in the domain. Bit faults (bitflip, stuck0, stuck1) hit the stored bits of weights
and biases in --format; crash and byzantine hit neurons of hidden layers. Results go to --out (a
folder of Parquet chunks, or one .parquet file) as the campaign runs: run the same command again
to continue after an interruption. With --format intB a float model is quantized first: with
Brevitas post-training quantization (hwrel.quantize.ptq, calibrated on a built-in model's training
data or on --calibration, default the test data) when available, otherwise per-tensor symmetric round-to-nearest integer codes of every weight
(biases stay fp32). A model the fast engine has no rule for (attention, LayerNorm, embeddings,
Hardswish, ...) runs on the exact general path: bit faults in every parameter (--layer names one,
e.g. blocks.0.norm1.weight), crash/byzantine faults at every module output and at every operation
of its torch.fx trace (--layer fx:softmax); the output says which path ran."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inject", help="run a fault-injection campaign", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--fault", default="bitflip",
                   help="bitflip | stuck0 | stuck1 | crash | byzantine (default bitflip)")
    p.add_argument("--format", default="fp32", help="storage format: int8, int4, fp32, fp16, bf16, "
                   "fp8_e4m3, fp8_e5m2, ... (default fp32)")
    p.add_argument("--count", default=None, metavar="N", help="number of random configurations "
                   "(with --ber: number of trials, default 100)")
    p.add_argument("--ber", default=None, metavar="P", help="bit-error rate in [0, 1]: every stored "
                   "bit flips independently with probability P in each configuration")
    p.add_argument("--exhaustive", action="store_true", help="one configuration per site "
                   "(restrict with --layer and --bit); with --fault bitflip the certified bit map: "
                   "every bit of every stored weight and bias, masked or SDC, sites a sound bound "
                   "proves masked are not injected (--out FILE.parquet or .csv)")
    p.add_argument("--layer", default=None, help="only this layer (node name)")
    p.add_argument("--bit", default=None, metavar="K", help="only bit position K")
    p.add_argument("--site", action="append", default=None, choices=["weight", "bias", "neuron", "synapse"],
                   help="fault sites (repeatable; default weight and bias for bit faults, neuron "
                   "otherwise)")
    p.add_argument("--capacity", default=None, metavar="C", help="Byzantine values lie in [-C, C]")
    p.add_argument("--seed", default="0", help="sampling seed (default 0)")
    p.add_argument("--out", default=None, help="results folder, or a file ending in .parquet")
    p.add_argument("--shard", default=None, metavar="i/n", help="run only shard i of n")
    p.add_argument("--chunk-size", default="auto", help="configurations per chunk, the unit of "
                   "writing and resuming (default auto: chosen by the engine for the model, the "
                   "inputs and the campaign size, see hwrel.inject.engine.campaign_chunk)")
    p.add_argument("--inputs", default="256", metavar="B", help="test inputs to evaluate on "
                   "(default 256)")
    p.add_argument("--range-limit", default=None, metavar="R", help="restrict stored weights to "
                   "[-R, R] (NaN -> 0), as a deployed protection would")
    p.add_argument("--confidence", default="0.95", help="confidence of the intervals (default 0.95)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from hwrel.inject.executors import add_executor_args

    add_executor_args(p)
    p.set_defaults(func=run)


def _num(text: str | None, what: str, kind: type = float) -> Any:
    if text is None:
        return None
    try:
        v = kind(text)
    except ValueError:
        raise HwrelError(f"{what} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    check(kind is int or math.isfinite(v), f"{what} must be finite, got {text!r}")
    return v


def quantize_network(net: Network, fmt: IntFormat) -> Network:
    """Integer codes for every float weight: per-tensor symmetric round to nearest
    (:meth:`IntStorage.from_float`), scale fixed; ``|w - w_q| <= scale / 2``. Biases unchanged."""
    nodes = list(net.nodes)
    for i in net.synapse_layers:
        a = nodes[i].affine
        if a.codes is not None:
            continue
        st = IntStorage.from_float(a.weight, fmt)
        aff = replace(a, weight=st.dequantize().to(a.weight.dtype), codes=st.codes, scale=st.scale.float(),
                      zero_point=st.zero_point.float(), bit_width=fmt.bits, signed=fmt.signed)
        nodes[i] = replace(nodes[i], affine=aff)
    return replace(net, nodes=tuple(nodes))


def _model(args: argparse.Namespace, fmt: Any) -> tuple[Any, torch.Tensor, torch.Tensor | None, str, Any]:
    from hwrel.inject.target import GeneralModel, as_target

    n_inputs = _num(args.inputs, "--inputs", int)
    check(n_inputs > 0, f"--inputs must be a positive integer, got {args.inputs!r}")
    md = load(args)
    # the fast engine where it has a rule for every operation, else the exact general path
    net = as_target(md.module, md.input_domain, md.input_shape)
    how = "native"  # float weights in --format, or the model's own integer codes
    if isinstance(net, GeneralModel):
        how = "int-codes" if isinstance(fmt, IntFormat) else how
    elif isinstance(fmt, IntFormat) and any(net.nodes[i].affine.codes is None for i in net.synapse_layers):
        net, how = _quantize(md, net, fmt)
    if md.x is not None:
        x, y = md.x[:n_inputs], (md.y[:n_inputs] if md.y is not None else None)
    else:
        check(md.input_shape is not None or not isinstance(net, GeneralModel),
              f"model {md.name}: give --data (test inputs) or --input-shape for random inputs")
        shape = tuple(md.input_shape) if isinstance(net, GeneralModel) else tuple(net.input_shape)
        g = torch.Generator().manual_seed(0)
        vocab = _token_vocab(md)
        if vocab is not None:  # a language model: seeded random token ids, not a float box
            x, y = torch.randint(0, vocab, (n_inputs, *shape), generator=g), None
        else:
            lo, hi = md.input_domain if isinstance(net, GeneralModel) else (net.input_lo.float(), net.input_hi.float())
            x, y = lo + (hi - lo) * torch.rand(n_inputs, *shape, generator=g), None
    return net, x, y, how, md


def _token_vocab(md: Any) -> int | None:
    """The vocabulary size of a Hugging Face model whose main input is token ids, else None."""
    hf = getattr(getattr(md, "model", None), "module", None)
    inner = getattr(hf, "model", hf)
    if getattr(inner, "main_input_name", None) != "input_ids":
        return None
    vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else None


def _quantize(md: Any, net: Network, fmt: IntFormat) -> tuple[Network, str]:
    """Brevitas PTQ calibrated on a built-in model's training data, or on the calibration data
    when there is some, else :func:`quantize_network`. Returns the network and how it was
    quantized."""
    try:
        from hwrel.quantize import ptq
    except ImportError:
        ptq = None
    calib = md.train[0] if md.train is not None else md.calibration
    if ptq is not None and calib is not None and md.model.kind in ("built-in", "state dict", "safetensors", "pickle"):
        qmodel = ptq(md.module, calib, bits=fmt.bits)
        qnet = Network.from_module(qmodel, input_domain=md.input_domain, input_shape=md.input_shape)
        if all(qnet.nodes[i].affine.codes is not None and qnet.nodes[i].affine.bit_width == fmt.bits
               and bool(qnet.nodes[i].affine.signed) == fmt.signed for i in qnet.synapse_layers):
            return qnet, "brevitas-ptq"
    return quantize_network(net, fmt), "int-codes"


def run(args: argparse.Namespace) -> int:
    from hwrel.cli.tables import json_records, to_text
    from hwrel.inject.executors import run_with_executor
    from hwrel.inject.sampling import CampaignSpec
    from hwrel.inject.stats import margin_of_error
    from hwrel.inject.target import path_of, site_space

    fmt = parse_format(args.format)
    spec = CampaignSpec(
        fault=args.fault, format=fmt.name, count=_num(args.count, "--count", int),
        ber=_num(args.ber, "--ber"), exhaustive=args.exhaustive, layer=args.layer,
        bit=_num(args.bit, "--bit", int), sites=tuple(args.site) if args.site else None,
        capacity=_num(args.capacity, "--capacity"),
        chunk_size=256 if args.chunk_size == "auto" else _num(args.chunk_size, "--chunk-size", int))
    seed = _num(args.seed, "--seed", int)
    confidence = _num(args.confidence, "--confidence")
    check(0 < confidence < 1, f"--confidence must lie strictly between 0 and 1, got {args.confidence!r}")
    bitmap = spec.exhaustive and spec.fault == "bitflip"
    if bitmap:
        check(args.out is None or args.out.endswith((".parquet", ".csv")),
              f"--out {args.out}: an exhaustive bit map is written to one file ending in .parquet or .csv")
        check(args.shard is None and args.executor == "local" and args.workers in (None, "1", 1),
              "an exhaustive bit map runs in one process (no --shard, --executor, --workers)")
    if args.out:  # before the work, not after it
        check_writable(args.out, "--out", folder=not args.out.endswith((".parquet", ".csv")))
    net, x, y, how, md = _model(args, fmt)
    space = site_space(net, spec, x)  # validates layer and bit against the model before any work
    if bitmap:
        check(isinstance(net, Network), "an exhaustive bit map needs a model the fast engine has rules for; "
              "this one runs on the general path (run a random campaign: drop --exhaustive)")
        return _bitmap(args, net, x, y, fmt, how, md, spec)
    if args.chunk_size == "auto" and isinstance(net, Network):
        from hwrel.inject.engine import campaign_chunk

        spec = replace(spec, chunk_size=campaign_chunk(net, len(x), space.num_configs()))
    # --executor local --workers 1 (the default) runs run_campaign in this process
    # (its rows as hwrel.inject.rows.Rows: no pandas on the single-bit-fault engine path)
    rows = run_with_executor(args, net, spec, x, y, seed=seed, progress=not args.no_progress,
                             range_limit=_num(args.range_limit, "--range-limit"), as_rows=True)
    summary = rows.summary(confidence)  # summarize()'s records
    moe = None
    if not spec.exhaustive and spec.ber is None and len(rows):
        moe = margin_of_error(min(len(rows), space.total), confidence, population=space.total)
    path, refused = path_of(net), getattr(net, "reason", None)
    certified = int(rows["certified"].sum()) if "certified" in rows else 0
    info = {**model_info(md), "model": args.model, "storage": how, "injection_path": path,
            "engine_refused": refused, "metric": "next-token" if "agreement" in rows else "classifier",
            "spec": spec.to_dict(), "seed": seed,
            "shard": args.shard, "configs": int(len(rows)), "sites": space.total,
            "certified_masked_without_forward": certified,
            "margin_of_error": moe, "confidence": confidence, "out": args.out,
            "summary": json_records(summary)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    mode = ("exhaustive" if spec.exhaustive else f"BER {spec.ber:g}" if spec.ber is not None
            else "random")
    print(f"{args.model}: {spec.fault} on {', '.join(spec.sites)} ({fmt.name}, {how} storage), "
          f"{mode}, {len(rows)} configurations over {space.total} sites, seed {seed}"
          + (f", shard {args.shard}" if args.shard else ""))
    print(f"injection path: {path}" + (f" (exact general path; the fast engine has no rule for this model: "
                                       f"{refused})" if refused else " (the fast engine)"))
    vocab = _token_vocab(md) if md.x is None else None
    if vocab is not None:
        print(f"inputs: {x.shape[0]} seeded random sequences of token ids in [0, {vocab}) (no --data); "
              "no labels, so no accuracy (give --data)")
    else:
        print(md.domain_note + ("" if y is not None else "; no labels, so no accuracy (give --data)"))
    if "agreement" in rows:
        print("language model: harm is next-token top-1 agreement with the clean model (sdc: a configuration "
              "that changed any prediction) and the cross-entropy change in nats per token (exp: perplexity ratio)")
    if moe is not None:
        print(f"margin of error (worst case p=0.5, {confidence:.0%} confidence): +-{moe:.4f}")
    if certified:
        print(f"certified masked without a forward: {certified} of {len(rows)} (the weight multiplies only "
              "exact zeros, e.g. padding: outputs exactly clean; column 'certified')")
    print(to_text(summary, float_format=lambda v: f"{v:.4g}"))
    return 0


def _bitmap(args: argparse.Namespace, net: Network, x: torch.Tensor, y: torch.Tensor | None, fmt: Any,
            how: str, md: Any, spec: Any) -> int:
    """``--exhaustive`` bit flips: the certified bit map (:func:`hwrel.inject.bitmap.bit_map`)."""
    import time

    from hwrel.inject.bitmap import bit_map
    from hwrel.inject.engine import Injector

    t0 = time.perf_counter()
    inj = Injector(net, x, y, format=fmt, range_limit=_num(args.range_limit, "--range-limit"))
    bm = bit_map(inj, layers=None if spec.layer is None else [spec.layer], sites=spec.sites, bit=spec.bit,
                 progress=not args.no_progress)
    totals = dict(bm.totals, seconds=time.perf_counter() - t0)
    if args.out:
        from hwrel.inject.store import _atomic_write

        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.out.endswith(".csv"):
            _atomic_write(path, lambda tmp: bm.sites.to_csv(tmp, index=False))
        else:
            _atomic_write(path, lambda tmp: bm.sites.to_parquet(tmp, index=False))
    per_layer = bm.summary[bm.summary["layer"] != "all"].groupby(["layer", "site"], sort=False).sum(
        numeric_only=True).drop(columns=["bit", "sdc_rate"]).reset_index()
    per_layer["sdc_rate"] = per_layer["sdc"] / per_layer["sites"]
    info = {**model_info(md), "model": args.model, "storage": how, "format": fmt.name, "totals": totals,
            "out": args.out, "per_layer": json.loads(per_layer.to_json(orient="records")),
            "summary": json.loads(bm.summary.to_json(orient="records"))}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    n = totals["sites"]
    print(f"{args.model}: exhaustive bit map of {', '.join(spec.sites)} ({fmt.name}, {how} storage), "
          f"{n:,} bit sites on {totals['inputs']} inputs, {totals['seconds']:.1f} s")
    print(md.domain_note)
    print(f"certified masked without a forward: {totals['certified_masked']:,} "
          f"({totals['certified_masked'] / n:.1%}; {totals['unchanged']:,} exactly unchanged, "
          f"{totals['bound']:,} within a sound bound incl. float32 rounding)")
    if totals["bound_then_injected_on_few_inputs"]:
        print(f"certified on all but a few inputs, those injected exactly: "
              f"{totals['bound_then_injected_on_few_inputs']:,}")
    print(f"injected exactly: {totals['injected']:,} ({totals['fraction_injected']:.1%} of the sites; "
          f"exhaustive injection: {n:,}, BinFI ~{n // 5:,})")
    print(f"SDC (top-1 class changes on at least one input): {totals['sdc']:,} ({totals['sdc'] / n:.2%})")
    print(per_layer.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
