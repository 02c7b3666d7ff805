"""Target values, fast path: per step, recompute only what depends on δ.

δ is added to h^L (the output of decoder layer L) at each row's last subject token s.
Nothing at positions < s, and nothing at layers ≤ L, depends on δ. So, once per group
and without gradients, one ordinary forward pass over the same right-padded rows as
`optimize_value` gives
  (a) h^L at every position (a hook on layer L), of which each row's suffix [s, end)
      is kept;
  (b) every layer's attention keys/values (the pass's DynamicCache), of which the
      layers > L and the columns [0, s) of each row are kept: the prefix keys/values;
  (c) the unedited essence distribution and the unedited target log-probabilities.
The suffixes are packed, unpadded, into chunks of about CHUNK token slots (one batch
row per chunk, several rows per chunk): suffix lengths differ, and padding every row to
the longest one computed 1.7× the tokens on 10 CounterFact facts, and one small batch per
length leaves the matrix products too small to run at full speed on a CPU. Each step
then starts from the packed suffixes with δ added at each row's first slot, runs only
the decoder layers L+1 … last, each slot attending to its own row's cached prefix
keys/values (a chunk's prefix is its rows' prefixes one after another) and causally to
its own row's slots, with position ids continuing from s, and applies the final norm
and the LM head only at the scored positions.

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
# token slots per packed chunk: longer chunks attend to more masked-out prefix columns,
# shorter ones leave more slots unused at their ends
CHUNK = 32


@dataclass
class _Arch:
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
                h = self.layers[i](h, attention_mask=mask, position_ids=position_ids, past_key_values=kv,
                                   use_cache=False, position_embeddings=pe)
            else:
                h = self.layers[i](h, past_key_values=kv, attention_mask=mask, use_cache=False)
            h = _hidden(h)
        return h


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


class _PrefixKV:
    """Read-only cache: each attention sees its layer's cached prefix before the new keys."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.kv[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)


@dataclass
class _Packed:
    """A view's suffixes packed into c chunks of C token slots, one batch row per chunk:
    no step computes padding, and every linear layer sees all tokens in one product.
    Each chunk's attention sees the concatenated prefixes of its rows, masked per row."""

    h: torch.Tensor               # (c, C, d) h^L at each slot (zeros in unused slots)
    first: torch.Tensor           # (n_view,) flat slot of each row's first suffix token (gets δ)
    scored: torch.Tensor          # (n_scored,) flat slot of each scored position, in score order
    position_ids: torch.Tensor    # (c, C)
    pe: tuple | None              # rotary (cos, sin) at position_ids (rope only)
    mask: torch.Tensor            # (c, 1, C, Pc + C)
    kv: _PrefixKV                 # layers after L: (c, kv_heads, Pc, head_dim)


class _FastForward:
    """Everything one group's steps reuse, and the per-step forward from layer L+1."""

    def __init__(self, model, arch: _Arch, layer_module: str, g: GroupRows, pad_id: int):
        device = next(model.parameters()).device
        self.arch = arch
        self.lm_head = model.get_output_embeddings()
        ids, mask = pad_rows(g.rows, pad_id, device)
        n, T = ids.shape
        self.n_rows = n
        self.table = torch.arange(n, device=device)   # the view's rows, as rows of the tables below
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
        self.kv = {}
        for i in range(arch.L + 1, len(arch.layers)):
            layer = cache.layers[i]
            k, v = layer.keys, layer.values
            if k.shape[0] != n or k.shape[-2] != T:
                raise _Unsupported(f"cache of layer {i} has shape {tuple(k.shape)}")
            self.kv[i] = (k[:, :, :P].detach().clone(), v[:, :, :P].detach().clone())
        del cache, out

        # suffixes [s, len) right-padded to the longest (buckets take each row's own length)
        self.length = lens - subj                                           # (n,)
        j = torch.arange(int(self.length.max()), device=device)
        src = torch.minimum(subj[:, None] + j, lens[:, None] - 1)          # (n, S)
        self.h_suffix = hL.gather(1, src[..., None].expand(-1, -1, hL.shape[-1])).contiguous()
        self.position_ids = subj[:, None] + j                               # (n, S)

        # scored positions relative to each row's s
        self.p_rel = self.p_idx - subj[self.r_idx]
        self.ess_rel = self.ess_pos - subj[self.ess_rows]
        self.n_tgt = len(self.r_idx)
        self.n_after = len(arch.layers) - arch.L - 1
        self._pack()

    def _score_full(self, h: torch.Tensor):
        """(target log-probs, essence log-probs) from final hidden states (n, T, d)."""
        logp = torch.log_softmax(self.lm_head(h[self.r_idx, self.p_idx]).float(), dim=-1)
        ess_logp = torch.log_softmax(self.lm_head(h[self.ess_rows, self.ess_pos]).float(), dim=-1)
        return logp.gather(1, self.t_idx[:, None])[:, 0], ess_logp         # (n_tgt,), (n_ess, vocab)

    def _pack(self) -> None:
        """Pack the view's suffixes into chunks (first fit, longest first)."""
        length = self.length[self.table].tolist()
        C = max(min(CHUNK, sum(length)), max(length))
        chunk, start, used = [0] * len(length), [0] * len(length), []
        for r in sorted(range(len(length)), key=lambda r: -length[r]):
            c = next((c for c, u in enumerate(used) if u + length[r] <= C), len(used))
            if c == len(used):
                used.append(0)
            chunk[r], start[r] = c, used[c]
            used[c] += length[r]
        n_chunks, device = len(used), self.table.device
        first = torch.tensor(chunk, device=device) * C + torch.tensor(start, device=device)   # (n_view,)

        # each slot's row and suffix position; -1: unused
        owner = torch.full((n_chunks * C,), -1, dtype=torch.long, device=device)
        j = torch.zeros(n_chunks * C, dtype=torch.long, device=device)
        for r, ell in enumerate(length):
            owner[first[r] : first[r] + ell] = r
            j[first[r] : first[r] + ell] = torch.arange(ell, device=device)
        t = self.table[owner.clamp(min=0)]
        used_slot = owner >= 0
        h = torch.where(used_slot[:, None], self.h_suffix[t, j], 0).view(n_chunks, C, -1)
        position_ids = torch.where(used_slot, self.subj[t] + j, 0).view(n_chunks, C)

        # each chunk's prefix columns: its rows' positions [0, s), in slot order; -1: unused
        rows_of = [[r for r in range(len(length)) if chunk[r] == c] for c in range(n_chunks)]
        s_view = self.subj[self.table].tolist()
        Pc = max(sum(s_view[r] for r in rows) for rows in rows_of)
        pre_owner = torch.full((n_chunks, Pc), -1, dtype=torch.long, device=device)
        pre_pos = torch.zeros((n_chunks, Pc), dtype=torch.long, device=device)
        for c, rows in enumerate(rows_of):
            at = 0
            for r in sorted(rows, key=lambda r: start[r]):
                pre_owner[c, at : at + s_view[r]] = r
                pre_pos[c, at : at + s_view[r]] = torch.arange(s_view[r], device=device)
                at += s_view[r]
        pre_t = self.table[pre_owner.clamp(min=0)]
        kv = _PrefixKV({i: (k[pre_t, :, pre_pos].transpose(1, 2).contiguous(),
                            v[pre_t, :, pre_pos].transpose(1, 2).contiguous())
                        for i, (k, v) in self.kv.items()})                    # (c, kv_heads, Pc, hd)

        # a slot sees its own row's prefix, and its own row's slots up to itself
        q_owner = owner.view(n_chunks, C)
        slot = torch.arange(C, device=device)
        prefix_ok = (q_owner[:, :, None] == pre_owner[:, None, :]) & (q_owner[:, :, None] >= 0)
        causal = (q_owner[:, :, None] == q_owner[:, None, :]) & (slot[None, :] <= slot[:, None])
        mask = self.arch.mask(torch.cat([prefix_ok, causal], dim=-1)[:, None], h.dtype)   # (c, 1, C, Pc + C)

        score_rows = torch.cat([self.r_idx, self.ess_rows])                     # view rows
        scored = first[score_rows] + torch.cat([self.p_rel, self.ess_rel])
        pe = self.arch.rotary(h, position_ids) if self.arch.kind == "rope" else None
        self.packed = _Packed(h, first, scored, position_ids, pe, mask, kv)

    def select(self, keep: torch.Tensor) -> "_FastForward":
        """A view computing only rows `keep` (sorted indices): the steps of a joint
        optimization skip groups that reached their early stop. Scores keep their order."""
        view = copy.copy(self)
        remap = torch.full((self.n_rows,), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(len(keep), device=keep.device)
        view.table = self.table[keep]
        sel_t = remap[self.r_idx] >= 0
        sel_e = remap[self.ess_rows] >= 0
        view.r_idx, view.t_idx, view.p_rel = remap[self.r_idx[sel_t]], self.t_idx[sel_t], self.p_rel[sel_t]
        view.ess_rows, view.ess_rel = remap[self.ess_rows[sel_e]], self.ess_rel[sel_e]
        view.n_tgt = int(sel_t.sum())
        view.n_rows = len(keep)
        view.fact_rows = [int(remap[i]) for i in self.fact_rows if remap[i] >= 0]
        view._pack()
        return view

    @property
    def token_layer_passes(self) -> int:
        return int(self.length[self.table].sum()) * self.n_after

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """delta: (d,) for every row, or (n_rows, d) one per row."""
        a, p = self.arch, self.packed
        c, C, d = p.h.shape
        delta = delta.expand(self.n_rows, d) if delta.dim() == 1 else delta
        add = torch.zeros(c * C, d, dtype=delta.dtype, device=delta.device).index_add(0, p.first, delta)
        h = (p.h + add.view(c, C, d)).to(p.h.dtype)                          # δ at each row's s
        h = a.run(h, a.L + 1, len(a.layers), p.mask, p.position_ids, p.pe, p.kv)
        # final norm and LM head only at the scored positions, in one product (the head's
        # weights are read once per step): target positions, then the essence rows' last
        logp = torch.log_softmax(self.lm_head(a.norm(h.reshape(c * C, d)[p.scored])).float(), dim=-1)
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
