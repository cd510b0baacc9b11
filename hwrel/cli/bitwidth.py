"""``hwrel bitwidth MODEL``: safe weight bit width (certified, adversarial, estimated, measured)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from hwrel.cli.common import add_model_args, check_writable, fraction, load, model_info
from hwrel.device import resolve_device
from hwrel.errors import HwrelError
from hwrel.quantize.brevitas_ptq import already_quantized_note


def _bits(text: str) -> list[int]:
    try:
        lo, _, hi = text.partition("..")
        out = list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit range must look like 2..16, got {text!r}") from None
    if not out or out[0] < 2 or out[-1] > 16:
        raise argparse.ArgumentTypeError(f"bit range must lie within 2..16, got {text!r}")
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bitwidth", help="smallest safe weight bit width, predicted and verified",
                       description="Quantization as a bounded perturbation: the smallest weight bit width whose "
                       "certified accuracy loss (or output error) meets the budget, beside the adversarial, "
                       "estimated and measured (Brevitas PTQ) answers. On a model the bounds do not support (a ViT, a "
                       "GPT) only the measured answer: the accuracy of weight-quantized copies per width.")
    add_model_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-accuracy-drop", type=fraction, default=0.01, help="e.g. 1%% or 0.01 (default 1%%)")
    g.add_argument("--epsilon", type=float, default=None, help="output-error budget in logits instead")
    p.add_argument("--per-layer", action="store_true", help="also a mixed-precision assignment per layer")
    p.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    p.add_argument("--asymmetric", action="store_true", help="unsigned codes with a zero point")
    p.add_argument("--act-bits", default=None, help="also quantize activations: a width or 'same'")
    p.add_argument("--bits", type=_bits, default=list(range(2, 17)), help="widths to sweep (default 2..16)")
    p.add_argument("--no-verify", action="store_true", help="skip Brevitas measurement")
    p.add_argument("--no-adversarial", action="store_true", help="skip the adversarial search")
    p.add_argument("--qat-epochs", type=int, default=0, help="quantization-aware fine-tuning epochs (verification)")
    p.add_argument("--device", default="cpu", help="where the bounds and the search compute: cpu, cuda or cuda:N "
                   "(default cpu; Brevitas verification runs on the CPU)")
    p.add_argument("--plot", default=None, help="write the figure to this file (.png/.pdf)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwrel import quantize

    act = args.act_bits
    if act is not None and act != "same":
        try:
            act = int(act)
        except ValueError:
            raise HwrelError(f"--act-bits must be a width in 2..16 or 'same', got {act!r}") from None
    if args.epsilon is not None and not args.epsilon > 0:
        raise HwrelError(f"--epsilon must be positive, got {args.epsilon}")
    if args.qat_epochs < 0:
        raise HwrelError(f"--qat-epochs must be >= 0, got {args.qat_epochs}")
    device = resolve_device(args.device)  # a bad name or a missing GPU fails before any work
    if args.plot:
        check_writable(args.plot, "--plot")
    md = load(args)
    from hwrel.report.general import general_target

    general = general_target(md)  # an unloadable model: one line naming the problem, before the work
    if general is not None:  # the bounds have no rule for one of its operations: measure only
        return _run_measured(args, md, general)
    if md.train is not None and args.calibration is None and args.input_domain is None:
        data, where = md.model.reference, {}  # a built-in model: its test split, its training split calibrates
    else:
        x, y = md.labelled("hwrel bitwidth")
        data, where = (x, y, md.calibration), {"input_domain": md.input_domain, "input_shape": md.input_shape}
    note = already_quantized_note(md.module)
    if note:
        print(f"hwrel bitwidth: note: {note}", file=sys.stderr)
    res = quantize.safe_bitwidth(md.module, data, args.max_accuracy_drop, args.epsilon, per_layer=args.per_layer,
                                 verify=not args.no_verify, bits=args.bits, per_channel=args.per_channel,
                                 symmetric=not args.asymmetric, act_bits=act, adversarial=not args.no_adversarial,
                                 qat_epochs=args.qat_epochs, device=device, **where)
    if args.plot:
        fig = res.plot()
        d = os.path.dirname(os.path.abspath(args.plot))
        suffix = os.path.splitext(args.plot)[1] or ".png"
        fd, tmp = tempfile.mkstemp(dir=d, suffix=suffix)
        os.close(fd)
        try:
            fig.savefig(tmp)
            os.replace(tmp, args.plot)
        except BaseException:
            os.unlink(tmp)
            raise
    if args.json:
        print(json.dumps({**model_info(md), **res.to_dict()}, indent=2))
    else:
        print(f"model {md.name}, {res.spec}, budget {res.budget}; {md.domain_note}")
        for k in ("certified", "adversarial", "estimated", "measured"):
            print(f"  {k:<12} bits: {getattr(res, k + '_bits')}")
        if res.memory_saved_bits is not None:
            print(f"  memory saved vs float32 weights: {res.memory_saved_bits} bits ({res.memory_saved_percent:.1f}%)")
        if res.per_layer:
            print(f"  per-layer (certified): {res.per_layer}, {res.per_layer_stored_bits} bits stored vs "
                  f"{res.uniform_stored_bits} uniform")
        cols = [c for c in ("bits", "bound_paper", "bound_weights", "bound_interval", "certified_error",
                            "certified_accuracy", "adversarial_accuracy", "estimated_accuracy", "measured_error",
                            "measured_accuracy") if c in res.table]
        print(res.table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        t = res.timings or {}
        print("  time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items() if k.endswith("_s")))
    if res.message:
        print(f"hwrel: {res.message}", file=sys.stderr)
        return 1
    return 0


def _run_measured(args: argparse.Namespace, md, general) -> int:
    """``hwrel bitwidth`` on a model the bounds do not support: the accuracy of weight-quantized
    copies measured on the test inputs (Brevitas PTQ where it can quantize the model, else
    per-channel round to nearest), an estimate; no width is certified."""
    from hwrel.report import general as gen

    reason = gen.bounds_reason(general.reason)
    for flag, given in (("--epsilon", args.epsilon is not None), ("--per-layer", args.per_layer),
                        ("--asymmetric", args.asymmetric), ("--act-bits", args.act_bits is not None),
                        ("--qat-epochs", args.qat_epochs > 0), ("--plot", args.plot is not None)):
        if given:
            raise HwrelError(f"{flag} needs the certified analysis, which is not applicable to model {md.name}: "
                             f"{reason}")
    if args.no_verify:
        raise HwrelError(f"--no-verify leaves nothing to do for model {md.name}: the certified analysis is not "
                         f"applicable ({reason}), only the measurement is")
    x, y = md.labelled("hwrel bitwidth")
    calib = md.calibration if md.calibration is not None else x
    say = (lambda f, m: print(f"hwrel bitwidth: {m}", file=sys.stderr, flush=True)) if not args.json else None
    res = gen.measured_bitwidth(md.module, x, y, calib, tuple(args.bits), args.max_accuracy_drop, progress=say)
    lm = y.dim() == 2
    gbw = _graph_certified(md, x, y, args, say)
    if args.json:
        from hwrel.cli.common import print_json

        cert = gbw if isinstance(gbw, str) else None
        print_json({**model_info(md), "certified": gen.not_applicable(f"{reason}; the graph bounds: {cert}")
                    if cert else ("graph" if gbw is not None else gen.not_applicable(reason)),
                    "method": res.method, "note": res.note, "metric": "next-token" if lm else "class",
                    "max_accuracy_drop": res.max_accuracy_drop, "float_accuracy": res.float_accuracy,
                    "measured_bits": res.measured_bits,
                    "certified_bits": gbw.certified_bits if gbw is not None and not cert else None,
                    "certified_table": gbw.table.to_dict("records") if gbw is not None and not cert else None,
                    "quantized": list(res.quantized), "table": res.table.to_dict("records")})
        return 0
    print(f"model {md.name}, budget accuracy drop <= {res.max_accuracy_drop:g}"
          f"{' (next-token top-1)' if lm else ''}; {md.domain_note}")
    from hwrel.report.general_sections import _certified_width

    print(f"  certified    bits: {_certified_width(gbw, reason)}")
    print(f"  measured     bits: {res.measured_bits} (on {len(x)} test {'sequences' if lm else 'inputs'}: "
          "an estimate, not a certificate)")
    print(f"  quantizer: {res.method}" + (f"; {res.note}" if res.note else ""))
    print(res.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if gbw is not None and not isinstance(gbw, str):
        print("certified over the graph (sound on each test input; violations: rounded copy beyond its bound):")
        print(gbw.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _graph_certified(md, x, y, args: argparse.Namespace, say):
    """The certified width over the model's graph where the graph bounds cover it (None where they
    do not trace or run it; the one-line reason where a rounded weight has no rule)."""
    from hwrel.bounds.graph import check_supported
    from hwrel.errors import UnsupportedLayerError
    from hwrel.quantize.graph import graph_bitwidth

    try:
        check_supported(md.module, x)
    except (UnsupportedLayerError, HwrelError):
        return None
    try:
        return graph_bitwidth(md.module, x, y, bits=tuple(args.bits), max_accuracy_drop=args.max_accuracy_drop,
                              progress=say)
    except (UnsupportedLayerError, HwrelError) as exc:
        return str(exc).strip().splitlines()[0]
