"""The one representation every analysis reads: a network as a small DAG of typed nodes.

``Network.from_module`` extracts it once from a PyTorch or Brevitas module (see
:mod:`hwrel.extract`); bounds, quantization, soft-error analysis and injection all read it, and
nobody else walks ``nn.Module`` trees. The user's model is never modified: weights are copied
(batch norm folded into a float layer directly before it, else its own per-channel affine node).

Nodes, in topological order (``nodes[0]`` is the input, ``nodes[-1]`` the output):

- ``input``
- ``affine``: a linear map, dense or 2-D convolution, with bias (:class:`Affine`); an inference
  batch norm that cannot be folded is one too, a depthwise 1x1 convolution ``y_c = s_c x_c + t_c``
  (``Affine.batch_norm`` names it; a flat batch norm sits between two ``reshape`` nodes)
- ``act``: an elementwise activation, monotone or valley-shaped (:class:`hwrel.activations.Activation`)
- ``pool``: max or average pooling (:class:`Pool`)
- ``reshape``: flatten or view, per-sample shape given
- ``add``: residual addition of its inputs

*Hidden layers* (whose neurons can fail) are the ``act`` nodes that lie after some affine node and
before some other one; ``failures=[f_1..f_L]`` index them in order. *Synapse layers* are the
affine nodes; synapse failure counts index them in order (the last one feeds the output).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwrel.activations import Activation
from hwrel.errors import HwrelError

if TYPE_CHECKING:  # pandas only where a table is built: it costs a command's start-up
    import pandas as pd


@dataclass(frozen=True)
class Affine:
    """``y = W x + b`` as a dense layer or a 2-D convolution, batch norm folded in.

    ``weight`` is the value the model computes with: for Brevitas layers it equals
    ``scale * (codes - zero_point)``, and ``codes``/``scale``/``zero_point``/``bit_width``/``signed``
    describe how it is stored. ``None`` codes mean a float weight.
    """

    kind: str  # "linear" | "conv2d"
    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    codes: Tensor | None = None
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    bit_width: int | None = None
    signed: bool = True
    folded_bn: str | None = None
    batch_norm: str | None = None  # this node is that inference batch norm (per-channel scale and shift)
    fold_magnitude: Tensor | None = None  # per channel: |intermediate values| of the folded batch norm

    def __call__(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else bias
        if self.kind == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    @cached_property
    def abs_weight(self) -> Tensor:
        """``|W|``, computed once (the bounds use it many times)."""
        return self.weight.abs()

    def abs_map(self, e: Tensor) -> Tensor:
        """``|W| e`` (no bias): the positive linear map that propagates elementwise error radii."""
        w = self.abs_weight
        if self.kind == "linear":
            return F.linear(e, w)
        return F.conv2d(e, w, None, self.stride, self.padding, self.dilation, self.groups)

    @property
    def max_abs_weight(self) -> float:
        return float(self.weight.abs().max()) if self.weight.numel() else 0.0

    @property
    def fan_in(self) -> int:
        return int(self.weight[0].numel())


@dataclass(frozen=True)
class Pool:
    """2-D max or average pooling. ``divisor_override``: an average pool divides each window's sum
    by this instead of its size (``1`` makes it a sum pool)."""

    kind: str  # "max" | "avg"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode,
                            count_include_pad=self.count_include_pad, divisor_override=self.divisor_override)

    @property
    def gain(self) -> float:
        """Largest factor by which one output can exceed the largest input in absolute value (and
        an output error the largest input error): 1 for max and plain average pooling,
        ``kernel area / divisor`` for an overridden divisor."""
        if self.kind == "avg" and self.divisor_override is not None:
            return max(1.0, self.kernel[0] * self.kernel[1] / self.divisor_override)
        return 1.0

    @property
    def overlap(self) -> int:
        """Most windows any input element lies in (bounds the l1 growth of an error: each window
        weighs an element by at most 1, also with an overridden divisor >= 1)."""
        n = 1
        for k, s in zip(self.kernel, self.stride):
            n *= -(-k // s)
        return n


@dataclass(frozen=True)
class Node:
    name: str  # module path (or traced op name) it came from
    op: str  # "input" | "affine" | "act" | "pool" | "reshape" | "add"
    inputs: tuple[int, ...]
    shape: tuple[int, ...]  # per-sample output shape
    affine: Affine | None = None
    act: Activation | None = None
    pool: Pool | None = None

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def apply(self, xs: Sequence[Tensor]) -> Tensor:
        """Evaluate this node on its input values (batched, leading batch dim)."""
        if self.op == "affine":
            return self.affine(xs[0])
        if self.op == "act":
            return self.act(xs[0])
        if self.op == "pool":
            return self.pool(xs[0])
        if self.op == "reshape":
            return xs[0].reshape(xs[0].shape[0], *self.shape)
        if self.op == "add":
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        raise HwrelError(f"node {self.name}: cannot evaluate op {self.op!r}")


@dataclass(frozen=True)
class Network:
    """An analysable network: nodes in topological order plus the input domain.

    Attributes:
        nodes: the DAG, ``nodes[0]`` the input and ``nodes[-1]`` the output.
        input_shape: per-sample input shape.
        input_lo, input_hi: the input domain box (tensors of ``input_shape``).
        layers: indices of the hidden-layer ``act`` nodes (neuron failures index these).
        synapse_layers: indices of the affine nodes (synapse failures index these).
    """

    nodes: tuple[Node, ...]
    input_shape: tuple[int, ...]
    input_lo: Tensor
    input_hi: Tensor
    layers: tuple[int, ...] = field(default=())
    synapse_layers: tuple[int, ...] = field(default=())

    @staticmethod
    def from_module(model: nn.Module, input_domain: tuple[float, float] | tuple[Tensor, Tensor] = (0.0, 1.0),
                    input_shape: Sequence[int] | None = None) -> "Network":
        """Extract the network of ``model`` (see :func:`hwrel.extract.extract`)."""
        from hwrel.extract import extract

        return extract(model, input_domain=input_domain, input_shape=input_shape)

    # --- structure -------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_sizes(self) -> list[int]:
        """Neurons per hidden layer, ``N_1..N_L``."""
        return [self.nodes[i].size for i in self.layers]

    def synapse_counts(self) -> list[int]:
        """Synapses into each synapse layer (weights of the affine, counted once each)."""
        return [int(self.nodes[i].affine.weight.numel()) for i in self.synapse_layers]

    def layer_names(self) -> list[str]:
        return [self.nodes[i].name for i in self.layers]

    def consumers(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                out[j].append(i)
        return out

    def feeding_affine(self, layer_node: int) -> int | None:
        """The affine node directly feeding a hidden layer's activation (through nothing else)."""
        src = self.nodes[layer_node].inputs[0]
        return src if self.nodes[src].op == "affine" else None

    @property
    def num_parameters(self) -> int:
        n = 0
        for node in self.nodes:
            if node.affine is not None:
                n += node.affine.weight.numel() + (0 if node.affine.bias is None else node.affine.bias.numel())
        return n

    def to(self, dtype: torch.dtype = torch.float64, device: "torch.device | str | None" = None) -> "Network":
        """A copy with weights (and the input box) in ``dtype`` on ``device``.

        The bounds run in float64 so that their own rounding is far below the float32 errors they
        bound; quantized activations still evaluate in float32, as the model does.
        """
        def cv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        nodes = []
        for node in self.nodes:
            aff = node.affine
            if aff is not None:
                aff = replace(aff, weight=cv(aff.weight), bias=cv(aff.bias), scale=cv(aff.scale),
                              zero_point=cv(aff.zero_point), codes=None if aff.codes is None else aff.codes.to(device),
                              fold_magnitude=cv(aff.fold_magnitude))
            nodes.append(replace(node, affine=aff))
        return replace(self, nodes=tuple(nodes), input_lo=cv(self.input_lo), input_hi=cv(self.input_hi))

    # --- evaluation ------------------------------------------------------------------------

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Values of every node for a batch ``x`` of shape ``(B, *input_shape)``."""
        vals: list[Tensor] = []
        for node in self.nodes:
            if node.op == "input":
                vals.append(x)
            else:
                vals.append(node.apply([vals[j] for j in node.inputs]))
        return vals

    def forward(self, x: Tensor) -> Tensor:
        """Output for a batch; equals the source module's output (tested)."""
        return self.forward_all(x)[-1]

    def summary(self) -> pd.DataFrame:
        """Per hidden layer: neurons, max |weight| into it, Lipschitz constant, activation range.

        The activation range is the interval-propagated nominal range over the input domain
        (sound: every reachable value lies inside it).
        """
        from hwrel.bounds.ibp import interval_bounds

        lo, hi = interval_bounds(self, self.input_lo[None], self.input_hi[None])
        rows = []
        for k, i in enumerate(self.layers):
            node = self.nodes[i]
            src = self.feeding_affine(i)
            rows.append({
                "layer": k + 1,
                "name": node.name,
                "activation": node.act.kind,
                "neurons": node.size,
                "max_abs_weight": self.nodes[src].affine.max_abs_weight if src is not None else float("nan"),
                "lipschitz": node.act.lipschitz,
                "range_lo": float(lo[i].min()),
                "range_hi": float(hi[i].max()),
            })
        import pandas as pd

        return pd.DataFrame(rows)

    def affine_summary(self) -> pd.DataFrame:
        """Per affine node: kind, weight shape, parameters, storage (float or intB codes)."""
        rows = []
        for k, i in enumerate(self.synapse_layers):
            a = self.nodes[i].affine
            rows.append({
                "synapse_layer": k + 1,
                "name": self.nodes[i].name,
                "kind": a.kind,
                "weight_shape": tuple(a.weight.shape),
                "parameters": a.weight.numel() + (0 if a.bias is None else a.bias.numel()),
                "max_abs_weight": a.max_abs_weight,
                "storage": "float32" if a.bit_width is None else f"int{a.bit_width}" if a.signed else f"uint{a.bit_width}",
                "folded_bn": a.folded_bn or "",
                "batch_norm": a.batch_norm or "",
            })
        import pandas as pd

        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (f"Network({len(self.nodes)} nodes, {self.num_layers} hidden layers {self.layer_sizes()}, "
                f"{self.num_parameters} parameters, input {self.input_shape})")
