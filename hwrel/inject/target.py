"""Which injection path runs a model: the fast engine where it has rules, else the general path.

The one place campaigns, executors and ``hwrel inject`` decide. :func:`as_target` returns the
model's :class:`hwrel.network.Network` (the fast engine, :mod:`hwrel.inject.engine`) when
extraction succeeds, else a :class:`GeneralModel` (the exact general path,
:mod:`hwrel.inject.general`) that remembers why the engine refused. Both paths are exact; the
output says which one ran (``path``: ``"engine"`` or ``"general"``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from hwrel.errors import HwrelError, UnsupportedLayerError, check
from hwrel.network import Network

PATHS = ("engine", "general")


@dataclass(frozen=True, eq=False)
class GeneralModel:
    """A model for the general path: the module and why the engine refused it (one line)."""

    module: nn.Module
    reason: str

    path = "general"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def as_target(model: nn.Module | Network | GeneralModel, input_domain: Any = (0.0, 1.0),
              input_shape: Sequence[int] | None = None) -> Network | GeneralModel:
    """The model's Network when the engine has a rule for every operation, else a
    :class:`GeneralModel`. Bad input (a non-module, an input domain with lo > hi) still raises."""
    if isinstance(model, (Network, GeneralModel)):
        return model
    check(isinstance(model, nn.Module), f"expected an nn.Module or hwrel Network, got {type(model).__name__}")
    try:
        return Network.from_module(model, input_domain=input_domain, input_shape=input_shape)
    except UnsupportedLayerError as exc:
        return GeneralModel(model, _first_line(exc))
    except HwrelError as exc:
        msg = _first_line(exc)
        if msg.startswith("input_domain"):
            raise
        return GeneralModel(model, msg)  # cannot trace, no input shape to infer, NaN weights...
    except Exception as exc:  # tracing user code raises anything
        return GeneralModel(model, f"{type(exc).__name__}: {_first_line(exc)}")


def check_sendable(target: Network | GeneralModel) -> None:
    """One-line error when worker processes cannot receive the model: the general path sends the
    module itself, so its class must be importable there (a Network is plain tensors)."""
    if not isinstance(target, GeneralModel):
        return
    import pickle

    try:
        pickle.dumps(target.module)
    except Exception as exc:  # noqa: BLE001 - pickling user classes raises many types
        cls = type(target.module)
        raise HwrelError(f"model class {cls.__module__}.{cls.__qualname__} cannot be sent to worker "
                         f"processes for the general injection path ({_first_line(exc)}); run it in "
                         "one process (--workers 1) or make the class importable") from None


def path_of(target: Network | GeneralModel) -> str:
    return "general" if isinstance(target, GeneralModel) else "engine"


def fingerprint(target: GeneralModel) -> str:
    """Hash of the module's class, structure and every parameter and buffer (names, dtypes, bits)."""
    h = hashlib.sha256()
    m = target.module
    h.update(f"{type(m).__module__}.{type(m).__qualname__}\n{m!r}".encode())
    for name, t in list(m.state_dict(keep_vars=False).items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def site_space(target: Network | GeneralModel, spec: Any, inputs: torch.Tensor | None = None,
               metric: Any = None) -> Any:
    """The campaign's fault sites: :class:`hwrel.inject.sampling.SiteSpace` for a Network,
    :class:`GeneralSiteSpace` (sites found by one clean forward of ``inputs``) otherwise."""
    from hwrel.inject.sampling import SiteSpace

    if isinstance(target, Network):
        return SiteSpace(target, spec)
    check(inputs is not None, "the general injection path needs the inputs to find its fault sites")
    from hwrel.inject.general import GeneralInjector

    inj = GeneralInjector(target.module, inputs, format=spec.format, metric=metric)
    return GeneralSiteSpace(inj, spec)


class GeneralSiteSpace:
    """Numbering of the general path's sites under a campaign spec, with the interface of
    :class:`hwrel.inject.sampling.SiteSpace` (same order rules: sites in model order, element-major,
    bit-minor), so the campaign samples and tabulates them with the same code."""

    def __init__(self, injector: Any, spec: Any):
        from hwrel.inject.sampling import SiteGroup

        self.net, self.spec, self.injector = None, spec, injector
        check("synapse" not in spec.sites, "synapse faults need the fast engine; the general path "
              "injects weight, bias and neuron faults")
        groups = []
        names: list[str] = []
        nodes = (spec.layer or "").startswith("fx:")  # one trace node, injected as neuron faults
        for site in spec.sites:
            table = injector.sites("node" if nodes and site == "neuron" else site)
            if site == "neuron" and not table:  # a torch.export program has no submodules: its nodes
                table = injector.sites("node")
            names += list(table)
            for name, numel in table.items():
                if spec.layer is not None and name != spec.layer:
                    continue
                if site == "neuron":
                    groups.append(SiteGroup(name, site, numel, ""))
                    continue
                fmt = injector.params[name].fmt
                if spec.bit is not None:
                    check(spec.bit < fmt.bits, f"bit {spec.bit} out of range for the {fmt.name} "
                          f"{site} {name}: valid bits are 0..{fmt.bits - 1}")
                pos = (spec.bit,) if spec.bit is not None else tuple(range(fmt.bits))
                groups.append(SiteGroup(name, site, numel, fmt.name, pos))
        if spec.layer is not None and spec.layer not in names:
            raise HwrelError(f"layer {spec.layer!r} not found; {'/'.join(spec.sites)} sites: "
                             f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''}")
        from hwrel.inject.sampling import SiteSpace

        SiteSpace._index(self, groups)  # type: ignore[arg-type]  # the same flat-number tables

    def locate(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from hwrel.inject.sampling import SiteSpace

        return SiteSpace.locate(self, flat)  # type: ignore[arg-type]

    def num_configs(self) -> int:
        from hwrel.inject.sampling import SiteSpace

        return SiteSpace.num_configs(self)  # type: ignore[arg-type]

    def num_chunks(self) -> int:
        return -(-self.num_configs() // self.spec.chunk_size)


class GeneralMeasure:
    """Measures a campaign's configurations with the general path (the injector is built once)."""

    def __init__(self, injector: Any):
        self.injector = injector

    def __call__(self, configs: list[tuple]) -> dict[str, np.ndarray]:
        inj = self.injector
        n = len(configs)
        res: dict[str, np.ndarray] = {"old_value": np.full(n, np.nan, np.float32),
                                      "new_value": np.full(n, np.nan, np.float32)}
        clean = inj.metric.measure(inj.clean, inj.clean)  # a configuration that flips nothing
        for key in inj.metric.columns:
            res[key] = np.full(n, clean[key], bool if key == "nonfinite" else np.float64)
        live = [i for i, c in enumerate(configs) if len(c)]
        if live:
            got = inj.run([configs[i] for i in live])
            for key, arr in res.items():
                arr[live] = got[key]
        return res


def general_parts(target: GeneralModel, spec: Any, inputs: torch.Tensor, labels: torch.Tensor | None,
                  range_limit: float | None, device: str, metric: Any = None) -> tuple[Any, str, Any]:
    """``(site space, model fingerprint, measure)`` of a campaign on the general path: one
    injector (one private copy of the model, one clean forward) serves all three."""
    from hwrel.inject.general import GeneralInjector

    inj = GeneralInjector(target.module, inputs, labels, format=spec.format, range_limit=range_limit,
                          metric=metric, device=device)
    return GeneralSiteSpace(inj, spec), fingerprint(target), GeneralMeasure(inj)
