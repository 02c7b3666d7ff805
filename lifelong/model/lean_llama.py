"""A fused forward of Llama-style decoder layers, for the per-step pass of the value loop.

The fast value loop runs the layers after L on a few hundred packed tokens per step, in
forward and backward, dozens of times per fact. Through the transformers modules each layer
costs seven matrix products (q, k, v, o, gate, up, down), three copies of its rotary code
path and an RMSNorm of five element-wise kernels. Here q/k/v and gate/up are each one
product on weights concatenated once, the norm is `F.rms_norm`, and rotary runs
once on q and k together. The arithmetic is the same; on SmolLM2 a step takes about a
tenth less time.

Only layers whose structure is exactly Llama's are taken (class names, RMSNorm, SiLU gate,
no q/k norms, no sliding window); anything else keeps the transformers modules. The value
loop checks its first forward against the model's own either way.

The concatenated weights (about 200 MB for SmolLM2's layers after L) are made once per
decoder layer and reused by every later wave or group, until a weight of that layer is
written in place (its version counter moves) or replaced (its storage moves).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


@dataclass
class LeanLayer:
    """One decoder layer's weights, fused for the per-step forward."""

    qkv: torch.Tensor              # (H·hd + 2·KV·hd, d) q, k, v projections stacked
    qkv_bias: torch.Tensor | None
    o: torch.Tensor                # (d, H·hd)
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor          # (2·ff, d) gate, up stacked
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor             # (d, ff)
    down_bias: torch.Tensor | None
    norm_in: torch.Tensor          # (d,) RMSNorm weights
    norm_post: torch.Tensor
    eps_in: float
    eps_post: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


# per decoder layer: (stamp of the weights it was fused from, the fused layer); a wave of the
# joint loop, or each group when alignment is on, reuses it instead of concatenating again
_FUSED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, LeanLayer]]" = weakref.WeakKeyDictionary()


def lean_layers(model, layers, lo: int, hi: int) -> dict[int, LeanLayer] | None:
    """Fused weights of layers lo … hi-1, or None when any of them is not plainly Llama's."""
    cfg = model.config
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return None
    out = {}
    for i in range(lo, hi):
        projs = _projections(layers[i])
        if projs is None:
            return None
        layer = layers[i]
        sources = [t for m in projs for t in (m.weight, m.bias) if t is not None] + \
                  [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        stamp = tuple((t.data_ptr(), t._version) for t in sources)  # changes if a weight is written
        cached = _FUSED.get(layer)
        if cached is None or cached[0] != stamp:
            fused = _fuse(layer, projs)
            if fused is None:
                return None
            _FUSED[layer] = cached = (stamp, fused)
        out[i] = cached[1]
    return out


def _projections(layer) -> list[torch.nn.Linear] | None:
    """q, k, v, o, gate, up, down of a layer that is plainly Llama's, else None."""
    if type(layer).__name__ not in _LAYERS:
        return None
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    n_in, n_post = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    if attn is None or mlp is None or any(hasattr(attn, x) for x in ("q_norm", "k_norm")):
        return None
    if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in (n_in, n_post)):
        return None
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        return None
    projs = [getattr(attn, x, None) for x in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [getattr(mlp, x, None) for x in ("gate_proj", "up_proj", "down_proj")]
    return projs if all(isinstance(p, torch.nn.Linear) for p in projs) else None


def _fuse(layer, projs: list[torch.nn.Linear]) -> LeanLayer | None:
    attn = layer.self_attn
    q, k, v, o, gate, up, down = projs
    hd = attn.head_dim
    kv_heads = k.out_features // hd
    heads = q.out_features // hd
    if heads * hd != q.out_features or kv_heads * hd != k.out_features or v.out_features != k.out_features \
            or heads % kv_heads:
        return None
    n_in, n_post = layer.input_layernorm, layer.post_attention_layernorm
    with torch.no_grad():
        return LeanLayer(
            qkv=torch.cat([q.weight, k.weight, v.weight]),
            qkv_bias=_cat_bias([q, k, v]),
            o=o.weight, o_bias=o.bias,
            gate_up=torch.cat([gate.weight, up.weight]),
            gate_up_bias=_cat_bias([gate, up]),
            down=down.weight, down_bias=down.bias,
            norm_in=n_in.weight, norm_post=n_post.weight,
            eps_in=float(n_in.variance_epsilon), eps_post=float(n_post.variance_epsilon),
            heads=heads, kv_heads=kv_heads, head_dim=hd, scaling=float(attn.scaling),
        )


def _cat_bias(linears) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                                    device=m.weight.device) for m in linears])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def run_lean(lean: dict[int, LeanLayer], h: torch.Tensor, lo: int, hi: int, mask: torch.Tensor,
             pe: tuple[torch.Tensor, torch.Tensor], prefix: dict[int, tuple[torch.Tensor, torch.Tensor]]
             ) -> torch.Tensor:
    """Layers lo … hi-1 on h (c, C, d): mask (c, 1, C, P + C) boolean (allowed) or additive;
    pe: rotary (cos, sin) (c, C, hd); prefix: per layer cached (keys, values) (c, KV, P, hd)."""
    c, C, d = h.shape
    cos, sin = pe[0][:, None], pe[1][:, None]                                    # (c, 1, C, hd)
    for i in range(lo, hi):
        w = lean[i]
        H, KV, hd = w.heads, w.kv_heads, w.head_dim
        x = F.rms_norm(h, (d,), w.norm_in, w.eps_in)
        qkv = F.linear(x, w.qkv, w.qkv_bias).view(c, C, H + 2 * KV, hd).transpose(1, 2)  # (c, heads, C, hd)
        qk = qkv[:, : H + KV]
        qk = qk * cos + _rotate_half(qk) * sin
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        if i in prefix:
            pk, pv = prefix[i]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w.scaling, enable_gqa=H != KV)
        h = h + F.linear(a.transpose(1, 2).reshape(c, C, H * hd), w.o, w.o_bias)
        x = F.rms_norm(h, (d,), w.norm_post, w.eps_post)
        gate, up = F.linear(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, w.down, w.down_bias)
    return h
