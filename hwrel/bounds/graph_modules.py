"""Trace-time decompositions of the torch.nn modules the graph bounds read operation by operation:
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``.

torch.fx keeps torch.nn modules whole (leaves), and these two have data-dependent control flow it
cannot trace. :class:`hwrel.bounds.graph._Tracer` calls the functions here instead of the module,
on proxies: they emit the calls the module's own forward makes with torch's fused fast path off
(``hwrel.inject.general_sites.plain_forward``, torch 2.13's ``F.multi_head_attention_forward``),
in the same order, on the same layouts, with the same constants. The traced graph therefore
computes bit for bit what the module computes (``tests/test_graph_modules.py`` checks it on every
configuration it covers), and every node of it is an operation :mod:`hwrel.bounds.graph_rules`
has a rule for: the packed in-projection is one ``F.linear``, the heads index maps, attention
``F.scaled_dot_product_attention`` (``need_weights=False``) or ``bmm``/``baddbmm``, ``softmax``,
``bmm`` (``need_weights=True``), the out-projection ``F.linear``. The masks (``attn_mask``,
``key_padding_mask``, bool or float) never depend on the input box: one node, :func:`mha_mask`,
turns them into the additive float mask torch uses, by torch's own code.

Failure layers: the activation of a ``TransformerEncoderLayer`` at ``<layer path>.activation`` (its
attribute: the module path where it is a module, the same name where it is a function such as
``F.gelu``, recorded in ``node.meta[LAYER]``). A layer that is not ``batch_first`` computes it on
``(T, B, F)``; ``node.meta[BATCH_DIM] = 1`` says so (failures are counted per sample either way).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from hwrel.errors import UnsupportedLayerError

LAYER = "hwrel_layer"  # node.meta key: the failure layer's name, where it is not the node's own
BATCH_DIM = "hwrel_batch_dim"  # node.meta key: the sample dimension of a failure layer, where not 0


def mha_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, bsz: int, num_heads: int,
             tgt_len: int, src_len: int, extra_keys: int, need_weights: bool,
             is_causal: bool) -> tuple[Tensor | None, bool]:
    """The additive float attention mask ``F.multi_head_attention_forward`` builds from the
    module's masks, and its ``is_causal`` (its own steps, in its order): canonical float masks
    (bool ``True``: ``-inf``), the mask dropped for SDPA's causal hint where it may be, ``attn_mask``
    3-D, padded by ``extra_keys`` columns (``bias_k``, ``add_zero_attn``), the key padding mask
    merged in, and shaped for SDPA (``need_weights`` False) or ``baddbmm``."""
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=torch.float32)
    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal needs attn_mask (torch's rule for MultiheadAttention)")
    if is_causal and key_padding_mask is None and not need_weights:
        return None, True  # SDPA's causal hint in place of the mask
    if key_padding_mask is not None:
        is_causal = False
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=torch.float32, check_other=False)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"the 2-D attn_mask is {tuple(attn_mask.shape)}, expected {(tgt_len, src_len)}")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() != 3 or attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} is not supported")
    for _ in range(extra_keys):
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len += extra_keys
    if key_padding_mask is not None:
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not need_weights and attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    return attn_mask, bool(is_causal)


def encoder_causal(mask: Tensor, is_causal: bool | None, size: int) -> bool:
    """``nn.TransformerEncoder``'s causal hint: its own detection on its canonical float mask."""
    from torch.nn.modules.transformer import _detect_is_causal_mask

    mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="", target_type=torch.float32,
                             check_other=False)
    return _detect_is_causal_mask(mask, is_causal, size)


def _parts(b: Any, split: Callable[[Any], Any], n: int) -> list[Any]:
    """A bias split as the in-projection splits it (indexed, not unpacked: ``b`` may be a proxy)."""
    if b is None:
        return [None] * n
    parts = split(b)
    return [parts[i] for i in range(n)]


def _packed(proj: Any, n: int, E: int) -> list[Any]:
    proj = proj.unflatten(-1, (n, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return [proj[i] for i in range(n)]


def multihead_attention(tracer: fx.Tracer, m: nn.MultiheadAttention, name: str, query: Any, key: Any, value: Any,
                        key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
                        average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Any, Any]:
    """``m(query, key, value, ...)`` on batched (3-D) inputs, as its eval-mode forward computes it:
    ``(output, weights or None)``."""
    if m.training and m.dropout > 0:
        raise UnsupportedLayerError(f"layer {name} (MultiheadAttention) is in training mode with dropout")
    if m.batch_first:  # the module's transposes, keeping the identity of shared inputs
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    E, H = m.embed_dim, m.num_heads
    D = E // H
    tgt_len, bsz, src_len = query.size(0), query.size(1), key.size(0)
    masked = attn_mask is not None or key_padding_mask is not None
    if not masked and is_causal is True:
        raise UnsupportedLayerError(f"layer {name} (MultiheadAttention): is_causal needs attn_mask (torch's rule)")
    # in-projection (F._in_projection_packed / F._in_projection)
    w, b = m.in_proj_weight, m.in_proj_bias
    if m._qkv_same_embed_dim:
        if key is value and query is key:
            q, k, v = _packed(F.linear(query, w, b), 3, E)
        elif key is value:
            ws, bs = w.split([E, E * 2]), _parts(b, lambda t: t.split([E, E * 2]), 2)
            q = F.linear(query, ws[0], bs[0])
            k, v = _packed(F.linear(key, ws[1], bs[1]), 2, E)
        else:
            ws, bs = w.chunk(3), _parts(b, lambda t: t.chunk(3), 3)
            q, k, v = F.linear(query, ws[0], bs[0]), F.linear(key, ws[1], bs[1]), F.linear(value, ws[2], bs[2])
    else:
        bs = _parts(b, lambda t: t.chunk(3), 3)
        q, k, v = (F.linear(query, m.q_proj_weight, bs[0]), F.linear(key, m.k_proj_weight, bs[1]),
                   F.linear(value, m.v_proj_weight, bs[2]))
    extra = 0
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
        extra += 1
    q = q.view(tgt_len, bsz * H, D).transpose(0, 1)
    k = k.view(k.shape[0], bsz * H, D).transpose(0, 1)
    v = v.view(v.shape[0], bsz * H, D).transpose(0, 1)
    if m.add_zero_attn:
        k = torch.cat([k, torch.zeros((bsz * H, 1, D), dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros((bsz * H, 1, D), dtype=v.dtype, device=v.device)], dim=1)
        extra += 1
    src_len = k.size(1)
    mask, causal = None, False  # is_causal is a value of the trace where masks are (the encoder detects it)
    if masked:
        both = tracer.create_proxy("call_function", mha_mask, (attn_mask, key_padding_mask, bsz, H, tgt_len,
                                                               src_len - extra, extra, need_weights, is_causal), {})
        mask, causal = both[0], both[1]
    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(D))
        kt = k.transpose(-2, -1)
        s = torch.bmm(q_scaled, kt) if mask is None else torch.baddbmm(mask, q_scaled, kt)
        p = F.softmax(s, dim=-1)
        out = torch.bmm(p, v).transpose(0, 1).reshape(tgt_len * bsz, E)
        weights = p.view(bsz, H, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        q, k, v = q.view(bsz, H, tgt_len, D), k.view(bsz, H, src_len, D), v.view(bsz, H, src_len, D)
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, E)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    out = out.view(tgt_len, bsz, out.size(1))
    if m.batch_first:
        out = out.transpose(1, 0)
    return out, weights


def transformer_encoder_layer(tracer: fx.Tracer, m: nn.TransformerEncoderLayer, name: str, src: Any,
                              src_mask: Any = None, src_key_padding_mask: Any = None, is_causal: bool = False) -> Any:
    """``m(src, ...)``: its slow-path forward (``norm_first`` or not; the self-attention block by
    :func:`multihead_attention`, whose masks handling is torch's own); the activation is the
    failure layer ``<name>.activation``."""
    def act(x: Any) -> Any:
        y = m.activation(x)
        if isinstance(y, fx.Proxy):
            y.node.meta[LAYER] = f"{name}.activation" if name else "activation"
            if not m.self_attn.batch_first:
                y.node.meta[BATCH_DIM] = 1
        return y

    def sa(x: Any) -> Any:
        return m.dropout1(m.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                      need_weights=False, is_causal=is_causal)[0])

    def ff(x: Any) -> Any:
        return m.dropout2(m.linear2(m.dropout(act(m.linear1(x)))))

    x = src
    if m.norm_first:
        x = x + sa(m.norm1(x))
        return x + ff(m.norm2(x))
    x = m.norm1(x + sa(x))
    return m.norm2(x + ff(x))


def transformer_encoder(tracer: fx.Tracer, m: nn.TransformerEncoder, name: str, src: Any, mask: Any = None,
                        src_key_padding_mask: Any = None, is_causal: bool | None = None) -> Any:
    """``m(src, ...)`` with the fast path off (so no nested tensors): its causal detection, each
    layer by :func:`transformer_encoder_layer`, the final norm."""
    if mask is None:
        is_causal = is_causal is True
    else:
        size = src.size(1 if m.layers[0].self_attn.batch_first else 0)
        is_causal = tracer.create_proxy("call_function", encoder_causal, (mask, is_causal, size), {})
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
    return out if m.norm is None else m.norm(out)


DECOMPOSITIONS: dict[type, Callable[..., Any]] = {
    nn.MultiheadAttention: multihead_attention,
    nn.TransformerEncoderLayer: transformer_encoder_layer,
    nn.TransformerEncoder: transformer_encoder,
}

__all__ = ["BATCH_DIM", "DECOMPOSITIONS", "LAYER", "encoder_causal", "mha_mask", "multihead_attention",
           "transformer_encoder", "transformer_encoder_layer"]
