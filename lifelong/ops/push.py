"""`lifelong push`: validate a fact file, edit the model with it, record it as batch N.

One straight line under the writer lock: plan the groups (`store.history`), read what the
edit needs from the store once (`ops.inputs`), load the model at head, compute the edit
(`edit`), score the batch and measure the drift on the store's held-out text (`eval`), and
add the batch's record and arrays in one transaction, so a failure or a kill leaves the
store as it was. The report carries the edit budget left (`eval.budget`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lifelong.deltas import fingerprint
from lifelong.edit.anchoring import SKIP_FACTOR
from lifelong.edit.batch import BatchEdit, Group, compute_edit
from lifelong.edit.values import reached_stop
from lifelong.eval.budget import edit_budget
from lifelong.eval.metrics import perplexity
from lifelong.eval.scoring import FactScore, base_neighbors, score_facts, summarize
from lifelong.facts import Fact, load_facts
from lifelong.model.session import Session, expected_fingerprints, verify
from lifelong.ops import quiet
from lifelong.ops.inputs import EditInputs
from lifelong.policy import Policy, policy_from_json
from lifelong.store import history
from lifelong.store.layout import BANK_DELTAS, BANK_KEYS, UNITS, layer_key
from lifelong.store.store import Store


@dataclass
class PushReport:
    batch_id: int
    facts: list[Fact]
    scores: list[FactScore]
    summary: dict
    groups: list[dict]
    supersedes: list[tuple[int, tuple[int, int]]]
    timings: dict
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    budget: dict | None = None          # eval.budget.edit_budget after this batch

    @property
    def mean_steps(self) -> float:
        """Optimization steps per value (group), averaged over the batch."""
        return sum(g["steps"] for g in self.groups) / len(self.groups) if self.groups else 0.0

    def to_dict(self) -> dict:
        return {
            "batch": self.batch_id, "dry_run": self.dry_run, "summary": self.summary,
            "timings": self.timings, "warnings": self.warnings, "budget": self.budget, "groups": self.groups,
            "supersedes": [[i, list(r)] for i, r in self.supersedes],
            "facts": [{"subject": f.subject, "prompt": f.prompt, "target": f.target, **s.to_dict()}
                      for f, s in zip(self.facts, self.scores)],
        }


class _DryRun(Exception):
    """Raised inside the transaction to discard a dry run."""


def push(path, fact_file, dry_run: bool = False, log=quiet, wait: bool = True,
         policy_overrides: dict | None = None) -> PushReport:
    """Validate, edit, evaluate and record one batch of facts as batch N = last id + 1."""
    ff = load_facts(fact_file)                      # bad input: nothing opened, nothing changed
    t_all = time.perf_counter()
    store = Store.open(path)
    try:
        with store.writer(wait=wait) as tx:
            report = _push_locked(store, tx, ff, str(Path(fact_file).resolve()), dry_run, log,
                                  policy_overrides, t_all)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    return report


def _push_locked(store, tx, ff, source, dry_run, log, overrides, t_all) -> PushReport:
    records = tx.records
    t = time.perf_counter()
    stored = policy_from_json(store.policy_json)
    policy = stored.with_overrides(**overrides) if overrides else stored
    batch_id = history.next_id(records)
    plans = history.plan_groups([f.to_dict() for f in ff.facts], records, merge=policy.merging.same_subject)
    by_id = {r.id: r for r in records}
    groups = [Group(p.subject, [ff.facts[i] for i in p.new] +
                    [Fact.from_dict(by_id[b].facts[i]) for b, i in p.carried]) for p in plans]
    replaced = {r for p in plans for r in p.replaces}
    live = [g for g in history.live_groups(records) if g not in replaced]
    inputs = EditInputs.read(store, records, policy, live)
    timings = {"read": time.perf_counter() - t}

    t = time.perf_counter()
    session = Session.open(store, log=log, records=records, keep_sums=True, sums=inputs.head64)
    verify(session.current(), expected_fingerprints(store, records), "weights at head")
    device = next(session.model.parameters()).device
    layer_ctx, bank = inputs.protection(device)
    metric = inputs.metric(device)
    heldout = store.info.get("heldout") or []
    with session.weights(inputs.base):
        base_answers = base_neighbors(session.model, session.tok, ff.facts)
        ppl_base = perplexity(session.model, heldout) if heldout else None
    timings["load"] = time.perf_counter() - t

    log(f"batch {batch_id}: {len(ff.facts)} facts in {len(groups)} groups, "
        f"{len(live)} earlier groups protected")
    edit = compute_edit(session.model, session.tok, groups, session.contexts, policy, layer_ctx, bank, log=log,
                        metric=metric)
    timings.update(edit.timings)
    # compute_edit added each Δ to the rounded head; the new head is base + every Δ rounded
    # once, the floats a rollback to this batch computes (and the fingerprint records)
    session.apply(session.with_edit(edit.factors))

    t = time.perf_counter()
    scores = score_facts(session.model, session.tok, ff.facts, base_answers)
    summary = summarize(scores)
    ppl = perplexity(session.model, heldout) if heldout else None      # the model's health at the new head
    summary.update(perplexity=ppl, perplexity_base=ppl_base,
                   perplexity_drift=(ppl / ppl_base - 1) if ppl and ppl_base else None)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    record = history.BatchRecord(
        id=batch_id, created=history.utc_now(), source=source, sha256=ff.sha256, status=history.ACTIVE,
        facts=[f.to_dict() for f in ff.facts], groups=[p.to_record(batch_id) for p in plans],
        supersedes=[s for p in plans for s in p.supersedes],
        efficacy=[float(s.efficacy) for s in scores], metrics=dict(summary),
        fingerprint_after={str(l): fingerprint(w) for l, w in session.current().items()},
        policy_digest=policy.digest(),
    )
    record.metrics["live_facts"] = len(history.live_facts(records + [record]))
    record.metrics["groups"] = [{"nll_start": round(v.nll_start, 4), "nll": round(v.nll, 4), "steps": v.steps,
                                 "realized": round(float(r), 4), "value_norm": round(float(vn), 3),
                                 **({} if w else {"written": False})}
                                for v, r, w, vn in zip(edit.values, edit.realized, edit.written, edit.value_norms)]
    # the report's rows add to these
    if not dry_run:
        tx.add_batch(record, batch_arrays(edit))
    timings["store"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    record.timings = {k: round(v, 3) for k, v in timings.items()}
    group_rows = [{**g.to_dict(), **m, "delta_norm": round(float(v.delta.norm()), 3), "h_norm": round(v.h_norm, 3)}
                  for g, m, v in zip(record.groups, record.metrics["groups"], edit.values)]
    return PushReport(batch_id, ff.facts, scores, summary, group_rows, record.supersedes,
                      record.timings, dry_run, push_warnings(ff.facts, scores, groups, edit, policy),
                      edit_budget(records + [record], policy.gates.max_perplexity_drift))


def batch_arrays(edit: BatchEdit) -> dict:
    """What a batch file holds (`store.layout`): Δ factors and keys per layer, the bank rows, units."""
    arrays = {BANK_KEYS: edit.bank_keys.cpu().numpy(), BANK_DELTAS: edit.deltas.cpu().numpy(),
              UNITS: edit.unit_group.cpu().numpy()}
    for l, (A, B) in edit.factors.items():
        arrays[layer_key(l, "A")] = A.cpu().numpy()
        arrays[layer_key(l, "B")] = B.cpu().numpy()
        arrays[layer_key(l, "K")] = edit.keys[l].cpu().numpy()
    return arrays


def push_warnings(facts: list[Fact], scores: list[FactScore], groups: list[Group], edit: BatchEdit,
                  policy: Policy) -> list[str]:
    """A line per fact the edited model does not yet give, per group left unwritten, and per
    value whose optimization ended far from its target."""
    warnings = []
    for f, s in zip(facts, scores):
        if not s.efficacy:
            warnings.append(f"line {f.line}: {f.render()!r} does not yet give {f.target!r}")
    for g, v, r, w, long, vn in zip(groups, edit.values, edit.realized, edit.written, edit.too_long, edit.value_norms):
        if long:
            warnings.append(f"group {g.subject!r} left unwritten: its value norm {float(vn):.1f} "
                            f"exceeds {SKIP_FACTOR:g} x the policy's value_norm_anchor "
                            f"{policy.experiment.value_norm_anchor:g}")
        elif not w:
            warnings.append(f"group {g.subject!r} left unwritten: its key has no room outside preserved "
                            f"knowledge and earlier edits (realized {float(r):.0%} < min_realized "
                            f"{policy.update.min_realized:g})")
        elif not reached_stop(v.nll, v.margin, policy) and v.nll > max(1.0, 20 * policy.values.early_stop_loss):
            warnings.append(f"group {g.subject!r}: optimization ended far from its target (NLL {v.nll:.2f})")
    return warnings
