"""Target values, fast path: per step, recompute only what depends on δ.

δ is added to h^L (the output of decoder layer L) at each row's last subject token s.
Nothing at positions < s, and nothing at layers ≤ L, depends on δ. So, once per group
and without gradients, one ordinary forward pass over the same right-padded rows as
`optimize_value` gives
  (a) h^L at every position (a hook on layer L), of which each row's suffix [s, end)
      is kept, right-padded to the longest suffix;
  (b) every layer's attention keys/values (the pass's DynamicCache), of which the
      layers > L and the columns [0, max s) are kept: the prefix keys/values;
  (c) the unedited essence distribution and the unedited target log-probabilities.
Each step then starts from the cached suffix with δ added at relative position 0, runs
only the decoder layers L+1 … last, each attending to its cached prefix keys/values
(columns ≥ the row's own s are masked out, so rows with different s share one cache
without re-padding) and causally to the suffix, with position ids continuing from s,
and applies the final norm and the LM head only at the scored positions.

The cached prefix is handed to the attention modules through `_PrefixKV`, a read-only
stand-in for a transformers cache whose `update` returns cat(prefix, new) and stores
nothing, so no step can mutate it and gradients never flow into it.

Loss, Adam, clamp, early stop and the result fields are those of `optimize_value`. At
step 0 (δ = 0) the fast forward is checked against the ordinary pass (c); a model whose
structure is not recognised, or that fails this check, falls back to `optimize_value`
with a log line.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch

from .alignment import AlignmentTerm
from .facts import Fact
from .prompts import pad_rows, target_index
from .trace import _hidden, hooks
from .values import GroupRows, ValueResult, _Abort, optimize_value, run_steps

log = logging.getLogger(__name__)

# largest |Δ log p| allowed between the fast and the ordinary forward at δ = 0
_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
_CHECK_TOL_LOW = 5e-2  # half precisions


@dataclass
class _Arch:
    """The parts of a decoder the fast path drives directly."""

    kind: str                        # "rope" (Llama-like) | "learned" (GPT-2-like)
    layers: torch.nn.ModuleList      # decoder layers, in order
    norm: torch.nn.Module            # final norm
    rotary: torch.nn.Module | None   # rotary embedding module (rope only)
    L: int                           # index of the layer whose output gets δ


def _recognise(model, layer_module: str) -> _Arch | str:
    """The decoder's structure, or a reason it is not handled."""
    base = model.base_model
    cfg = model.config
    if hasattr(base, "layers") and hasattr(base, "norm") and hasattr(base, "rotary_emb"):
        arch = _Arch("rope", base.layers, base.norm, base.rotary_emb, -1)
        attn_name = "self_attn"
    elif hasattr(base, "h") and hasattr(base, "ln_f") and hasattr(base, "wpe"):
        arch = _Arch("learned", base.h, base.ln_f, None, -1)
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


class _PrefixKV:
    """Read-only cache: each attention sees its layer's cached prefix before the new keys."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.kv[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)


class _FastForward:
    """Everything one group's steps reuse, and the per-step forward from layer L+1."""

    def __init__(self, model, arch: _Arch, layer_module: str, g: GroupRows, pad_id: int):
        device = next(model.parameters()).device
        self.arch = arch
        self.lm_head = model.get_output_embeddings()
        ids, mask = pad_rows(g.rows, pad_id, device)
        n, T = ids.shape
        self.n_rows, self.width = n, T
        subj = torch.tensor([r.subject_pos for r in g.rows], device=device)
        lens = mask.sum(1)

        # scored (row, position, token) triples, as in optimize_value
        fact_rows = [i for i, f in enumerate(g.fact_of_row) if f >= 0]
        r_idx, p_idx, t_idx = target_index([g.rows[i] for i in fact_rows], device)
        self.fact_rows = fact_rows
        self.r_idx = torch.tensor(fact_rows, device=device)[r_idx]
        self.p_idx, self.t_idx = p_idx, t_idx
        self.ess_rows = torch.tensor([i for i, f in enumerate(g.fact_of_row) if f < 0], device=device)
        self.ess_pos = torch.tensor([g.rows[i].prompt_len - 1 for i in self.ess_rows.tolist()], device=device)

        # one ordinary pass (no grad): h^L everywhere, every layer's keys/values, and the
        # unedited log-probabilities
        got = {}

        def post(_m, _a, output):
            got["h"] = _hidden(output).detach()

        with hooks(model, {layer_module: ("post", post)}), torch.no_grad():
            out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)
            h_last = out.last_hidden_state
            self.ref_tok_logp, self.ess_init = self._score_full(h_last)
        hL = got["h"]                                            # (n, T, d)
        self.subj = subj
        self.h_norm = float(hL[0, subj[0]].float().norm())
        self.h_at_subject = hL[torch.arange(n, device=device), subj].float()   # (n, d)

        # prefix keys/values of the layers after L, columns [0, max s)
        P = int(subj.max())
        cache = out.past_key_values
        kv = {}
        for i in range(arch.L + 1, len(arch.layers)):
            layer = cache.layers[i]
            k, v = layer.keys, layer.values
            if k.shape[0] != n or k.shape[-2] != T:
                raise _Unsupported(f"cache of layer {i} has shape {tuple(k.shape)}")
            kv[i] = (k[:, :, :P].detach().clone(), v[:, :, :P].detach().clone())
        self.kv = _PrefixKV(kv)
        del cache, out

        # suffixes [s, len) right-padded to S; padded slots copy the row's last token
        S = int((lens - subj).max())
        j = torch.arange(S, device=device)
        src = torch.minimum(subj[:, None] + j, lens[:, None] - 1)          # (n, S)
        self.h_suffix = hL.gather(1, src[..., None].expand(-1, -1, hL.shape[-1])).contiguous()
        self.position_ids = subj[:, None] + j                               # (n, S)
        self.S = S

        # attention mask (n, 1, S, P + S): cached column c iff c < s_row; new key j' iff j' ≤ j
        prefix_ok = (torch.arange(P, device=device)[None, None, :] < subj[:, None, None]).expand(n, S, P)
        causal = (j[None, :] <= j[:, None])[None].expand(n, S, S)
        allowed = torch.cat([prefix_ok, causal], dim=-1)[:, None]
        dtype = hL.dtype
        if model.config._attn_implementation == "sdpa":
            self.mask = allowed
        else:
            self.mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min)

        # scored positions relative to each row's s
        self.p_rel = self.p_idx - subj[self.r_idx]
        self.ess_rel = self.ess_pos - subj[self.ess_rows]
        self.score_rows = torch.cat([self.r_idx, self.ess_rows])
        self.score_cols = torch.cat([self.p_rel, self.ess_rel])
        self.n_tgt = len(self.r_idx)
        self.n_after = len(arch.layers) - arch.L - 1

    def _score_full(self, h: torch.Tensor):
        """(target log-probs, essence log-probs) from final hidden states (n, T, d)."""
        logp = torch.log_softmax(self.lm_head(h[self.r_idx, self.p_idx]).float(), dim=-1)
        ess_logp = torch.log_softmax(self.lm_head(h[self.ess_rows, self.ess_pos]).float(), dim=-1)
        return logp.gather(1, self.t_idx[:, None])[:, 0], ess_logp         # (n_tgt,), (n_ess, vocab)

    def select(self, keep: torch.Tensor) -> "_FastForward":
        """A view computing only rows `keep` (sorted indices): the steps of a joint
        optimization skip groups that reached their early stop. Scores keep their order."""
        view = copy.copy(self)
        remap = torch.full((self.n_rows,), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(len(keep), device=keep.device)
        view.h_suffix = self.h_suffix[keep]
        view.position_ids = self.position_ids[keep]
        view.mask = self.mask[keep]
        view.kv = _PrefixKV({i: (k[keep], v[keep]) for i, (k, v) in self.kv.kv.items()})
        sel_t = remap[self.r_idx] >= 0
        sel_e = remap[self.ess_rows] >= 0
        view.r_idx, view.t_idx, view.p_rel = remap[self.r_idx[sel_t]], self.t_idx[sel_t], self.p_rel[sel_t]
        view.ess_rows, view.ess_rel = remap[self.ess_rows[sel_e]], self.ess_rel[sel_e]
        view.score_rows = torch.cat([view.r_idx, view.ess_rows])
        view.score_cols = torch.cat([view.p_rel, view.ess_rel])
        view.n_tgt = int(sel_t.sum())
        view.n_rows = len(keep)
        view.fact_rows = [int(remap[i]) for i in self.fact_rows if remap[i] >= 0]
        return view

    @property
    def token_layer_passes(self) -> int:
        return self.n_rows * self.S * self.n_after

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """delta: (d,) for every row, or (n_rows, d) one per row."""
        a = self.arch
        hs = self.h_suffix
        first = (hs[:, 0] + delta).to(hs.dtype)
        h = torch.cat([first[:, None], hs[:, 1:]], dim=1)                   # (n, S, d)
        if a.kind == "rope":
            pe = a.rotary(h, self.position_ids)
            for i in range(a.L + 1, len(a.layers)):
                h = _hidden(a.layers[i](h, attention_mask=self.mask, position_ids=self.position_ids,
                                        past_key_values=self.kv, use_cache=False, position_embeddings=pe))
        else:
            for i in range(a.L + 1, len(a.layers)):
                h = _hidden(a.layers[i](h, past_key_values=self.kv, attention_mask=self.mask, use_cache=False))
        # final norm and LM head only at the scored positions, in one product (the head's
        # weights are read once per step): target positions, then the essence row's last
        logp = torch.log_softmax(self.lm_head(a.norm(h[self.score_rows, self.score_cols])).float(), dim=-1)
        return logp[: self.n_tgt].gather(1, self.t_idx[:, None])[:, 0], logp[self.n_tgt:]


class _Unsupported(Exception):
    pass


def optimize_value_fast(model, tok, facts: list[Fact], contexts: list[str], layer_module: str,
                        policy, align: AlignmentTerm | None, seed: int = 0) -> ValueResult:
    """`optimize_value` recomputing per step only the layers after L at positions ≥ s.

    Same signature, loss, steps, Adam, clamp, early stop and result; falls back to
    `optimize_value` (logging why) when the model's structure is not recognised.
    """
    t0 = time.perf_counter()
    arch = _recognise(model, layer_module)
    if isinstance(arch, str):
        log.warning("fast value optimization unavailable (%s): using the straightforward loop", arch)
        return optimize_value(model, tok, facts, contexts, layer_module, policy, align, seed=seed)
    device = next(model.parameters()).device
    g = GroupRows.build(tok, facts, contexts)
    try:
        fwd = _FastForward(model, arch, layer_module, g, tok.pad_token_id)
    except (_Unsupported, AttributeError, IndexError) as e:
        log.warning("fast value optimization unavailable (%s): using the straightforward loop", e)
        return optimize_value(model, tok, facts, contexts, layer_module, policy, align, seed=seed)

    h_norm = fwd.h_norm
    fact_rows, r_idx, n_ctx = fwd.fact_rows, fwd.r_idx, len(contexts)
    ess_init = fwd.ess_init
    torch.manual_seed(seed)
    delta = torch.zeros(fwd.h_suffix.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=policy.lr)
    tol = _CHECK_TOL.get(fwd.h_suffix.dtype, _CHECK_TOL_LOW)

    def check(tok_logp, ess_logp):  # δ = 0: the fast forward must reproduce the ordinary one
        err = max(float((tok_logp - fwd.ref_tok_logp).abs().max()), float((ess_logp - ess_init).abs().max()))
        if not err <= tol:
            log.warning("fast value forward differs from the model's by %.3g at δ = 0: "
                        "using the straightforward loop", err)
            raise _Abort

    try:
        steps, nll_start, nll_val = run_steps(lambda: fwd(delta), delta, opt, fwd.n_rows, r_idx, fact_rows,
                                              n_ctx, ess_init, h_norm, policy, align, check_first=check)
    except _Abort:
        return optimize_value(model, tok, facts, contexts, layer_module, policy, align, seed=seed)
    return ValueResult(
        delta=delta.detach().clone(), h_norm=h_norm, steps=steps, nll=nll_val,
        nll_start=nll_start, seconds=time.perf_counter() - t0,
        token_layer_passes=fwd.token_layer_passes,
    )
