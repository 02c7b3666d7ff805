"""Recognising a decoder's structure, so the fast value path can drive its layers directly.

Llama-like (rotary) and GPT-2-like (learned positions) decoders are recognised from the
loaded transformers module; anything else gets a reason string, and the callers fall back
to the model's own forward. Gemma 3 is Llama-like with two rotary tables (one per layer
type) and sliding-window layers; its rows (a few dozen tokens) are far shorter than the
window, where a sliding layer attends exactly as a full one, so one mask serves every layer.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from lifelong.model.hf_cache import cache_kwarg
from lifelong.model.hooks import _hidden


# the longest row the value and key passes run (context prefix + prompt + target); a
# sliding window at least this long attends exactly like full attention
MAX_ROW_TOKENS = 256


@dataclass
class Decoder:
    """The parts of a decoder the fast path drives directly."""

    kind: str                        # "rope" (Llama-like) | "learned" (GPT-2-like)
    layers: torch.nn.ModuleList      # decoder layers, in order
    norm: torch.nn.Module            # final norm
    rotary: torch.nn.Module | None   # rotary embedding module (rope only)
    L: int                           # index of the layer whose output gets δ
    sdpa: bool = True                # attention implementation: sdpa (else eager)
    layer_types: list[str] | None = None  # per layer, the rotary table it takes (Gemma 3); None: one table
    window: int | None = None        # the shortest sliding window: rows must not be longer

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor):
        """The rotary (cos, sin) at position_ids: one pair, or one per layer type."""
        if self.layer_types is None:
            return self.rotary(h, position_ids)
        return {t: self.rotary(h, position_ids, t) for t in sorted(set(self.layer_types))}

    def _pe(self, pe, i: int):
        return pe[self.layer_types[i]] if self.layer_types is not None else pe

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
            pe = self.rope(h, position_ids)
        for i in range(lo, hi):
            if self.kind == "rope":
                h = self.layers[i](h, attention_mask=mask, position_ids=position_ids, use_cache=False,
                                   position_embeddings=self._pe(pe, i), **{cache_kwarg(self.layers[i]): kv})
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
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        return "logit soft-capping"
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t not in ("full_attention", "sliding_attention") for t in types):
        return f"layer types {sorted(set(types))}"
    if types is not None and "sliding_attention" in types:
        arch.window = getattr(cfg, "sliding_window", None)
        if not arch.window or arch.window < MAX_ROW_TOKENS:
            return f"a sliding window of {arch.window} tokens, shorter than the rows ({MAX_ROW_TOKENS})"
    if types is not None and arch.kind == "rope":
        if "layer_type" in inspect.signature(arch.rotary.forward).parameters:
            arch.layer_types = list(types)
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


# the norm some decoders (Gemma 2/3, OLMo 2) apply to the MLP's output before adding it to the stream
_POST_MLP_NORMS = ("post_feedforward_layernorm",)


def output_norm(model, module_name: str) -> torch.nn.Module | None:
    """The norm between the edited module's output and the residual stream, or None where
    the output is added as it is (Llama, GPT-2). Only a module inside the layer's MLP whose
    output is the MLP's output (the down projection) is handled; Gemma 3 norms it."""
    parts = module_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        layer = model.get_submodule(".".join(parts[:cut]))
        norm = next((getattr(layer, n) for n in _POST_MLP_NORMS if hasattr(layer, n)), None)
        if norm is not None and parts[cut] == "mlp":
            return norm
    return None
