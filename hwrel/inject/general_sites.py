"""Fault sites of the general injection path (:mod:`hwrel.inject.general`): what a site is, how a
forward is run and read, and how Brevitas layers' integer weight codes are found and replaced.

Pure descriptions and small helpers; the injector itself lives in :mod:`hwrel.inject.general`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from hwrel.errors import HwrelError
from hwrel.formats import Format, IntFormat

_DTYPE_FORMATS = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_NO_SITE = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@contextlib.contextmanager
def plain_forward() -> Iterator[None]:
    """No autograd, and torch's fused multi-head-attention fast path off (restored after)."""
    mha = getattr(torch.backends, "mha", None)
    prev = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(prev)


class FunctionalActivation(nn.Module):
    """The activation function an encoder layer calls as ``self.activation`` (``F.relu`` and
    ``F.gelu`` when given by name), held as a module so that its output is an activation site, named
    ``<layer>.activation`` like the graph bounds' failure layer. Computes exactly the function."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def expose_functional_activations(model: nn.Module) -> list[str]:
    """Wrap, in place, every ``TransformerEncoderLayer`` activation that is a plain function in a
    :class:`FunctionalActivation` (the same values, bit for bit); the wrapped names. For the
    injector's own copy of a model: the user's model is never changed."""
    done = []
    for name, m in model.named_modules():
        fn = m.__dict__.get("activation") if isinstance(m, nn.TransformerEncoderLayer) else None
        if fn is not None and callable(fn) and not isinstance(fn, nn.Module):
            m.activation = FunctionalActivation(fn)
            done.append(f"{name}.activation" if name else "activation")
    return done


def _eval(model: nn.Module) -> nn.Module:
    """Eval mode (a torch.export program's module refuses ``eval()``: it is fixed at export)."""
    try:
        return model.eval()
    except (NotImplementedError, RuntimeError):
        return model


def model_output(out: Any) -> Tensor:
    """The output tensor of a forward: a tensor, the first element of a tuple/list, or ``.logits``."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise HwrelError(f"model output of type {type(out).__name__} holds no tensor to measure")


def site_kind(param_name: str) -> str:
    """``bias`` when the last part of the parameter name contains "bias", else ``weight``."""
    return "bias" if "bias" in param_name.rsplit(".", 1)[-1] else "weight"


@dataclass(frozen=True)
class ParamSite:
    """One stored parameter tensor: ``numel`` words in ``fmt`` (integer codes: value
    ``scale * code``, scale fixed)."""

    name: str
    site: str
    shape: tuple[int, ...]
    fmt: Format

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ActSite:
    """One activation: output ``slot`` (None: the output itself) of call ``call`` of module
    ``module``; ``shape`` per sample (the whole tensor when not ``batched``)."""

    name: str
    module: str
    call: int
    slot: int | None
    shape: tuple[int, ...]
    batched: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _code_hook(writes: list["_Write"]):
    """Forward hook on a Brevitas weight quantizer: its output's values at the faulty codes
    replaced (scale, zero point and bit width kept)."""
    def hook(mod: nn.Module, inp: Any, out: Any) -> Any:
        val = out.value.clone()
        flat = val.view(-1)
        for w in writes:
            flat[w.index] = w.new.to(val.dtype)
        return type(out)(val, out.scale, out.zero_point, out.bit_width, out.signed, out.training)
    return hook


def _act_name(module: str, call: int, slot: int | None) -> str:
    return module + ("" if slot is None else f"[{slot}]") + ("" if call == 0 else f"@{call}")


def _tensors(out: Any) -> list[tuple[int | None, Tensor]]:
    if isinstance(out, Tensor):
        return [(None, out)]
    if isinstance(out, (tuple, list)):
        return [(k, t) for k, t in enumerate(out) if isinstance(t, Tensor)]
    return []


@dataclass
class _Write:
    """A resolved parameter fault: ``flat[index] = new`` (``old`` the stored value)."""

    param: str
    index: int
    old: Tensor  # 0-d, the parameter's dtype
    new: Tensor  # 0-d, the parameter's dtype
    quant: str | None = None  # Brevitas: the weight quantizer whose output value is replaced


@dataclass(frozen=True)
class _QuantWeight:
    """A Brevitas layer's integer weight codes as its quantizer computes them (scale and zero
    point per element, held fixed under faults)."""

    quantizer: str
    codes: Tensor  # flat int64
    scale: Tensor  # flat float32
    zero_point: Tensor  # flat float32
    value: Tensor  # flat float32, (code - zero_point) * scale
    fmt: IntFormat


def _brevitas_weights(model: nn.Module) -> dict[str, _QuantWeight]:
    """``{weight name: codes}`` of every Brevitas layer whose quantizer gives integer codes."""
    out = {}
    for path, mod in model.named_modules():
        if not (hasattr(mod, "weight_quant") and hasattr(mod, "quant_weight")
                and isinstance(getattr(mod, "weight", None), nn.Parameter)):
            continue
        try:
            with torch.no_grad():
                qw = mod.quant_weight()
            codes, value = qw.int(), qw.value
        except Exception:  # noqa: BLE001 - a float (unquantized) weight quantizer: a float weight
            continue
        if qw.bit_width is None or not bool(torch.isfinite(value).all()):
            continue
        flat = (lambda t: torch.as_tensor(t, dtype=torch.float32).expand_as(value).reshape(-1).clone())  # noqa: E731
        name = f"{path}.weight" if path else "weight"
        out[name] = _QuantWeight(f"{path}.weight_quant" if path else "weight_quant",
                                 codes.to(torch.int64).reshape(-1), flat(qw.scale), flat(qw.zero_point),
                                 value.detach().float().reshape(-1).clone(),
                                 IntFormat(int(qw.bit_width), bool(qw.signed)))
    return out
