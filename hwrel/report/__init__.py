"""The reliability report: one call from a model to a folder an engineer can sign.

:func:`build_report` runs every analysis hwrel has on one model mapped onto one accelerator and
writes ``index.html`` (self-contained), ``report.md`` (+ ``figures/*.svg``) and ``tables/*.csv``.
Analyses that are missing from this installation leave a section saying "not available in this
version"; every certified number is put beside a fault-injection measurement and the report says
loudly if any bound was exceeded. The folder appears complete or not at all: it is written into a
temporary folder beside the target and renamed into place.

A model the bounds have no rule for (an operation :meth:`hwrel.network.Network.from_module`
refuses: attention, LayerNorm, squeeze-excite gates...) still gets a report: every certified
section says "not applicable: <the bounds' one-line reason>", and the measured analyses run on the
exact general injection path (:mod:`hwrel.report.general`).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwrel.errors import HwrelError

DEFAULT_MODEL = "digits-mlp"
DEFAULT_ACCELERATOR = "eyeriss-v1"


@dataclass(frozen=True)
class ReportConfig:
    """Campaign sizes (the defaults are what ``hwrel report`` uses).

    ``samples``: test inputs analysed (a seeded subset when there are more). ``failure_counts``:
    failed neurons per layer in the Fep tables. ``random_sets``: random failure sets measured per
    configuration; ``adversarial_*``: settings of the adversarial failure search (``steps=0`` and
    ``restarts=0`` still run the greedy set search; ``adversarial_screen``: candidate neurons
    evaluated exactly per greedy or swap step, those a first-order estimate ranks highest: on
    mnist-resnet 64 instead of the search's default 256 found the same worst case in 17 of the 20
    Fep configurations, a larger one in 2 and a smaller one in 1, in 17 s instead of 59 s). ``seu_campaign``: random single flips
    injected; ``seu_samples``: inputs they are measured on. ``bits``: widths swept.
    ``flip_search``: search the fewest bit flips breaking the budget (hwrel's search and the
    progressive bit search baseline, at most ``flip_search_max`` flips each). ``tolerance_curve``:
    the certified accuracy at 1, 2, 4, ... failed neurons (False: only where the tolerance search
    looked). ``per_layer``: search a mixed-precision width per layer (the bit-width section's
    per-layer recommendation; about a fifth of a CNN's report).
    """

    samples: int = 512
    failure_counts: tuple[int, ...] = (1, 2)
    random_sets: int = 64
    adversarial: bool = True
    adversarial_steps: int = 10
    adversarial_restarts: int = 1
    adversarial_pool: int = 8
    adversarial_inputs: int = 16
    adversarial_screen: int = 64
    seu_campaign: int = 1000
    seu_samples: int = 256
    bits: tuple[int, ...] = tuple(range(2, 17))
    flip_search: bool = True
    flip_search_max: int = 64
    tolerance_curve: bool = True
    per_layer: bool = True


QUICK = ReportConfig(samples=64, failure_counts=(1,), random_sets=8, adversarial=False, adversarial_restarts=1,
                     adversarial_pool=4, adversarial_inputs=8, seu_campaign=100, seu_samples=64,
                     bits=(4, 6, 8, 10, 12, 16), flip_search_max=16, tolerance_curve=False,
                     per_layer=False)
"""``hwrel report --quick``: fewer inputs, failure sets, flips and widths, random failure sets only
(no adversarial neuron search), no per-layer width search: a draft; the full profile is what to sign."""


def _optional(module: str) -> Any:
    """The module, or None when it is not part of this installation."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).stem if os.sep in text or "." in text else text)
    return s.strip("-.") or "model"


def _fraction(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
        raise HwrelError(f"{name} must be a fraction in [0, 1), got {v!r}")
    return float(v)


def _versions() -> dict[str, str]:
    import hwrel

    brevitas = _optional("brevitas")
    return {"hwrel": hwrel.__version__, "torch": torch.__version__,
            "brevitas": getattr(brevitas, "__version__", "not installed") if brevitas else "not installed",
            "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"}


# Share of the run each stage starts at (measured on mnist-lenet; a guide for the eye, not a promise).
STAGES = {"load": 0, "fep": 2, "bitwidth": 30, "seu": 88, "flips": 92, "write": 95, "done": 100}


class _Progress:
    """Progress lines on stderr: elapsed time, the share of the run done, the message.

    ``stage`` starts a stage (always printed); ``part(fraction, message)`` reports progress within
    it (fraction 0..1 of the stage, interpolated between its share and the next stage's), printed
    at most once a second so long loops neither flood nor fall silent."""

    def __init__(self, enabled: bool, min_interval: float = 1.0):
        self.enabled, self.t0, self.pct, self.min_interval = enabled, time.perf_counter(), 0, min_interval
        self.name, self.last = "load", -math.inf

    def stage(self, name: str, msg: str) -> None:
        self.name, self.pct = name, STAGES[name]
        self(msg)

    def part(self, fraction: float, msg: str) -> None:
        names = list(STAGES)
        start = STAGES[self.name]
        end = STAGES[names[min(names.index(self.name) + 1, len(names) - 1)]]
        self.pct = max(self.pct, int(start + max(0.0, min(1.0, fraction)) * (end - start)))
        if time.perf_counter() - self.last >= self.min_interval:
            self(msg)

    def __call__(self, msg: str) -> None:
        if self.enabled:
            self.last = time.perf_counter()
            print(f"hwrel report [{self.last - self.t0:6.1f}s {self.pct:3d}%] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- output folder

def _prepare_out(out: Path, force: bool) -> Path:
    """Check the target before any work and create the temporary folder beside it."""
    if out.exists() and not force:
        raise HwrelError(f"output folder {out} already exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise HwrelError(f"output path {out} exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise HwrelError(f"output folder {out}: cannot write there ({exc.strerror or exc})") from None


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "report")
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / "report", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- the model

def _resolve(spec: Any, data: Any, trust_pickle: bool, architecture: str | None, *,
             architecture_args: Any = None, calibration: Any = None, label_column: str | None = None,
             input_domain: Any = None, input_shape: Any = None):
    """The model with its labelled test data (:class:`hwrel.data.ModelData`)."""
    from hwrel import models
    from hwrel.data import load_data, prepare
    from hwrel.loading import LoadedModel, load_model

    if isinstance(spec, models.ReferenceModel):
        lm = LoadedModel(spec.module, spec.name, "built-in", None, spec, tuple(spec.input_shape))
    elif isinstance(spec, nn.Module):
        lm = LoadedModel(spec, type(spec).__name__, "module")
    elif isinstance(spec, (str, os.PathLike)):
        lm = load_model(spec, architecture=architecture, architecture_args=architecture_args,
                        trust_pickle=trust_pickle)
        if lm.reference is None and architecture in models.names() and data is None:
            ref = models.load(architecture)  # a state dict of a built-in architecture: its data
            data, calibration = (ref.x_test, ref.y_test), (calibration if calibration is not None
                                                           else ref.x_train[:512])
    else:
        raise HwrelError(f"model: expected a built-in name, a model file or an nn.Module, got {type(spec).__name__}")
    if isinstance(data, (tuple, list)) and len(data) == 3:  # (inputs, labels, calibration inputs)
        data, calibration = tuple(data[:2]), (data[2] if calibration is None else calibration)
    elif data is not None and not isinstance(data, (tuple, list, str, os.PathLike)) \
            and type(data).__name__ != "Dataset":
        raise HwrelError("data must be (inputs, labels) or (inputs, labels, calibration inputs)")
    if isinstance(data, (str, os.PathLike)):
        data = load_data(data, label_column=label_column)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = load_data(calibration, label_column=label_column, labels=False)
    md = prepare(lm, data, calibration=calibration, input_domain=input_domain, input_shape=input_shape)
    md.labelled("the report")
    if md.x.shape[0] == 0:
        raise HwrelError("data: no inputs")
    return md


# ------------------------------------------------------------------------------- build

def build_report(model_spec_or_module: Any = DEFAULT_MODEL, accelerator: str = DEFAULT_ACCELERATOR, *,
                 out: str | os.PathLike[str] | None = None, force: bool = False, max_accuracy_drop: float = 0.01,
                 mission_hours: float = 87600, target: str | None = "asil-b", seed: int = 0,
                 progress: bool = True, data: Any = None, config: ReportConfig | None = None,
                 trust_pickle: bool = False, architecture: str | None = None,
                 command: str | None = None, architecture_args: Any = None, calibration: Any = None,
                 label_column: str | None = None, input_domain: Any = None,
                 input_shape: Any = None) -> Path:
    """Analyse a model on an accelerator and write the reliability report; returns its folder.

    ``model_spec_or_module``: a built-in model name, a model file or folder (every format of
    :func:`hwrel.loading.load_model`, with ``architecture``, ``architecture_args``,
    ``trust_pickle``), a ReferenceModel or an ``nn.Module``. ``data``: labelled test data, a file
    (:func:`hwrel.data.load_data`, with ``label_column``) or ``(inputs, labels[, calibration])``;
    required unless the model is built in. ``calibration``: a file or inputs (default: the test
    data). ``input_domain`` (default: a built-in model's own, else the data's range) and
    ``input_shape`` as in :func:`hwrel.data.prepare`. ``out`` defaults to
    ``reports/<model>-<accelerator>``; an existing folder is refused unless ``force``. The budget
    ``max_accuracy_drop`` (fraction) drives tolerance, bit width and SEU vulnerability;
    ``mission_hours`` and ``target`` (e.g. ``"asil-b"``, or None) the mission verdict. Every random
    choice derives from ``seed``. Progress goes to stderr. Raises :class:`HwrelError` (and writes
    nothing) for bad input.
    """
    from hwrel.report import render, sections
    from hwrel.seu.accelerator import load_accelerator

    cfg = config or ReportConfig()
    drop = _fraction(max_accuracy_drop, "max_accuracy_drop")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise HwrelError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(mission_hours, bool) or not isinstance(mission_hours, (int, float)) \
            or not math.isfinite(mission_hours) or mission_hours <= 0:
        raise HwrelError(f"mission_hours must be a number > 0, got {mission_hours!r}")
    acc = load_accelerator(accelerator)
    if target is not None:
        from hwrel.seu.rates import parse_target

        parse_target(target)
    log = _Progress(progress)
    log.stage("load", f"loading model {model_spec_or_module if isinstance(model_spec_or_module, str) else '(module)'}")
    md = _resolve(model_spec_or_module, data, trust_pickle, architecture,
                  architecture_args=architecture_args, calibration=calibration, label_column=label_column,
                  input_domain=input_domain, input_shape=input_shape)
    name, module, ref, x, y, calib = md.name, md.module, md.model.reference, md.x, md.y, md.calibration
    out_path = Path(out) if out is not None else Path("reports") / f"{_slug(name)}-{acc.name}"
    tmp = _prepare_out(out_path, force)
    try:
        opts = model_options(data=data, calibration=calibration, architecture=architecture,
                             architecture_args=architecture_args, label_column=label_column,
                             input_domain=input_domain, input_shape=input_shape, trust_pickle=trust_pickle)
        if opts is not None and cfg == QUICK:
            opts = ["--quick", *opts]
        cmd = command or _command(model_spec_or_module, name, acc.name, out, drop, mission_hours, target, seed,
                                  opts)
        from hwrel.report.general import general_target

        general = general_target(md)
        if general is not None:  # no certified analysis: measured figures on the exact general path
            _general_report(general, md, name, acc, x, y, calib, drop, mission_hours, target, seed, cfg, log, tmp,
                            out_path, cmd)
            log.stage("done", f"done: {out_path / 'index.html'}")
            return out_path
        net = md.network()
        if not net.layers:
            raise HwrelError(f"model {name} cannot be analysed: it has no hidden layer (no neuron can fail)")
        g = torch.Generator().manual_seed(seed)
        if x.shape[0] > cfg.samples:
            keep = torch.randperm(x.shape[0], generator=g)[:cfg.samples].sort().values
            x, y = x[keep], y[keep]
        lo, hi = net.input_lo.float(), net.input_hi.float()
        if bool(((x < lo - 1e-6) | (x > hi + 1e-6)).any()):
            raise HwrelError("data: some inputs lie outside the model's input domain")
        results = _analyse(name, module, ref, net, acc, x, y, calib, drop, mission_hours, target, seed, cfg, log)
        results["domain_source"] = md.domain_source
        from hwrel.report.summary import model_checksum

        results["checksum"] = model_checksum(module)
        results["data_source"] = (f"{md.data_source or 'the given test data'} ({len(x)} inputs analysed"
                                  + (f", {min(len(x), cfg.seu_samples)} for the SEU analysis)"
                                     if results.get("seu") is not None else ")"))
        log.stage("write", "writing the report")
        report = _assemble(results, name, acc, net, cmd, seed, cfg, sections, render)
        render.write_report(report, tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report is an ordinary folder
        _move_into_place(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.stage("done", f"done: {out_path / 'index.html'}")
    if results["checks_violated"]:
        print(f"hwrel report: BOUND VIOLATIONS FOUND ({results['checks_violated']}); see the report",
              file=sys.stderr, flush=True)
    return out_path


def _general_report(general: Any, md: Any, name: str, acc: Any, x: Any, y: Any, calib: Any, drop: float,
                    hours: float, target: str | None, seed: int, cfg: ReportConfig, log: _Progress, tmp: Path,
                    out_path: Path, cmd: str) -> None:
    """Analyse on the general path and write the report into ``tmp``, then move it to ``out_path``."""
    from hwrel.report import general as gen
    from hwrel.report import general_sections, render, sections
    from hwrel.report.summary import model_checksum

    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > cfg.samples:
        keep = torch.randperm(x.shape[0], generator=g)[:cfg.samples].sort().values
        x, y = x[keep], y[keep]
    lo, hi = (float(v) for v in md.input_domain)
    if bool(((x < lo - 1e-6) | (x > hi + 1e-6)).any()):
        raise HwrelError("data: some inputs lie outside the model's input domain")
    try:
        res = gen.analyse(name, general, acc, x, y, calib, drop=drop, hours=hours, target_name=target, seed=seed,
                          cfg=cfg, log=log, input_domain=(lo, hi), input_shape=md.input_shape,
                          quantize=_optional("hwrel.quantize") is not None)
    except HwrelError as exc:  # e.g. a forward that fails on the data: not even measurable
        raise HwrelError(f"model {name} cannot be analysed: {gen.bounds_reason(general.reason)}, and on the "
                         f"general injection path: {str(exc).splitlines()[0]}") from None
    res["checksum"] = model_checksum(md.module)
    res["data_source"] = (f"{md.data_source or 'the given test data'} ({len(x)} inputs analysed, "
                          f"{res['seu'].samples} for the SEU analysis)")
    log.stage("write", "writing the report")
    prov = None
    if len(res["seu"].memories):
        from hwrel.report.provenance import rate_provenance
        from hwrel.seu.rates import parse_target

        prov = general_sections.provenance(rate_provenance(acc, res["seu"].memories,
                                                           parse_target(target) if target else None), acc)
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    reproduce = sections.reproduce_section(cmd, seed, _versions(), asdict(cfg))
    report = general_sections.assemble(res, name, acc, _versions(), generated, prov, reproduce)
    render.write_report(report, tmp)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    _move_into_place(tmp, out_path)


def model_options(**given: Any) -> list[str] | None:
    """The CLI model and data options for the given API arguments (``--name=value``), or None
    when one of them is not expressible on a command line (tensors or modules from Python)."""
    import json

    out: list[str] = []
    for key, v in given.items():
        if v is None or v is False:
            continue
        opt = "--" + key.replace("_", "-")
        if v is True:
            out.append(opt)
        elif isinstance(v, (str, os.PathLike)):
            out.append(f"{opt}={os.fspath(v)}")
        elif key == "architecture_args":
            out.append(f"{opt}={json.dumps(v)}")
        elif key in ("input_domain", "input_shape") and isinstance(v, (tuple, list)):
            out.append(f"{opt}={','.join(f'{float(t):g}' if key == 'input_domain' else str(int(t)) for t in v)}")
        else:
            return None
    return out


def _command(spec: Any, name: str, acc: str, out: Any, drop: float, hours: float, target: str | None,
             seed: int, options: list[str] | None = None) -> str:
    """The ``hwrel report`` command that regenerates this report (run from the same folder)."""
    if options is None or not isinstance(spec, (str, os.PathLike)):
        return ("(no command reproduces this report: the model or the data were passed from Python; "
                "save them to files and use `hwrel report MODEL --data FILE`)")
    parts = ["hwrel", "report", os.fspath(spec), *options, "--accelerator", acc, "--max-accuracy-drop",
             f"{drop:g}", "--mission-hours", f"{hours:g}", "--target", target or "none", "--seed", str(seed)]
    if out is not None:
        parts += ["--out", os.fspath(out)]
    return shlex.join(parts + ["--force"])


def _analyse(name, module, ref, net, acc, x, y, calib, drop, hours, target, seed, cfg: ReportConfig,
             log: Callable[[str], None]) -> dict[str, Any]:
    from hwrel.report import sections

    res: dict[str, Any] = {"x": x, "y": y, "missing": [], "hours": float(hours)}
    summary = net.summary()
    C = float(max(summary["range_hi"].abs().max(), summary["range_lo"].abs().max()))
    adv = None
    if cfg.adversarial:
        adv = {"steps": cfg.adversarial_steps, "restarts": cfg.adversarial_restarts,
               "pool_size": cfg.adversarial_pool, "inputs": cfg.adversarial_inputs, "screen": cfg.adversarial_screen}
    log.stage("fep", f"Fep bounds, tolerance and failure injection ({len(net.layers)} hidden layers)")
    res["fep"] = sections.fep_analysis(net, x, y, capacity=C, counts=cfg.failure_counts, max_accuracy_drop=drop,
                                       random_sets=cfg.random_sets, adversarial=adv, seed=seed, log=log,
                                       full_curve=cfg.tolerance_curve, progress=log.part)
    quantize = _optional("hwrel.quantize")
    res["bitwidth"] = None
    if quantize is not None and hasattr(quantize, "safe_bitwidth"):
        log.stage("bitwidth", f"safe bit width: sweeping {len(cfg.bits)} widths (certified, adversarial, estimated, Brevitas PTQ)")
        from hwrel.quantize.brevitas_ptq import already_quantized_note

        res["bitwidth_note"] = already_quantized_note(module) if module is not None else None
        if res["bitwidth_note"]:
            log.stage("bitwidth", f"note: {res['bitwidth_note']}")
        res["bitwidth"] = quantize.safe_bitwidth(module, (x, y, calib), max_accuracy_drop=drop, per_layer=cfg.per_layer,
                                                 bits=cfg.bits, input_domain=(float(net.input_lo.min()),
                                                                              float(net.input_hi.max())),
                                                 input_shape=net.input_shape, progress=log.part)
    else:
        res["missing"].append("safe bit width")
    seu_mod = _optional("hwrel.seu.analysis")
    res["seu"] = None
    if seu_mod is not None:
        log.stage("seu", f"SEU analysis on {acc.name} ({cfg.seu_campaign} injected flips)")
        res["seu"] = seu_mod.seu_analysis(net, acc, data=(x, y), mission_hours=hours, target=target, seed=seed,
                                          max_accuracy_drop=drop, campaign_size=cfg.seu_campaign,
                                          max_samples=cfg.seu_samples)
        res["seu"] = dataclasses.replace(res["seu"], model=name)
    else:
        res["missing"].append("SEU tolerance")
    res["attack"] = None
    if res["seu"] is not None and cfg.flip_search and "max_accuracy_drop" in res["seu"].budget:
        from hwrel.seu.attack import attack_on_accelerator

        log.stage("flips", f"adversarial bit-flip search (hwrel and the progressive bit search baseline, "
            f"up to {cfg.flip_search_max} flips)")
        res["attack"] = attack_on_accelerator(net, acc, x, y, max_accuracy_drop=drop, seed=seed,
                                              max_samples=cfg.seu_samples, max_flips=cfg.flip_search_max)
    res["checks"] = sections.validation_checks(res["fep"], res["bitwidth"], res["seu"], res["attack"])
    res["checks_violated"] = int(res["checks"]["violated"].astype(bool).sum()) if len(res["checks"]) else 0
    res["clean_accuracy"] = res["fep"].clean_accuracy
    return res


def _assemble(res, name, acc, net, cmd, seed, cfg: ReportConfig, sections, render):
    import pandas as pd

    from hwrel.report import figures as figs

    seu, bw = res["seu"], res["bitwidth"]
    float_bits = sum(32 * int(net.nodes[i].affine.weight.numel()) for i in net.synapse_layers)
    mems = pd.DataFrame([{"memory": m.name, "holds": ", ".join(m.holds), "size_bytes": m.size_bytes,
                          "off_chip": m.off_chip, "protection": m.protection.describe(),
                          "ser_fit_per_mbit": m.ser_fit_per_mbit} for m in acc.memories])
    if seu is not None:
        stored = seu.mapping.groupby("memory")["bits"].sum()
        mems["model_bits_stored"] = [int(stored.get(m, 0)) for m in mems["memory"]]
    info = {"model": name, "input shape": tuple(net.input_shape),
            "input domain": f"[{float(net.input_lo.min()):g}, {float(net.input_hi.max()):g}]"
                            + (f" ({res['domain_source']})" if res.get("domain_source") else ""),
            "hidden layers": f"{len(net.layers)} ({', '.join(str(s) for s in net.layer_sizes())} neurons)",
            "parameters": f"{net.num_parameters:,} (as trained, float32: {float_bits:,} weight bits)",
            "test accuracy (analysed inputs)": f"{res['clean_accuracy']:.2%} on {len(res['x'])} inputs",
            "accelerator": f"{acc.name}: {acc.title}",
            "formats": ", ".join(acc.formats) + (f" (model stored as {seu.format})" if seu is not None else ""),
            "technology": f"{acc.technology_node_nm:g} nm" + (f", {acc.clock_mhz:g} MHz" if acc.clock_mhz else ""),
            "injection path": "fast engine (exact, `hwrel.inject.engine`; the bounds cover every operation)"}
    if seu is not None:
        info["stored parameter bits"] = f"{seu.total_bits:,}"
    heat = mission = scatter = None
    plots = _optional("hwrel.seu.plots")
    if seu is not None and plots is not None:
        heat = figs.svg_bytes(figs.styled(plots.critical_bits_heatmap)(seu))
        mission = figs.svg_bytes(figs.styled(plots.mission_plot)(seu))
    if len(res["checks"]):
        scatter = figs.svg_bytes(figs.validation_figure(res["checks"]))
    banner = sections.violation_banner(res["checks"], res["missing"])
    prov = sens = iso = options = None
    extra: list = []
    if seu is not None:
        from hwrel.report.iso26262 import iso_metrics
        from hwrel.report.provenance import rate_provenance, sensitivity
        from hwrel.seu.hardening import hardening_options
        from hwrel.seu.rates import parse_target

        prov = rate_provenance(acc, seu.memories, parse_target(seu.target) if seu.target else None)
        sens = sensitivity(acc, seu)
        iso = iso_metrics(seu)
        options = hardening_options(acc, seu)
    from hwrel.report.summary import executive_summary

    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    exe = executive_summary(name=name, acc=acc, seu=seu, bw=bw, attack=res.get("attack"), sens=sens, iso=iso,
                            options=options, provenance=prov, checksum=res.get("checksum", ""),
                            data_source=res.get("data_source", "the given test data"), generated=generated,
                            checks_violated=res["checks_violated"])
    extra.append(render.Table("summary", "Executive summary", exe.table()))
    secs = [
        exe.section(),
        sections.summary_section(info, net.summary(), net.affine_summary().astype({"weight_shape": str}), mems,
                                 seu.mapping if seu is not None else None, seu.format if seu is not None else None),
        sections.fep_section(res["fep"]),
        sections.bitwidth_section(bw, float_bits),
        sections.seu_section(seu, heat, mission, res.get("attack"), options),
    ]
    if seu is not None:
        secs.append(sections.provenance_section(prov, sens, acc))
    secs += [sections.iso_section(iso),
             sections.validation_section(res["checks"], banner, scatter),
             sections.reproduce_section(cmd, seed, _versions(), asdict(cfg))]
    sub = (f"{acc.name}, accuracy budget {res['fep'].max_accuracy_drop:.2%}, mission {res['hours']:g} h. "
           f"Generated {generated} by hwrel {_versions()['hwrel']}.")
    return render.Report(f"Reliability report: {name} on {acc.name}", sub, tuple(secs), banner, tuple(extra))


__all__ = ["DEFAULT_ACCELERATOR", "DEFAULT_MODEL", "QUICK", "ReportConfig", "build_report"]
