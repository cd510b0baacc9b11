"""Where hwrel computes: turning a user's ``--device``/``device=`` into a usable ``torch.device``.

Bounds and campaigns give the same results on a GPU as on the CPU up to float rounding: bounds are
computed in float64 (agreement to ~1e-12 relative, far below the float32 errors they bound);
injection measures float32 forwards, whose sums a GPU may round differently (``max_abs_delta``
agrees to ~1e-5 relative; a top-1 decision can differ only where two logits tie to within that
rounding). That needs true float32 arithmetic: by default cuDNN convolutions on Ampere and later
GPUs use TF32 (10-bit mantissa, ~1e-3 relative), so hwrel computes inside :func:`exact_float32`.
Tests: ``tests/test_cuda.py`` (skipped without a GPU).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from hwrel.errors import HwrelError

#: Stated CPU/GPU agreement (relative) of float32 injection metrics and of float64 bounds.
INJECT_RTOL = 1e-5
BOUNDS_RTOL = 1e-9


def _cuda_count() -> int:
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):  # a broken driver reads as "no GPU"
        return 0


def parse_device(name: str | torch.device | None) -> torch.device:
    """The ``torch.device`` named by ``name`` (``None`` means the CPU), checked for syntax and
    supported type only, not for presence (a Ray cluster may have GPUs the driver lacks)."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        dev = name
    else:
        if not isinstance(name, str) or not name.strip():
            raise HwrelError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
        try:
            dev = torch.device(name.strip().lower())
        except RuntimeError:
            raise HwrelError(f"unknown device {name!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise HwrelError(f"device {str(dev)!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise HwrelError(f"device {str(dev)!r}: the CPU takes no index; use 'cpu'")
    return dev


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """A device that exists on this machine: ``"cpu"``, ``"cuda"`` (GPU 0, or the current one) or
    ``"cuda:N"``. Raises :class:`HwrelError` (one line) for unknown names, for CUDA without a GPU
    (or a torch built without CUDA) and for a GPU index out of range."""
    dev = parse_device(name)
    if dev.type == "cpu":
        return torch.device("cpu")
    n = _cuda_count()
    if n == 0:
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "torch finds no CUDA device")
        raise HwrelError(f"CUDA requested but no GPU is available ({why}); use --device cpu")
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= n:
        raise HwrelError(f"device {str(dev)!r}: only {n} GPU(s) available (cuda:0..cuda:{n - 1})")
    return dev


def cuda_available() -> bool:
    """Whether a usable CUDA GPU is present (what ``@pytest.mark.cuda`` tests skip on)."""
    return _cuda_count() > 0


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Within the block, float32 matmuls and cuDNN convolutions on a GPU use full float32 (no
    TF32), so GPU results agree with the CPU to float32 rounding; the flags are restored after."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
