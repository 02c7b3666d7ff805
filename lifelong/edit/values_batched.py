"""Target values of many groups at once, when alignment does not chain them.

Without the EAMET term, each group's loss depends only on its own δ and its own rows,
so optimizing all groups together — δ as a (G, d) tensor, loss summed over groups — is
the per-group optimization exactly: Adam is element-wise; normalized steps, the clamp and
weight decay are per group; and a group that reaches its early stop is frozen (its δ
restored after every later step). What changes is the cost: each step reads the decoder's weights once
for every group instead of once per group, which is what a small-token step on a CPU
is bound by. With alignment on, each group must see the residuals of the groups before
it, so `compute_edit` keeps the sequential loop.
"""
from __future__ import annotations

import logging
import time

import torch

from lifelong.facts import Fact
from lifelong.edit.values import GroupRows, ValueResult, fact_row_nll, make_optimizer, reached_stop, stop_after
from lifelong.edit.values_fast import (
    _CHECK_TOL,
    _CHECK_TOL_LOW,
    _FastForward,
    _Unsupported,
    optimize_value_fast,
)
from lifelong.model.decoder import recognise

log = logging.getLogger(__name__)

WAVE = 16  # groups per joint optimization: bounds activation memory (~40 MB per group on SmolLM2)


def optimize_values_batched(model, tok, groups: list[list[Fact]], contexts: list[str], layer_module: str,
                            policy, seed: int = 0, wave: int = WAVE,
                            metric: torch.Tensor | None = None) -> list[ValueResult]:
    """One ValueResult per group, equal to optimize_value_fast(...) run group by group with align=None
    (metric: make_optimizer's)."""
    out: list[ValueResult] = []
    for start in range(0, len(groups), wave):
        out.extend(_optimize_wave(model, tok, groups[start : start + wave], contexts, layer_module, policy,
                                  seed + start, metric))
    return out


def _sequential(model, tok, groups, contexts, layer_module, policy, seed, metric) -> list[ValueResult]:
    return [optimize_value_fast(model, tok, g, contexts, layer_module, policy, None, seed=seed + i, metric=metric)
            for i, g in enumerate(groups)]


def _optimize_wave(model, tok, groups, contexts, layer_module, policy, seed, metric) -> list[ValueResult]:
    t0 = time.perf_counter()
    arch = recognise(model, layer_module)
    if isinstance(arch, str):
        return _sequential(model, tok, groups, contexts, layer_module, policy, seed, metric)
    device = next(model.parameters()).device

    # every group's rows in one table; fact indices made global, essence rows kept (-1)
    rows, fact_of_row, group_of_row, first_row, fact_group = [], [], [], [], []
    for gi, facts in enumerate(groups):
        g = GroupRows.build(tok, facts, contexts)
        first_row.append(len(rows))
        base = len(fact_group)
        rows += g.rows
        fact_of_row += [f + base if f >= 0 else -1 for f in g.fact_of_row]
        group_of_row += [gi] * len(g.rows)
        fact_group += [gi] * g.n_facts
    table = GroupRows(rows, fact_of_row, len(fact_group))
    G, n_ctx = len(groups), len(contexts)
    try:
        fwd = _FastForward(model, arch, table, tok.pad_token_id, checked=first_row[1] if G > 1 else len(rows))
    except (_Unsupported, AttributeError, IndexError) as e:
        log.warning("joint value optimization unavailable (%s): one group at a time", e)
        return _sequential(model, tok, groups, contexts, layer_module, policy, seed, metric)

    row_group_all = torch.tensor(group_of_row, device=device)                   # (n_rows,)
    h_norm = fwd.h_at_subject[torch.tensor(first_row, device=device)].norm(dim=-1)  # (G,)
    delta = torch.zeros(G, fwd.hL.shape[-1], device=device, requires_grad=True)
    opt = make_optimizer(delta, policy, h_norm, metric)
    tol = _CHECK_TOL.get(fwd.hL.dtype, _CHECK_TOL_LOW)

    active = torch.ones(G, dtype=torch.bool, device=device)
    margins = policy.experiment.stop_margin is not None
    steps = torch.zeros(G, dtype=torch.long)
    streak = torch.zeros(G, dtype=torch.long)                                    # consecutive steps at the stop
    nll_start = nll_last = None
    view, groups_in_view = fwd, torch.arange(G, device=device)
    passes = forwards = 0
    budget = torch.tensor([policy.step_budget(len(f)) for f in groups], device=device)   # (G,)
    for step in range(int(budget.max())):
        if len(groups_in_view) != int(active.sum()):  # some groups stopped: compute only the rest
            groups_in_view = active.nonzero()[:, 0]
            view = fwd.select(torch.isin(row_group_all, groups_in_view).nonzero()[:, 0])
        row_group = row_group_all[torch.isin(row_group_all, groups_in_view)]     # (view rows,)
        tok_logp, ess_logp, margin = view(delta[row_group], margins)
        passes += view.token_layer_passes
        forwards += len(groups_in_view)
        if step == 0:  # δ = 0: the unedited essence distributions, and the check
            ess_all = ess_logp.detach()                                          # (G, vocab)
            err = fwd.error(tok_logp.detach(), ess_all)
            if not err <= tol:
                log.warning("joint value forward differs by %.3g at δ = 0: one group at a time", err)
                return _sequential(model, tok, groups, contexts, layer_module, policy, seed, metric)
        ess_init = ess_all[groups_in_view]                                       # (g, vocab)
        fact_rows = torch.tensor(view.fact_rows, device=device, dtype=torch.long)
        per_row = fact_row_nll(tok_logp, view.r_idx, view.n_rows, fact_rows)
        nll = torch.zeros(G, device=device).index_add(0, row_group[fact_rows], per_row) / n_ctx   # (G,)
        group_margin = (torch.full((G,), float("inf"), device=device).scatter_reduce(
            0, row_group[view.r_idx], margin, "amin") if margins
            else torch.full((G,), float("nan"), device=device))                          # (G,)
        nll_now, margin_now = nll.detach().cpu(), group_margin.cpu()
        if nll_start is None:
            nll_start, nll_last, margin_last = nll_now.clone(), nll_now.clone(), margin_now.clone()
        nll_last[active.cpu()] = nll_now[active.cpu()]
        margin_last[active.cpu()] = margin_now[active.cpu()]
        streak = torch.where(torch.tensor([reached_stop(float(n), float(m), policy)
                                           for n, m in zip(nll_now, margin_now)]), streak + 1, 0)
        stop = (streak >= torch.tensor([stop_after(float(n), policy) for n in nll_now])).to(device)
        active = active & ~stop & (steps.to(device) < budget)
        if not bool(active.any()):
            break
        kl = torch.zeros(G, device=device).index_copy(
            0, groups_in_view, torch.sum(ess_init.exp() * (ess_init - ess_logp), dim=-1))   # (G,)
        wd = delta.pow(2).sum(-1) / h_norm**2
        loss = ((nll + policy.values.kl_factor * kl + policy.values.weight_decay * wd) * active).sum()
        frozen = delta.detach().clone()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta[~active] = frozen[~active]                                    # stopped groups stay put
            cap = policy.values.clamp_norm_factor * h_norm                             # (G,)
            norm = delta.norm(dim=-1)
            scale = torch.where(active & (norm > cap), cap / norm.clamp(min=1e-30), torch.ones_like(norm))
            delta.mul_(scale[:, None])
        steps[active.cpu()] += 1
    seconds = (time.perf_counter() - t0) / G
    passes = passes / forwards  # per forward of one group, as optimize_value counts them
    return [ValueResult(delta=delta[g].detach().clone(), h_norm=float(h_norm[g]), steps=int(steps[g]),
                        nll=float(nll_last[g]), margin=float(margin_last[g]), nll_start=float(nll_start[g]), seconds=seconds,
                        token_layer_passes=int(passes)) for g in range(G)]
