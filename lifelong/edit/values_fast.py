"""Target values, fast path: per step, recompute only what depends on δ.

δ is added to h^L (the output of decoder layer L) at each row's last subject token s.
Nothing at positions < s, and nothing at layers ≤ L, depends on δ. So, once per group
(or wave of groups) and without gradients:
  (a) tokens that rows share before their s — a context, mostly: the same context
      opens a row of every fact — go through the model once, as stems, whose keys/values
      at every layer are a cached prefix to each row holding them;
  (b) the rest of every row goes through layers 0 … L after its stem: h^L, of which each
      row's suffix [s, end) is kept;
  (c) the positions [stem, s) go on through the layers after L: with the stem's, these
      keys/values are the prefix each row's suffix attends to.
Every pass packs its tokens, unpadded, into chunks of at most CHUNK token slots (one batch
row per chunk, several rows per chunk): lengths differ, and padding every suffix to the
longest one computed 1.7× the tokens on 10 CounterFact facts, while one small batch per
length leaves the matrix products too small to run at full speed on a CPU. Each step
then starts from the packed suffixes with δ added at each row's first slot, runs only
the decoder layers L+1 … last, each slot attending to its own row's cached prefix
(a chunk's prefix is its rows' prefixes one after another) and causally to its own
row's slots, with position ids continuing from s, and applies the final norm and the
LM head only at the scored positions.

Cached prefixes are handed to the attention modules through `_PrefixKV`, a read-only
stand-in for a transformers cache whose `update` returns cat(prefix, new) and stores
nothing (the passes of (c) record the new keys/values there), so no step can mutate it
and gradients never flow into it.

Loss, Adam, clamp, early stop and the result fields are those of `optimize_value`. At
step 0 (δ = 0) the fast forward is checked against the model's own forward over the
first group's rows; a model whose structure is not recognised, or that fails this
check, falls back to `optimize_value` with a log line.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch

from lifelong.edit.alignment import AlignmentTerm
from lifelong.facts import Fact
from lifelong.model.hf_cache import cache_of
from lifelong.model.lean_llama import lean_layers, run_lean
from lifelong.model.prompts import Row, pad_rows, target_index
from lifelong.model.decoder import Decoder, recognise
from lifelong.model.hooks import _Stop
from lifelong.edit.values import (
    GroupRows,
    ValueResult,
    _Abort,
    make_optimizer,
    optimize_value,
    run_steps,
    scored_logp,
)

log = logging.getLogger(__name__)

# largest |Δ log p| allowed between the fast and the ordinary forward at δ = 0
_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
_CHECK_TOL_LOW = 5e-2  # half precisions
# run the steps' layers through lean_llama where the layers are plainly Llama's
LEAN = True
# most token slots per packed chunk (unless a segment is longer): each slot attends to all
# of its chunk's prefix columns, masked or not
CHUNK = 32


class _PrefixKV:
    """Read-only cache: each attention sees its layer's cached prefix (if any) before the
    new keys; with `record`, the new keys/values of each layer are kept there."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], record: dict | None = None):
        self.kv, self.record = kv, record

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record is not None:
            self.record[layer_idx] = (key_states, value_states)
        if layer_idx not in self.kv:
            return key_states, value_states
        k, v = self.kv[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)


class _Packing:
    """Token segments of rows packed, unpadded, into chunks of equal length (at most CHUNK
    slots, unless a segment is longer), one batch row per chunk, so that every linear layer
    sees all tokens in one product.

    Row r puts seg[r] tokens into consecutive slots of one chunk (first fit, longest
    first); they attend causally to each other and to pre[r] cached prefix columns of their
    own (a chunk's prefix is its rows' prefixes one after another), to nothing else."""

    def __init__(self, seg: list[int], pre: list[int], device):
        n = len(seg)
        # the chunk length, up to CHUNK (or the longest segment), that leaves the fewest unused slots
        C, (chunk, start, used) = min(((C, _first_fit(seg, C)) for C in range(max(seg), max(CHUNK, max(seg)) + 1)),
                                      key=lambda x: len(x[1][2]) * x[0])
        self.n_chunks, self.C = len(used), C
        # every packed token as (row, j), row by row, and its flat slot
        long = dict(dtype=torch.long, device=device)
        self.row = torch.tensor([r for r in range(n) for _ in range(seg[r])], **long)
        self.j = torch.tensor([j for r in range(n) for j in range(seg[r])], **long)
        self.first = torch.tensor(chunk, **long) * C + torch.tensor(start, **long)        # (n,)
        self.slot = self.first[self.row] + self.j                                         # (Σ seg,)
        owner = torch.full((self.n_chunks * C,), -1, **long)
        owner[self.slot] = self.row
        owner = owner.view(self.n_chunks, C)

        cols = [[] for _ in used]          # per chunk: (row, position) of each prefix column
        for r in sorted(range(n), key=lambda r: start[r]):
            if seg[r]:
                cols[chunk[r]] += [(r, p) for p in range(pre[r])]
        Pc = max(len(c) for c in cols)
        self.pre_row = torch.full((self.n_chunks, Pc), -1, **long)
        self.pre_pos = torch.zeros((self.n_chunks, Pc), **long)
        for c, cs in enumerate(cols):
            if cs:
                self.pre_row[c, : len(cs)] = torch.tensor([r for r, _ in cs], **long)
                self.pre_pos[c, : len(cs)] = torch.tensor([p for _, p in cs], **long)

        # a slot sees its own row's prefix columns and its own row's slots up to itself
        slot = torch.arange(C, device=device)
        prefix_ok = (owner[:, :, None] == self.pre_row[:, None, :]) & (owner[:, :, None] >= 0)
        causal = (owner[:, :, None] == owner[:, None, :]) & (slot[None, :] <= slot[:, None])
        self.allowed = torch.cat([prefix_ok, causal], dim=-1)[:, None]           # (c, 1, C, Pc + C)

    def pack(self, table: torch.Tensor, src: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """(c, C, d): slot (r, j) holds table[src[r], offset[r] + j]; unused slots 0."""
        x = torch.zeros(self.n_chunks * self.C, table.shape[-1], dtype=table.dtype, device=table.device)
        x[self.slot] = table[src[self.row], offset[self.row] + self.j]
        return x.view(self.n_chunks, self.C, -1)

    def positions(self, offset: torch.Tensor) -> torch.Tensor:
        """(c, C) position ids: offset[r] + j."""
        p = torch.zeros(self.n_chunks * self.C, dtype=torch.long, device=offset.device)
        p[self.slot] = offset[self.row] + self.j
        return p.view(self.n_chunks, self.C)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(Σ seg, …) from (c, C, …): the packed tokens, row by row."""
        return x.reshape(self.n_chunks * self.C, *x.shape[2:])[self.slot]

    def prefix(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], src: torch.Tensor,
               record: dict | None = None) -> _PrefixKV:
        """Each chunk's prefix columns from tables (m, kv_heads, W, hd), row r reading src[r]."""
        if self.pre_row.shape[1] == 0:
            return _PrefixKV({}, record)
        t = src[self.pre_row.clamp(min=0)]                                           # (c, Pc)
        return _PrefixKV({i: (k[t, :, self.pre_pos].transpose(1, 2).contiguous(),
                              v[t, :, self.pre_pos].transpose(1, 2).contiguous())
                          for i, (k, v) in kv.items()}, record)                      # (c, kv_heads, Pc, hd)


def _first_fit(seg: list[int], C: int) -> tuple[list[int], list[int], list[int]]:
    """Segments into chunks of C slots, longest first, each into the first chunk with room:
    (chunk of each row, its first slot there, slots used per chunk)."""
    chunk, start, used = [0] * len(seg), [0] * len(seg), []
    for r in sorted(range(len(seg)), key=lambda r: -seg[r]):
        c = next((c for c, u in enumerate(used) if u + seg[r] <= C), len(used))
        if c == len(used):
            used.append(0)
        chunk[r], start[r] = c, used[c]
        used[c] += seg[r]
    return chunk, start, used


def _shared_prefixes(rows: list[tuple[int, ...]], caps: list[int]) -> list[int]:
    """Per row, the length of the longest token prefix (at most caps[r]) another row shares."""
    order = sorted(range(len(rows)), key=lambda r: rows[r])
    k = [0] * len(rows)
    for a, b in zip(order, order[1:]):
        n = 0
        while n < min(len(rows[a]), len(rows[b])) and rows[a][n] == rows[b][n]:
            n += 1
        k[a], k[b] = max(k[a], n), max(k[b], n)
    return [min(x, c) for x, c in zip(k, caps)]


def _embeddings(model, arch: Decoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input of the first decoder layer (n, T, d): the model's token (and position) embeddings."""
    got = {}

    def pre(_m, args):
        got["h"] = args[0]
        raise _Stop

    handle = arch.layers[0].register_forward_pre_hook(pre)
    try:
        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["h"]


def _stems(model, ids, lens, subj, pad_id: int, n_layers: int):
    """Tokens a row shares with another before its s (a context, mostly), computed once as
    a stem through every layer. Returns (stem length per row (n,), stem of each row (n,),
    {layer: (keys, values) (n_stems, kv_heads, width, hd)}, empty when no row has one)."""
    device = ids.device
    rows = [tuple(ids[r, : lens[r]].tolist()) for r in range(ids.shape[0])]
    k = _shared_prefixes(rows, subj.tolist())
    stems = sorted({rows[r][: k[r]] for r in range(len(rows)) if k[r]})
    index = {x: i for i, x in enumerate(stems)}
    stem_of = torch.tensor([index.get(rows[r][: k[r]], 0) for r in range(len(rows))], device=device)
    kv = {}
    if stems:
        s_ids, s_mask = pad_rows([Row(x, len(x), -1) for x in stems], pad_id, device)
        cache = cache_of(model.base_model(input_ids=s_ids, attention_mask=s_mask, use_cache=True))
        for i in range(n_layers):
            sk, sv = cache.layers[i].keys, cache.layers[i].values
            if sk.shape[0] != len(stems) or sk.shape[-2] != s_ids.shape[1]:
                raise _Unsupported(f"cache of layer {i} has shape {tuple(sk.shape)}")
            kv[i] = (sk, sv)
    return torch.tensor(k, device=device), stem_of, kv


@dataclass
class _Packed:
    """A view's suffixes as the steps run them."""

    h: torch.Tensor               # (c, C, d) h^L at each slot (zeros in unused slots)
    first: torch.Tensor           # (n_view,) flat slot of each row's first suffix token (gets δ)
    scored: torch.Tensor          # (n_scored,) flat slot of each scored position, in score order
    position_ids: torch.Tensor    # (c, C)
    pe: tuple | None              # rotary (cos, sin) at position_ids (rope only)
    mask: torch.Tensor            # (c, 1, C, Pc + C)
    kv: _PrefixKV                 # layers after L: (c, kv_heads, Pc, head_dim)


class _FastForward:
    """Everything one group's steps reuse, and the per-step forward from layer L+1."""

    def __init__(self, model, arch: Decoder, g: GroupRows, pad_id: int, checked: int):
        """checked: the first rows, whose log-probabilities at δ = 0 the model's own
        forward gives for `error` to compare with."""
        device = next(model.parameters()).device
        self.arch = arch
        self.lm_head = model.get_output_embeddings()
        ids, mask = pad_rows(g.rows, pad_id, device)
        if arch.window is not None and ids.shape[1] > arch.window:
            raise _Unsupported(f"rows of {ids.shape[1]} tokens, longer than the sliding window ({arch.window})")
        n, L, n_layers = ids.shape[0], arch.L, len(arch.layers)
        self.n_rows = n
        self.table = torch.arange(n, device=device)   # the view's rows, as rows of the tables below
        subj = torch.tensor([r.subject_pos for r in g.rows], device=device)
        lens = mask.sum(1)
        self.subj, self.length = subj, lens - subj                         # length: suffix [s, len)

        # scored (row, position, token) triples, as in optimize_value
        fact_rows = [i for i, f in enumerate(g.fact_of_row) if f >= 0]
        r_idx, p_idx, t_idx = target_index([g.rows[i] for i in fact_rows], device)
        self.fact_rows = fact_rows
        self.r_idx = torch.tensor(fact_rows, device=device)[r_idx]
        self.p_idx, self.t_idx = p_idx, t_idx
        self.ess_rows = torch.tensor([i for i, f in enumerate(g.fact_of_row) if f < 0], device=device)
        self.ess_pos = torch.tensor([g.rows[i].prompt_len - 1 for i in self.ess_rows.tolist()], device=device)
        self.p_rel = self.p_idx - subj[self.r_idx]
        self.ess_rel = self.ess_pos - subj[self.ess_rows]
        self.n_tgt = len(self.r_idx)
        self.n_after = n_layers - L - 1

        with torch.no_grad():
            self._reference(model, ids[:checked], mask[:checked])
            k, stem_of, stem_kv = _stems(model, ids, lens, subj, pad_id, n_layers)
            # the rest [k, len) of every row through layers 0 … L after its stem: h^L
            emb = _embeddings(model, arch, ids, mask)                        # (n, T, d)
            rest = _Packing((lens - k).tolist(), k.tolist(), device)
            h = arch.run(rest.pack(emb, self.table, k), 0, L + 1, arch.mask(rest.allowed, emb.dtype),
                         rest.positions(k), kv=rest.prefix({i: stem_kv[i] for i in range(L + 1) if i in stem_kv},
                                                           stem_of))
            self.hL = torch.zeros_like(emb)                                  # (n, T, d), h^L at [k, len)
            self.hL[rest.row, k[rest.row] + rest.j] = rest.unpack(h)
            self.h_norm = float(self.hL[0, subj[0]].float().norm())
            self.h_at_subject = self.hL[self.table, subj].float()            # (n, d)
            self.kv = self._prefix_after_L(k, stem_of, stem_kv)
        self.lean = lean_layers(model, arch.layers, L + 1, n_layers) if LEAN and arch.kind == "rope" else None
        self._pack()

    def _reference(self, model, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Log-probabilities at δ = 0 of the scored positions in rows ids, by the model's own forward."""
        n, w = ids.shape[0], int(mask.sum(1).max())
        h = model.base_model(input_ids=ids[:, :w], attention_mask=mask[:, :w]).last_hidden_state
        self.ref_t, self.ref_e = self.r_idx < n, self.ess_rows < n
        at = torch.cat([h[self.r_idx[self.ref_t], self.p_idx[self.ref_t]],
                        h[self.ess_rows[self.ref_e], self.ess_pos[self.ref_e]]])
        self.ref_tok_logp, self.ref_ess_logp, _ = scored_logp(self.lm_head, at, self.t_idx[self.ref_t])

    def _prefix_after_L(self, k, stem_of, stem_kv) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the layers after L at [0, s) of every row (n, kv_heads, max s, hd):
        the stem's, then [k, s) run through those layers from h^L."""
        a, n, device = self.arch, self.n_rows, k.device
        P = int(self.subj.max())
        if not P:
            return {}
        record = {}
        mid = _Packing((self.subj - k).tolist(), k.tolist(), device)
        if int((self.subj - k).sum()):
            a.run(mid.pack(self.hL, self.table, k), a.L + 1, len(a.layers), a.mask(mid.allowed, self.hL.dtype),
                  mid.positions(k), kv=mid.prefix({i: kv for i, kv in stem_kv.items() if i > a.L}, stem_of, record))
        stem_r = torch.tensor([r for r in range(n) for _ in range(int(k[r]))], dtype=torch.long, device=device)
        stem_p = torch.tensor([p for r in range(n) for p in range(int(k[r]))], dtype=torch.long, device=device)
        out = {}
        for i in range(a.L + 1, len(a.layers)):
            pair = []
            for which in (0, 1):                                              # keys, values
                src = stem_kv[i][which] if stem_kv else record[i][which]
                x = torch.zeros(n, src.shape[1], P, src.shape[-1], dtype=src.dtype, device=device)
                if stem_kv:
                    x[stem_r, :, stem_p] = stem_kv[i][which][stem_of[stem_r], :, stem_p]
                if i in record:
                    x[mid.row, :, k[mid.row] + mid.j] = mid.unpack(record[i][which].transpose(1, 2))
                pair.append(x)
            out[i] = tuple(pair)
        return out

    def error(self, tok_logp: torch.Tensor, ess_logp: torch.Tensor) -> float:
        """Largest |Δ log p| on the checked rows between the model's forward and this one's
        at δ = 0 (tok_logp, ess_logp: the full view's output)."""
        return max(float((tok_logp[self.ref_t] - self.ref_tok_logp).abs().max()),
                   float((ess_logp[self.ref_e] - self.ref_ess_logp).abs().max()))

    def _pack(self) -> None:
        t = self.table
        s = self.subj[t]
        lay = _Packing(self.length[t].tolist(), s.tolist(), t.device)
        h = lay.pack(self.hL, t, s)
        position_ids = lay.positions(s)
        scored = lay.first[torch.cat([self.r_idx, self.ess_rows])] + torch.cat([self.p_rel, self.ess_rel])
        pe = self.arch.rope(h, position_ids) if self.arch.kind == "rope" else None
        self.packed = _Packed(h, lay.first, scored, position_ids, pe, self.arch.mask(lay.allowed, h.dtype),
                              lay.prefix(self.kv, t))

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

    def __call__(self, delta: torch.Tensor, margins: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """delta: (d,) for every row, or (n_rows, d) one per row. Returns `scored_logp`'s triple."""
        a, p = self.arch, self.packed
        c, C, d = p.h.shape
        delta = delta.expand(self.n_rows, d) if delta.dim() == 1 else delta
        add = torch.zeros(c * C, d, dtype=delta.dtype, device=delta.device).index_add(0, p.first, delta)
        h = (p.h + add.view(c, C, d)).to(p.h.dtype)                          # δ at each row's s
        if self.lean is not None:
            h = run_lean(self.lean, h, a.L + 1, len(a.layers), p.mask, p.pe, p.kv.kv)
        else:
            h = a.run(h, a.L + 1, len(a.layers), p.mask, p.position_ids, p.pe, p.kv)
        # final norm and LM head only at the scored positions, in one product (the head's
        # weights are read once per step): target positions, then the essence rows' last
        return scored_logp(self.lm_head, a.norm(h.reshape(c * C, d)[p.scored]), self.t_idx, margins)


class _Unsupported(Exception):
    pass


def optimize_value_fast(model, tok, facts: list[Fact], contexts: list[str], layer_module: str,
                        policy, align: AlignmentTerm | None, seed: int = 0,
                        metric: torch.Tensor | None = None) -> ValueResult:
    """`optimize_value` recomputing per step only the layers after L at positions ≥ s.

    Same signature, loss, steps, Adam, clamp, early stop and result; falls back to
    `optimize_value` (logging why) when the model's structure is not recognised.
    """
    t0 = time.perf_counter()

    def fallback() -> ValueResult:  # the whole model per step, LM head only where scored: the same δ
        return optimize_value(model, tok, facts, contexts, layer_module, policy, align, seed=seed, full_logits=False,
                              metric=metric)

    arch = recognise(model, layer_module)
    if isinstance(arch, str):
        log.warning("fast value optimization unavailable (%s): using the straightforward loop", arch)
        return fallback()
    device = next(model.parameters()).device
    g = GroupRows.build(tok, facts, contexts)
    try:
        fwd = _FastForward(model, arch, g, tok.pad_token_id, checked=len(g.rows))
    except (_Unsupported, AttributeError, IndexError) as e:
        log.warning("fast value optimization unavailable (%s): using the straightforward loop", e)
        return fallback()

    fact_rows, r_idx, n_ctx = fwd.fact_rows, fwd.r_idx, len(contexts)
    margins = policy.experiment.stop_margin is not None
    torch.manual_seed(seed)
    delta = torch.zeros(fwd.hL.shape[-1], device=device, requires_grad=True)
    opt = make_optimizer(delta, policy, fwd.h_norm, metric)
    tol = _CHECK_TOL.get(fwd.hL.dtype, _CHECK_TOL_LOW)

    def check(tok_logp, ess_logp):  # δ = 0: the fast forward must reproduce the ordinary one
        err = fwd.error(tok_logp, ess_logp)
        if not err <= tol:
            log.warning("fast value forward differs from the model's by %.3g at δ = 0: "
                        "using the straightforward loop", err)
            raise _Abort

    try:
        steps, nll_start, nll_val, margin = run_steps(lambda: fwd(delta, margins), delta, opt, fwd.n_rows, r_idx, fact_rows,
                                                      n_ctx, None, fwd.h_norm, policy, align, check_first=check)
    except _Abort:
        return fallback()
    return ValueResult(
        delta=delta.detach().clone(), h_norm=fwd.h_norm, steps=steps, nll=nll_val, margin=margin,
        nll_start=nll_start, seconds=time.perf_counter() - t0,
        token_layer_passes=fwd.token_layer_passes,
    )
