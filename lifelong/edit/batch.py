"""One batch's edit: keys, values, MEMIT spreading over layers, projected updates.

`compute_edit` works on a model already holding the head weights, changes the edited
matrices in place as MEMIT's spreading requires (layer l's update changes the keys of
l+1…), and returns everything the store records. The caller restores the head weights
if it decides not to keep the edit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lifelong.edit.alignment import ResidualBank
from lifelong.edit.anchoring import SKIP_FACTOR, anchor_values, matrix_outputs, mlp_outputs
from lifelong.facts import Fact
from lifelong.edit.keys import BatchKeys, group_mean, write_units
from lifelong.policy import layer_name
from lifelong.edit.solve import memit_update, projected_update
from lifelong.edit.values import ValueResult, reached_stop
from lifelong.edit.values_batched import optimize_values_batched
from lifelong.edit.values_fast import optimize_value_fast
from lifelong.edit.output_space import through_norm
from lifelong.model.decoder import output_norm
from lifelong.model.weights import check_finite, get_module, read_matrix, write_matrix
from lifelong.deltas import materialize
from lifelong.policy import module_name


@dataclass
class Group:
    """Facts optimized into one value (same subject when merging)."""

    subject: str
    facts: list[Fact]


@dataclass
class LayerContext:
    """What the update at one layer needs besides this batch."""

    P: torch.Tensor | None          # (d_in, d_in) projector (None: projection off)
    mom2: torch.Tensor | None       # (d_in, d_in) E[kkᵀ]: MEMIT update, or projected with preserve_weight
    KpKpT: torch.Tensor | None      # (d_in, d_in) Σ k kᵀ over live earlier groups (projected, or hold_earlier)
    drift: torch.Tensor | None = None   # (d_out, d_in) float64 head − base: what the repair term pulls back


@dataclass
class BatchEdit:
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A (d_out, n), B (n, d_in))
    keys: dict[int, torch.Tensor]                           # layer -> (u, d_in), one per write unit (fact)
    unit_group: torch.Tensor                                # (u,) the group of each write unit
    bank_keys: torch.Tensor                                 # (n, d_in) key at L before the edit
    deltas: torch.Tensor                                    # (n, d_model)
    values: list[ValueResult]
    realized: torch.Tensor                                  # (n,) share of each δ the edited model reaches at L
    written: torch.Tensor                                   # (n,) bool: False for groups left unwritten (min_realized)
    timings: dict = field(default_factory=dict)
    value_norms: torch.Tensor | None = None                 # (n,) ‖v₀ + δ‖ at L before any anchoring
    too_long: torch.Tensor | None = None                    # (n,) bool: not written, v* over 2 × the anchor


def compute_edit(model, tok, groups: list[Group], contexts: list[str], policy,
                 layer_ctx: dict[int, LayerContext], bank: ResidualBank,
                 log=lambda msg: None, optimize=None, metric: torch.Tensor | None = None) -> BatchEdit:
    """Edit `model` in place with one batch of groups and return the factors applied.

    optimize: a per-group value optimizer (values.optimize_value's signature) to force
    the sequential loop with it; by default groups are optimized jointly when alignment
    is off (values_batched) and one after another, each aligned to the bank, when on.
    metric: the inverse metric δ's normalized steps are measured in (value_metric fisher).
    """
    timings: dict[str, float] = {}
    layers = list(policy.layers)
    L = layers[-1]
    out_layer = layer_name(policy.module_template, L)

    t = time.perf_counter()
    current = BatchKeys(model, tok, groups, contexts, policy.module_template, layers)
    ug = write_units(groups)                                          # (u,) group of each unit (fact)
    bank_keys, h_start = group_mean(current.keys[L], ug, len(groups)), current.out
    timings["keys"] = time.perf_counter() - t

    # values, one group after another, each aligned to the bank as it grows
    t = time.perf_counter()
    values: list[ValueResult] = []
    if optimize is None and not policy.alignment.enabled:
        values = optimize_values_batched(model, tok, [g.facts for g in groups], contexts, out_layer, policy,
                                         metric=metric)
        for gi, (g, res) in enumerate(zip(groups, values)):
            bank.add(bank_keys[gi], res.delta, (-1, gi))
        log(f"values of {len(groups)} groups optimized jointly: "
            f"{sum(reached_stop(v.nll, v.margin, policy) for v in values)} reached the early stop, "
            f"{sum(v.seconds for v in values):.1f}s")
    for gi, g in enumerate(groups if not values else []):
        term = None
        if policy.alignment.enabled:
            term = bank.objective(bank_keys[gi], policy.alignment.tau, policy.alignment.top_m, policy.alignment.lambda_kl,
                                  policy.alignment.lambda_mse, next(model.parameters()).device)
        res = (optimize or optimize_value_fast)(model, tok, g.facts, contexts, out_layer, policy, term, seed=gi,
                                                   metric=metric)
        values.append(res)
        bank.add(bank_keys[gi], res.delta, (-1, gi))
        log(f"value {gi + 1}/{len(groups)} {g.subject!r}: nll {res.nll_start:.2f} -> {res.nll:.3f} "
            f"in {res.steps} steps, {res.seconds:.1f}s")
    deltas = torch.stack([v.delta.float().cpu() for v in values])   # (n, d_model)
    du = deltas[ug]                                                   # (u, d_model): a group's δ for each of its facts
    modules = {l: get_module(model, module_name(policy.module_template, l)) for l in layers}
    norms = {l: output_norm(model, module_name(policy.module_template, l)) for l in layers}
    v0 = mlp_outputs(current.keys[L], modules[L], norms[L]).to(du.device)   # (u, d_model) the MLP's output now
    value_norms = (v0 + du).norm(dim=-1)
    kept = torch.ones(len(du), dtype=torch.bool)
    if policy.experiment.value_norm_anchor is not None:
        du, kept, _ = anchor_values(du, v0, policy.experiment.value_norm_anchor)
        deltas = group_mean(du, ug, len(groups))                      # what the bank keeps: the anchored δ
        for j in (~kept).nonzero().flatten().tolist():
            log(f"group {groups[int(ug[j])].subject!r}: value norm {float(value_norms[j]):.1f} exceeds "
                f"{SKIP_FACTOR:g} x the anchor {policy.experiment.value_norm_anchor:g}; not written")
    z = h_start + du                                                  # (u, d_model) targets at L
    timings["values"] = time.perf_counter() - t

    # spread over layers (MEMIT), the policy's update per layer (AlphaEdit's, or MEMIT's). With min_realized
    # or rescale_max the first pass is a probe: the batch is spread again from the same
    # start when its shares ask for it.
    t = time.perf_counter()
    probe = policy.update.min_realized > 0 or policy.update.rescale_max > 1
    start = {l: read_matrix(m) for l, m in modules.items()} if probe else None
    keys_at_start = current.fork() if probe else None
    parts, keys, realized = _spread(current, z, h_start, du, None, range(1 if probe else policy.experiment.sweeps),
                                    policy, layer_ctx, modules, norms, log, "first pass: " if probe else "")
    written = realized >= policy.update.min_realized if policy.update.min_realized > 0 else torch.ones_like(realized, dtype=torch.bool)
    room = written.clone()
    written &= kept.to(written.device)
    if probe and (policy.update.rescale_max > 1 or not written.all()):
        unit_facts = [f for g in groups for f in g.facts]                # the units, in order
        for j in (~room).nonzero().flatten().tolist():
            g = groups[int(ug[j])]
            what = f"group {g.subject!r}" if len(g.facts) == 1 else \
                f"fact {unit_facts[j].render()!r} of group {g.subject!r}"
            log(f"{what} left unwritten: the first pass wrote {float(realized[j]):.0%} "
                f"of its δ (min_realized {policy.update.min_realized:g}); its key is held in place")
        for l, w in start.items():
            write_matrix(modules[l], w)
        current = keys_at_start
        z = h_start + du * (1 / realized.clamp(min=1e-6)).clamp(min=1.0, max=policy.update.rescale_max)[:, None]
        parts, keys, realized = _spread(current, z, h_start, du, written, range(policy.experiment.sweeps),
                                        policy, layer_ctx, modules, norms, log, "spread again: ")
    elif probe and policy.experiment.sweeps > 1:                                     # the probe was sweep 1
        parts, keys, realized = _spread(current, z, h_start, du, None, range(1, policy.experiment.sweeps),
                                        policy, layer_ctx, modules, norms, log, "", parts)
    factors = {l: (torch.cat([a for a, _ in ps], 1), torch.cat([b for _, b in ps], 0)) for l, ps in parts.items()}
    timings["update"] = time.perf_counter() - t
    n = len(groups)
    return BatchEdit(factors=factors, keys=keys, unit_group=ug, bank_keys=bank_keys, deltas=deltas,
                     values=values, timings=timings, realized=group_mean(realized[:, None], ug, n)[:, 0],
                     written=group_mean(written.float()[:, None], ug, n)[:, 0] > 0,   # any of its facts
                     value_norms=group_mean(value_norms[:, None], ug, n)[:, 0],
                     too_long=group_mean((~kept).float()[:, None], ug, n)[:, 0] > 0)


def _spread(current: BatchKeys, z, h_start, deltas, written, sweeps, policy, layer_ctx, modules, norms, log,
            label: str, parts=None):
    """Passes (`sweeps`, numbered from 0) over the edited layers toward targets z at L, each
    spreading what is still missing (MEMIT: the i-th of the remaining layers takes 1/(remaining)
    of it), per write unit; units not `written` get residual 0, which holds their keys' outputs
    in place. Where a norm sits between a layer's matrix and the stream (`norms[l]`, Gemma 3)
    the residual is carried through it into the matrix's output space (`through_norm`).
    Returns each layer's factors of every pass (appended to `parts`), the last pass's keys
    and the realized shares of δ after it."""
    layers = list(policy.layers)
    parts = parts if parts is not None else {l: [] for l in layers}
    keys = {}
    updated = None
    for sweep in sweeps:
        for i, layer in enumerate(layers):
            if updated is not None:
                current.after_update(updated)
            K, cur = current.keys[layer], current.out
            R = (z - cur).t() / (len(layers) - i)                         # (d_model, n)
            if norms[layer] is not None:
                y = matrix_outputs(K, modules[layer])                     # (n, d_out) the matrix's outputs
                R = through_norm(norms[layer], y, R.t()).t()              # (d_out, n)
            if written is not None:
                R = R * written.to(R.dtype)[None, :]
            ctx = layer_ctx[layer]
            if ctx.P is not None:
                A, B = projected_update(R, K.t(), ctx.P, ctx.KpKpT, policy.update.alpha, ctx.mom2, policy.experiment.preserve_weight)
            else:
                A, B = memit_update(R, K.t(), ctx.mom2, policy.update.mom2_weight, ctx.KpKpT,
                                    policy.experiment.frobenius_weight, ctx.drift, policy.experiment.repair_weight)
            check_finite(f"update of layer {layer}", A)
            check_finite(f"update of layer {layer}", B)
            write_matrix(modules[layer], materialize(read_matrix(modules[layer]), [(A, B)]))
            parts[layer].append((A, B))
            keys[layer] = K                                               # the last sweep's keys
            updated = layer
        current.after_update(updated)
        updated = None
        realized = realized_share(current.out - h_start, deltas)
        what = label + (f"sweep {sweep + 1}: " if policy.experiment.sweeps > 1 else "")
        log(f"{what}target residuals realized at layer {layers[-1]}: median "
            f"{float(realized.median()):.0%}, lowest {float(realized.min()):.0%}")
    return parts, keys, realized


def realized_share(moved: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Per group, how much of its target residual δ the updated weights reach at L:
    the projection of what h^L moved onto δ, over ‖δ‖² (1: all of it). The closed-form
    update fits each key only partly (α, the projection, earlier edits' keys), so a
    value that just reaches its target may not hold once written."""
    return (moved * deltas).sum(-1) / deltas.pow(2).sum(-1).clamp(min=1e-30)
