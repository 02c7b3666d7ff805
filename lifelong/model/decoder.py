"""Recognising a decoder's structure, so the fast value path can drive its layers directly.

Llama-like (rotary) and GPT-2-like (learned positions) decoders are recognised from the
loaded transformers module; anything else gets a reason string, and the callers fall back
to the model's own forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.model.hf_cache import cache_kwarg
from lifelong.model.hooks import _hidden


@dataclass
class Decoder:
    """The parts of a decoder the fast path drives directly."""

    kind: str                        # "rope" (Llama-like) | "learned" (GPT-2-like)
    layers: torch.nn.ModuleList      # decoder layers, in order
    norm: torch.nn.Module            # final norm
    rotary: torch.nn.Module | None   # rotary embedding module (rope only)
    L: int                           # index of the layer whose output gets δ
    sdpa: bool = True                # attention implementation: sdpa (else eager)

    def mask(self, allowed: torch.Tensor, dtype) -> torch.Tensor:
        """An attention mask (n, 1, q, k) as the implementation takes it, from where attending is allowed."""
        if self.sdpa:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def run(self, h: torch.Tensor, lo: int, hi: int, mask, position_ids, pe=None, kv=None) -> torch.Tensor:
        """Decoder layers lo … hi-1 on h (n, T, d); pe: rotary (cos, sin) at position_ids,
        computed here if None; kv: a cache holding keys/values before these positions."""
        if self.kind == "rope" and pe is None:
            pe = self.rotary(h, position_ids)
        for i in range(lo, hi):
            if self.kind == "rope":
                h = self.layers[i](h, attention_mask=mask, position_ids=position_ids, use_cache=False,
                                   position_embeddings=pe, **{cache_kwarg(self.layers[i]): kv})
            else:
                h = self.layers[i](h, attention_mask=mask, use_cache=False, **{cache_kwarg(self.layers[i]): kv})
            h = _hidden(h)
        return h


def recognise(model, layer_module: str) -> Decoder | str:
    """The decoder's structure, or a reason it is not handled."""
    base = model.base_model
    cfg = model.config
    if hasattr(base, "layers") and hasattr(base, "norm") and hasattr(base, "rotary_emb"):
        arch = Decoder("rope", base.layers, base.norm, base.rotary_emb, -1)
        attn_name = "self_attn"
    elif hasattr(base, "h") and hasattr(base, "ln_f") and hasattr(base, "wpe"):
        arch = Decoder("learned", base.h, base.ln_f, None, -1)
        attn_name = "attn"
        if getattr(cfg, "add_cross_attention", False):
            return "cross-attention decoder"
    else:
        return f"no known decoder layout in {type(base).__name__}"
    if not isinstance(arch.layers, torch.nn.ModuleList):
        return "decoder layers are not a ModuleList"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return f"attention implementation {impl!r}"
    arch.sdpa = impl == "sdpa"
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return "layers other than full attention"
    try:
        target = model.get_submodule(layer_module)
    except AttributeError:
        return f"no module {layer_module!r}"
    for i, layer in enumerate(arch.layers):
        attn = getattr(layer, attn_name, None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            return f"layer {i} has no {attn_name}.layer_idx == {i}"
        if layer is target:
            arch.L = i
    if arch.L < 0:
        return f"{layer_module!r} is not one of the decoder layers"
    return arch
