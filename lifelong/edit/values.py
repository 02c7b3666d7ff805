"""Target values: the residual δ one group of facts needs at the last edited layer.

δ is added to h^L (the output of decoder layer L) at the last subject token of every
row, and optimized (Adam, or normalized gradient steps: `make_optimizer`) on
  Σ_facts mean_contexts NLL(target) + kl_factor·KL(essence) + weight_decay·‖δ‖²/‖h‖²
  + EAMET alignment against the residual bank,
with ‖δ‖ clamped to clamp_norm_factor·‖h‖ (a norm of the same space as δ).

`optimize_value` is the reference: the authors' loop (ROME/MEMIT `compute_v`), one
group after another, every row through the whole model at every step, logits at every
position and log_softmax over all of them (rows, seq, vocab) before the target tokens
are gathered. The fast loops (values_fast, values_batched) are checked against it and
fall back to it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lifelong.edit.alignment import AlignmentTerm
from lifelong.errors import EditFailed
from lifelong.facts import Fact
from lifelong.model.prompts import Row, make_row, pad_rows, target_index
from lifelong.model.hooks import add_at_positions, hooks, layer_outputs

ESSENCE_TEMPLATE = "{} is a"


@dataclass
class ValueResult:
    delta: torch.Tensor          # (d_model,) optimized residual
    h_norm: float                # ‖h^L‖ at the subject, bare prompt
    steps: int                   # optimization steps taken
    nll: float                   # final target NLL (sum over the group's facts)
    nll_start: float
    seconds: float
    token_layer_passes: int      # per step: rows × positions × layers recomputed
    margin: float = float("nan")  # with stop_margin: final min over targets of log p(target) − max log p(other)


@dataclass
class GroupRows:
    """Every row one group's optimization runs, built once."""

    rows: list[Row]              # fact × context rows, then one essence row
    fact_of_row: list[int]       # index into the group's facts (-1: essence row)
    n_facts: int

    @classmethod
    def build(cls, tok, facts: list[Fact], contexts: list[str]) -> "GroupRows":
        rows, owner = [], []
        for i, fact in enumerate(facts):
            for ctx in contexts:
                rows.append(make_row(tok, ctx, fact.prompt, fact.subject, fact.target))
                owner.append(i)
        rows.append(make_row(tok, "{}", ESSENCE_TEMPLATE, facts[0].subject, None))
        owner.append(-1)
        for r, f in zip(rows, owner):
            if r.subject_pos < 0:
                who = facts[f].render() if f >= 0 else facts[0].subject
                raise EditFailed(f"could not locate the subject's last token in {who!r}")
        return cls(rows, owner, len(facts))


def target_logp(logp: torch.Tensor, t_idx: torch.Tensor,
                margins: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per scored position (rows of logp (n_tgt, vocab)): the target token's log-prob, and
    (with margins) its lead over the most probable other token (> 0: the target is the
    argmax; no gradient), else None: one more pass over the vocabulary a step needs only
    when the policy stops on margins."""
    tok = logp.gather(1, t_idx[:, None])[:, 0]
    if not margins:
        return tok, None
    with torch.no_grad():
        top = logp.detach().topk(2, dim=1)
        other = torch.where(top.indices[:, 0] == t_idx, top.values[:, 1], top.values[:, 0])
    return tok, tok.detach() - other


def scored_logp(head, hidden: torch.Tensor, t_idx: torch.Tensor,
                margins: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The LM head in one product over hidden (n_tgt + n_ess, d): the first len(t_idx) rows
    are target positions, the rest essence rows. Returns (log-prob of each target token
    (n_tgt,), the essence rows' log-probs (n_ess, vocab), with margins each target's
    margin (n_tgt,) else None)."""
    logp = torch.log_softmax(head(hidden).float(), dim=-1)
    n = len(t_idx)
    tok, margin = target_logp(logp[:n], t_idx, margins)
    return tok, logp[n:], margin


def reached_stop(nll: float, margin: float, policy) -> bool:
    """The early stop: the target NLL below early_stop_loss, or (with stop_margin set) every
    target token the argmax by at least stop_margin nats in every context."""
    return nll < policy.values.early_stop_loss or (policy.experiment.stop_margin is not None and margin >= policy.experiment.stop_margin)


def stop_after(nll: float, policy) -> int:
    """Consecutive steps `reached_stop` must hold: 1 on the NLL, experiment.stop_patience on the
    margin alone (ENCORE: the target stays the argmax in every context while δ moves on)."""
    return 1 if nll < policy.values.early_stop_loss else policy.experiment.stop_patience


class NormalizedSteps(torch.optim.Optimizer):
    """Gradient descent with steps of a fixed length: δ ← δ − step·g/‖g‖, per row of δ.

    Adam's first steps move every coordinate by about lr whatever its gradient, so δ grows
    in all d directions at once and most of its length is in directions the target does not
    need. A step along the gradient itself reaches the same target NLL with a shorter δ,
    and δ becomes the weight update's residual. With δ of shape (G, d) every row (group)
    is normalized and stepped on its own, which is the per-group optimization exactly.

    With an inverse metric M = F⁻¹ (d, d) the steps are steepest descent measured in F:
    δ ← δ − step·Mg/√(gᵀMg), a step of length `step` in √(xᵀFx); δ then grows where F is
    small (value_metric fisher: where ordinary text's loss is least sensitive).
    """

    def __init__(self, delta: torch.Tensor, step: float | torch.Tensor, metric: torch.Tensor | None = None):
        super().__init__([delta], {})
        self.step_len = torch.as_tensor(step, dtype=delta.dtype, device=delta.device).reshape(-1, 1)  # (1 or G, 1)
        self.metric = None if metric is None else metric.to(dtype=delta.dtype, device=delta.device)   # (d, d)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.reshape(-1, p.shape[-1])                             # (1 or G, d)
                if self.metric is None:
                    unit = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-30)    # zero gradient: no move
                else:
                    mg = g @ self.metric                                        # (1 or G, d); M symmetric
                    unit = mg / (mg * g).sum(-1, keepdim=True).clamp(min=1e-30).sqrt()
                p.sub_((self.step_len * unit).reshape(p.shape))


def make_optimizer(delta: torch.Tensor, policy, h_norm: float | torch.Tensor,
                   metric: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """The policy's δ optimizer: Adam (MEMIT's) or normalized steps of step_size·‖h^L‖
    (h_norm: a float, or one per row of a (G, d) δ), measured in `metric` when given
    (the inverse metric (d, d), sensitivity.preconditioner; value_metric fisher)."""
    if policy.values.optimizer == "normalized":
        return NormalizedSteps(delta, policy.values.step_size * torch.as_tensor(h_norm).detach(), metric)
    return torch.optim.Adam([delta], lr=policy.values.lr)


def fact_row_nll(tok_logp: torch.Tensor, r_idx: torch.Tensor, n_rows: int, fact_rows) -> torch.Tensor:
    """Mean NLL over each fact row's target tokens: tok_logp (n_tgt,) the scored target
    tokens' log-probs, r_idx (n_tgt,) the row of each; -> (len(fact_rows),). Every value loop
    (reference, fast, batched) sums these its own way: over a group's contexts and facts."""
    row_nll = torch.zeros(n_rows, device=tok_logp.device).index_add(0, r_idx, -tok_logp)
    row_len = torch.zeros(n_rows, device=tok_logp.device).index_add(0, r_idx, torch.ones_like(tok_logp))
    return row_nll[fact_rows] / row_len[fact_rows]


class _Abort(Exception):
    """Raised by a first-step check to give up on a loop (the caller falls back)."""


def run_steps(forward, delta, opt, n_rows: int, r_idx, fact_rows: list[int], n_ctx: int, ess_init,
              h_norm: float, policy, align, check_first=None) -> tuple[int, float, float]:
    """The value optimization loop shared by every forward implementation.

    forward() -> (log-prob of each scored target token (n_tgt,), essence log-probs (1, vocab)
    or (vocab,), each target's margin (n_tgt,) or None without stop_margin); per step: per-row mean NLL over target
    tokens, mean over contexts, summed over facts; early stop on that NLL or on the margins
    (`reached_stop`); then KL, weight decay, alignment, optimizer step, clamp.
    ess_init: the unedited essence log-probs, or None to read them off step 0 (δ = 0).
    Returns (steps taken, first NLL, last NLL, last min margin). check_first(tok_logp,
    ess_logp) may raise _Abort.
    """
    nll_start, steps, nll_val, margin_val, streak = None, 0, float("nan"), float("nan"), 0
    for step in range(policy.step_budget(len(fact_rows) // n_ctx)):
        tok_logp, ess_logp, margin = forward()
        if step == 0 and check_first is not None:
            check_first(tok_logp.detach(), ess_logp.detach())
        if ess_init is None:
            ess_init = ess_logp.detach()
        nll = fact_row_nll(tok_logp, r_idx, n_rows, fact_rows).sum() / n_ctx
        nll_val = float(nll.detach())
        if nll_start is None:
            nll_start = nll_val
        margin_val = float(margin.min()) if margin is not None else float("nan")
        streak = streak + 1 if reached_stop(nll_val, margin_val, policy) else 0
        if streak >= stop_after(nll_val, policy):
            break
        kl = torch.sum(ess_init.exp() * (ess_init - ess_logp))
        loss = nll + policy.values.kl_factor * kl + policy.values.weight_decay * delta.pow(2).sum() / h_norm**2
        if align is not None:
            loss = loss + align(delta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps = step + 1
        with torch.no_grad():
            cap = policy.values.clamp_norm_factor * h_norm
            if delta.norm() > cap:
                delta.mul_(cap / delta.norm())
    return steps, nll_start if nll_start is not None else nll_val, nll_val, margin_val


def optimize_value(model, tok, facts: list[Fact], contexts: list[str], layer_module: str,
                   policy, align: AlignmentTerm | None, seed: int = 0, full_logits: bool = True,
                   metric: torch.Tensor | None = None) -> ValueResult:
    """Optimize one group's δ with the authors' loop: every row, every layer and every
    position's logits at every step. With full_logits=False, the LM head runs only where
    targets are scored (the same δ, for the models the fast loops do not know).
    metric: the inverse metric normalized steps are measured in (make_optimizer)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    g = GroupRows.build(tok, facts, contexts)
    ids, mask = pad_rows(g.rows, tok.pad_token_id, device)
    subj = torch.tensor([r.subject_pos for r in g.rows], device=device)
    fact_rows = [i for i, f in enumerate(g.fact_of_row) if f >= 0]
    r_idx, p_idx, t_idx = target_index([g.rows[i] for i in fact_rows], device)
    r_idx = torch.tensor(fact_rows, device=device)[r_idx]
    ess = len(g.rows) - 1
    ess_pos = g.rows[ess].prompt_len - 1
    n_ctx = len(contexts)

    h0 = layer_outputs(model, layer_module, ids[:1], mask[:1], subj[:1])[0]   # (d_model,)
    h_norm = float(h0.norm())
    torch.manual_seed(seed)
    delta = torch.zeros(h0.shape[0], device=device, requires_grad=True)
    opt = make_optimizer(delta, policy, h_norm, metric)
    hook = {layer_module: ("post", add_at_positions(lambda: delta, subj))}
    tok_per_row = ids.shape[1]
    n_layers = model.config.num_hidden_layers

    head = model.get_output_embeddings()

    margins = policy.experiment.stop_margin is not None

    def scored_only() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        with hooks(model, hook):
            h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        tok_logp, ess_logp, margin = scored_logp(head, torch.cat([h[r_idx, p_idx], h[ess, ess_pos][None]]), t_idx,
                                                 margins)
        return tok_logp, ess_logp[0], margin

    def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not full_logits:
            return scored_only()
        with hooks(model, hook):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits   # (n, T, vocab)
        logp = torch.log_softmax(logits.float(), dim=-1)                                # (n, T, vocab)
        tok_logp, margin = target_logp(logp[r_idx, p_idx], t_idx, margins)               # (n_tgt,) each
        return tok_logp, logp[ess, ess_pos], margin

    # the unedited essence distribution is step 0's (δ = 0), as in the authors' loop
    steps, nll_start, nll_val, margin = run_steps(forward, delta, opt, len(g.rows), r_idx, fact_rows, n_ctx,
                                                  None, h_norm, policy, align)
    return ValueResult(
        delta=delta.detach().clone(), h_norm=h_norm, steps=steps, nll=nll_val, margin=margin,
        nll_start=nll_start, seconds=time.perf_counter() - t0,
        token_layer_passes=len(g.rows) * tok_per_row * n_layers,
    )
