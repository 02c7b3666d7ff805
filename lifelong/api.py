"""The library verbs behind every command: init, push, rollback, log, show, status, export, evaluate.

Each verb takes a store path and returns plain data; the CLI only formats it. Input is
validated before the store is opened for writing, and every write goes through one
`Store.writer()` transaction, so a failure or a kill leaves the store as it was.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, history
from .alignment import ResidualBank
from .corpus import chunk_tokens, context_templates, read_corpus, sample_sequences
from .edit import Group, LayerContext, compute_edit
from .staging import staged_dir
from .errors import BadInput, StoreExists
from .evaluation import FactScore, neighbor_rows, score_facts, summarize
from .facts import Fact, load_facts
from .metrics import argmax_tokens, perplexity
from .models import DEFAULT_MODEL, BUILTIN_MODELS, load_model, resolve_model
from .policy import Policy, find_policy, load_policy
from .sensitivity import preconditioner, residual_fisher
from .session import Session, expected_fingerprints, head_weights, layer_key, verify
from .stats import projector, second_moments
from .store import Store
from .trace import layer_name
from .values import reached_stop
from .weights import fingerprint, get_module, module_name, read_matrix

DEFAULT_STORE = Path("stores") / "default.h5"
HELDOUT_SEQS, HELDOUT_LEN = 16, 64          # model-sampled held-out text
HELDOUT_FILE_TOKENS = 4096                  # from a --heldout file, in SEQ_LEN chunks
SEQ_LEN = 128
UNITS = "units/group"   # a batch's array: the group of each write unit (fact), one row of K per unit
FISHER = "residual_fisher"   # a base array (value_metric fisher): F summed over the edited layers' outputs


def key_rows(arrays: dict, groups) -> np.ndarray:
    """Rows of a batch's K that belong to `groups` (indices into the batch's groups):
    `arrays` as read with optional=(UNITS,); batches stored before units have a row per group."""
    return np.isin(arrays[UNITS], groups) if UNITS in arrays else np.asarray(groups, dtype=np.int64)


def store_path(path: str | os.PathLike | None) -> Path:
    """--store, else $LIFELONG_STORE, else stores/default.h5."""
    return Path(path or os.environ.get("LIFELONG_STORE") or DEFAULT_STORE)


def _quiet(*_a, **_k) -> None:
    return None


# ----------------------------------------------------------------------------- init


def init(path, model: str = DEFAULT_MODEL, policy: str | None = None, corpus: str | None = None,
         log=_quiet, progress=None, seed: int = 0, heldout: str | None = None) -> Store:
    """Create a store: base identity + fingerprint, policy, and per edited layer C₀ and P.
    heldout: a text file (as --corpus) whose perplexity `eval` and the refresh gates compare
    with the base model's; without one the model samples that text itself."""
    path = Path(path)
    if path.exists():
        raise StoreExists(f"a store already exists at {path}", hint="pick another --store, or remove it yourself")
    if policy is None:
        if model not in BUILTIN_MODELS:
            raise BadInput("--policy is required for a model that is not built in",
                           hint="e.g. --policy policies/llama3-8b.yaml")
        policy = model
    pol = load_policy(find_policy(policy))
    if corpus is not None:
        texts = read_corpus(corpus)  # bad corpus fails before the model loads
    if heldout is not None:
        heldout_texts = read_corpus(heldout)
        if corpus is not None and Path(heldout).resolve() == Path(corpus).resolve():
            log("warning: --heldout is the --corpus file; perplexity will be measured on text "
                "the preserved statistics were computed from")
    source = resolve_model(model)
    t0 = time.perf_counter()
    net, tok = load_model(source, log=log)
    names = [module_name(pol.module_template, l) for l in pol.layers]
    base = {l: read_matrix(get_module(net, n)) for l, n in zip(pol.layers, names)}
    d_in = base[pol.layers[0]].shape[1]
    log(f"model {source.name}: {type(net).__name__}, {net.config.num_hidden_layers} layers; "
        f"edited {names[0]} … ({base[pol.layers[0]].shape[0]}×{d_in})")

    if corpus is not None:
        seqs = chunk_tokens(tok, texts, pol.corpus_tokens, SEQ_LEN)
        corpus_desc = f"file {corpus}"
    else:
        n_seq = math.ceil((pol.sampled_tokens or pol.corpus_tokens) / SEQ_LEN)
        log(f"sampling {n_seq * SEQ_LEN} tokens of text from the model for the preserved statistics")
        seqs = sample_sequences(net, tok, n_seq, SEQ_LEN, seed=seed, progress=progress and progress("sample"))
        corpus_desc = "model-sampled text"
    n_tokens = sum(len(s) for s in seqs)
    log(f"second moments over {n_tokens} tokens at {len(names)} layers")
    moments, counted = second_moments(net, names, seqs, progress=progress and progress("stats"))
    arrays, layer_info = {}, {}
    for l, n in zip(pol.layers, names):
        proj = projector(moments[n], pol.nullspace_threshold)
        arrays[layer_key(l, "W")] = base[l].cpu().numpy()
        arrays[layer_key(l, "mom2")] = proj.mom2.cpu().numpy()
        arrays[layer_key(l, "P")] = proj.P.cpu().numpy()
        arrays[layer_key(l, "eigvals")] = proj.eigvals.cpu().numpy()
        layer_info[str(l)] = {"kept_dims": proj.kept, "of": d_in, "kept_energy": proj.kept_energy,
                              "min_eig": float(proj.eigvals[0]), "max_eig": float(proj.eigvals[-1])}
        log(f"layer {l}: null space keeps {proj.kept}/{d_in} dims ({proj.kept_energy:.2%} of the energy)")
        if proj.kept == 0:
            raise BadInput(f"layer {l}: no eigenvalue of E[kkᵀ] is below nullspace_threshold="
                           f"{pol.nullspace_threshold}; nothing could be edited",
                           hint=f"raise the threshold above {float(proj.eigvals[0]):.3g} in the policy")
    fisher_info = {}
    if pol.value_metric == "fisher":
        fisher_seqs = seqs[: math.ceil(pol.fisher_tokens / SEQ_LEN)]
        log(f"residual Fisher over {sum(len(s) for s in fisher_seqs)} tokens (value_metric fisher)")
        per_layer, n_fisher = residual_fisher(net, [layer_name(pol.module_template, l) for l in pol.layers],
                                              fisher_seqs, progress=progress and progress("fisher"))
        arrays[FISHER] = sum(per_layer.values()).numpy()
        fisher_info = {"fisher_tokens": n_fisher}
    contexts = context_templates(net, tok, pol.n_prefixes, pol.prefix_tokens, seed=seed + 1)
    eval_prefixes = _eval_prefixes(net, tok, seed + 3)
    if heldout is not None:
        heldout_seqs = chunk_tokens(tok, heldout_texts, HELDOUT_FILE_TOKENS, SEQ_LEN)
        heldout_desc = f"file {heldout}"
    else:
        heldout_seqs = sample_sequences(net, tok, HELDOUT_SEQS, HELDOUT_LEN, seed=seed + 2)
        heldout_desc = "model-sampled text"
    info = {
        "contexts": contexts,
        "eval_prefixes": eval_prefixes,
        "corpus": corpus_desc,
        "corpus_tokens": counted,
        **fisher_info,
        "layers": layer_info,
        "heldout": heldout_seqs,
        "heldout_source": heldout_desc,
        "init_seconds": round(time.perf_counter() - t0, 2),
    }
    model_info = {"source": source.to_dict(), "architecture": type(net).__name__,
                  "num_layers": int(net.config.num_hidden_layers)}
    fps = {str(l): fingerprint(w) for l, w in base.items()}
    return Store.create(path, model=model_info, policy_json=pol.model_dump_json(),
                        base_fingerprint=fps, info=info, base_arrays=arrays)


# ----------------------------------------------------------------------------- push


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

    def to_dict(self) -> dict:
        return {
            "batch": self.batch_id, "dry_run": self.dry_run, "summary": self.summary,
            "timings": self.timings, "warnings": self.warnings, "groups": self.groups,
            "supersedes": [[i, list(r)] for i, r in self.supersedes],
            "facts": [{"subject": f.subject, "prompt": f.prompt, "target": f.target, **s.to_dict()}
                      for f, s in zip(self.facts, self.scores)],
        }


class _DryRun(Exception):
    """Raised inside the transaction to discard a dry run."""


def live_batch_arrays(store: Store, live: list[tuple[int, int]], names: list[str],
                      optional: tuple[str, ...] = ()):
    """(batch id, its live group indices, its named arrays) for each batch holding live groups,
    in id order: one read per batch file."""
    by_batch: dict[int, list[int]] = {}
    for b, g in live:
        by_batch.setdefault(b, []).append(g)
    for b, gs in sorted(by_batch.items()):
        yield b, gs, store.batch_arrays(b, names, optional=optional)


def protection(store: Store, policy: Policy, live: list[tuple[int, int]], device,
               d_model: int) -> tuple[dict, ResidualBank]:
    """Per layer P, C₀ and K_pK_pᵀ over the live groups, and their residual bank."""
    # each 9 MB+ per layer: load only what the update uses
    mom2 = not policy.project or policy.preserve_weight > 0
    need = (["P"] if policy.project else []) + (["mom2"] if mom2 else [])
    base = store.base_arrays([layer_key(l, x) for l in policy.layers for x in need])
    kp: dict[int, list[np.ndarray]] = {l: [] for l in policy.layers}
    bank_k, bank_d, refs = [], [], []
    names = [layer_key(l, "K") for l in policy.layers] + ["bank/keys", "bank/deltas"]
    for b, gs, arr in live_batch_arrays(store, live, names, optional=(UNITS,)):
        rows = key_rows(arr, gs)
        for l in policy.layers:
            kp[l].append(arr[layer_key(l, "K")][rows])
        bank_k.append(arr["bank/keys"][gs])
        bank_d.append(arr["bank/deltas"][gs])
        refs.extend((b, g) for g in gs)
    ctx = {}
    for l in policy.layers:
        KpKpT = None
        if kp[l] and (policy.project or policy.hold_earlier):              # the solves that use it
            Kp = torch.from_numpy(np.concatenate(kp[l])).to(device)          # (n_live, d_in) fp32
            KpKpT = (Kp.t() @ Kp).to(torch.float64)                          # fp32 BLAS: 2× faster
        ctx[l] = LayerContext(
            P=torch.from_numpy(base[layer_key(l, "P")]).to(device) if policy.project else None,
            mom2=torch.from_numpy(base[layer_key(l, "mom2")]).to(device) if mom2 else None,
            KpKpT=KpKpT,
        )
    bank = ResidualBank.empty(base[layer_key(policy.layers[-1], need[0])].shape[0], d_model)
    if bank_k:
        bank.extend(torch.from_numpy(np.concatenate(bank_k)), torch.from_numpy(np.concatenate(bank_d)), refs)
    return ctx, bank


def value_metric(store: Store, policy: Policy, device) -> torch.Tensor | None:
    """The inverse metric δ's normalized steps are measured in: None (Euclidean), or with
    value_metric fisher the preconditioner of the F that init stored."""
    if policy.value_metric != "fisher":
        return None
    got = store.base_arrays([], optional=(FISHER,))
    if FISHER not in got:
        raise BadInput(f"store {store.path} has no residual Fisher: its init ran with value_metric "
                       f"{json.loads(store.policy_json).get('value_metric', 'euclidean')!r}, and "
                       f"value_metric 'fisher' steps δ in it",
                       hint="push with value_metric euclidean, or init a new store with this policy")
    return preconditioner(torch.from_numpy(got[FISHER])).to(device)


def push(path, fact_file, dry_run: bool = False, log=_quiet, wait: bool = True,
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
    session = Session.open(store, log=log, records=records, keep_sums=True)
    verify(session.current(), expected_fingerprints(store, records), "weights at head")
    policy = session.policy.with_overrides(**overrides) if overrides else session.policy
    timings = {"load": time.perf_counter() - t}

    t = time.perf_counter()
    batch_id = history.next_id(records)
    plans = history.plan_groups([f.to_dict() for f in ff.facts], records, merge=policy.merge_same_subject)
    by_id = {r.id: r for r in records}

    def earlier(ref):
        return Fact.from_dict(by_id[ref[0]].facts[ref[1]])

    groups = [Group(p.subject, [ff.facts[i] for i in p.new] + [earlier(r) for r in p.carried]) for p in plans]
    replaced = {r for p in plans for r in p.replaces}
    live = [g for g in history.live_groups(records) if g not in replaced]
    device = next(session.model.parameters()).device
    layer_ctx, bank = protection(store, policy, live, device, session.model.config.hidden_size)
    metric = value_metric(store, policy, device)
    timings["bookkeeping"] = time.perf_counter() - t

    n_rows, _ = neighbor_rows(session.tok, ff.facts)
    with session.weights(session.base()):
        base_preds = argmax_tokens(session.model, session.tok, n_rows) if n_rows else []

    log(f"batch {batch_id}: {len(ff.facts)} facts in {len(groups)} groups, "
        f"{len(live)} earlier groups protected")
    edit = compute_edit(session.model, session.tok, groups, session.contexts, policy, layer_ctx, bank, log=log,
                        metric=metric)
    timings.update(edit.timings)
    # compute_edit added each Δ to the rounded head; the new head is base + every Δ rounded
    # once, the floats a rollback to this batch computes (and the fingerprint records)
    session.apply(session.with_edit(edit.factors))

    t = time.perf_counter()
    scores = score_facts(session.model, session.tok, ff.facts, base_preds)
    timings["evaluate"] = time.perf_counter() - t
    warnings = []
    for f, s, in zip(ff.facts, scores):
        if not s.efficacy:
            warnings.append(f"line {f.line}: {f.render()!r} does not yet give {f.target!r}")
    for g, v, r, w in zip(groups, edit.values, edit.realized, edit.written):
        if not w:
            warnings.append(f"group {g.subject!r} left unwritten: its key has no room outside preserved "
                            f"knowledge and earlier edits (realized {float(r):.0%} < min_realized "
                            f"{policy.min_realized:g})")
        elif not reached_stop(v.nll, v.margin, policy) and v.nll > max(1.0, 20 * policy.early_stop_loss):
            warnings.append(f"group {g.subject!r}: optimization ended far from its target (NLL {v.nll:.2f})")

    t = time.perf_counter()
    after = {str(l): fingerprint(w) for l, w in session.current().items()}
    arrays = {"bank/keys": edit.bank_keys.cpu().numpy(), "bank/deltas": edit.deltas.cpu().numpy(),
              UNITS: edit.unit_group.cpu().numpy()}
    for l, (A, B) in edit.factors.items():
        arrays[layer_key(l, "A")] = A.cpu().numpy()
        arrays[layer_key(l, "B")] = B.cpu().numpy()
        arrays[layer_key(l, "K")] = edit.keys[l].cpu().numpy()
    summary = summarize(scores)
    record = history.BatchRecord(
        id=batch_id, created=history.utc_now(), source=source, sha256=ff.sha256, status=history.ACTIVE,
        facts=[f.to_dict() for f in ff.facts], groups=[p.to_record(batch_id) for p in plans],
        supersedes=[s for p in plans for s in p.supersedes],
        efficacy=[float(s.efficacy) for s in scores], metrics=dict(summary),
        fingerprint_after=after, policy_digest=policy.digest(),
    )
    record.metrics["groups"] = [{"nll_start": round(v.nll_start, 4), "nll": round(v.nll, 4), "steps": v.steps,
                                 "realized": round(float(r), 4), **({} if w else {"written": False})}
                                for v, r, w in zip(edit.values, edit.realized, edit.written)]   # the report's rows add to these
    if not dry_run:
        tx.add_batch(record, arrays)
    timings["store"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    record.timings = {k: round(v, 3) for k, v in timings.items()}
    group_rows = [{**g.to_dict(), **m, "delta_norm": round(float(v.delta.norm()), 3), "h_norm": round(v.h_norm, 3)}
                  for g, m, v in zip(record.groups, record.metrics["groups"], edit.values)]
    return PushReport(batch_id, ff.facts, scores, summary, group_rows, record.supersedes,
                      record.timings, dry_run, warnings)


# ----------------------------------------------------------------------------- rollback


def rollback(path, to: int, wait: bool = True) -> dict:
    """Make batch `to` the head (0 = base); verified against the recorded fingerprints."""
    store = Store.open(path)
    with store.writer(wait=wait) as tx:
        before = history.head(tx.records)
        new = history.rolled_back(tx.records, to)
        policy = Policy.model_validate_json(store.policy_json)
        verify(head_weights(store, new, policy), expected_fingerprints(store, new), f"rollback to {to}")
        reverted = [r.id for r, o in zip(new, tx.records) if r.status != o.status]
        tx.set_records(new)
    return {"head_before": before, "head": to, "reverted": reverted}


# ----------------------------------------------------------------------------- export / eval


def _records_at(store: Store, at: int | None):
    if at is None:
        return store.records
    return history.rolled_back(store.records, at)


def export(path, out, at: int | None = None, log=_quiet, format: str = "merged") -> dict:
    """Write the model at head (or after batch `at`) as a plain transformers checkpoint
    (format "merged"), or the cumulative edit as a PEFT LoRA adapter (format "peft")."""
    if format == "peft":
        from .peft_export import export_peft

        return export_peft(path, out, at=at, log=log)
    if format != "merged":
        raise BadInput(f"unknown export format {format!r}", hint="use 'merged' or 'peft'")
    store = Store.open(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not empty", hint="export into a new directory")
    records = _records_at(store, at)
    session = Session.open(store, log=log, records=records)
    verify(session.current(), expected_fingerprints(store, records), "export")
    with staged_dir(out) as tmp:
        session.model.save_pretrained(tmp)
        session.tok.save_pretrained(tmp)
        meta = {"lifelong_version": __version__, "store": str(store.path), "head": history.head(records),
                "fingerprints": expected_fingerprints(store, records)}
        (tmp / "lifelong_export.json").write_text(json.dumps(meta, indent=2))
    return {"out": str(out), **meta}


EVAL_PREFIXES, EVAL_PREFIX_TOKENS, FLUENCY_TOKENS = 10, 5, 32


def _eval_prefixes(model, tok, seed: int) -> list[str]:
    """10 distinct 5-token prefixes, sampled apart from the edit's own contexts (DESIGN §6)."""
    return context_templates(model, tok, EVAL_PREFIXES, EVAL_PREFIX_TOKENS, seed=seed)[1:]


@torch.no_grad()
def fluency(model, tok, prompts: list[str], new_tokens: int = FLUENCY_TOKENS) -> float | None:
    """ROME/MEMIT fluency: weighted 2/3-gram entropy of greedy continuations of the prompts."""
    from .metrics import ngram_entropy

    if not prompts:
        return None
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],  # no token_type_ids:
                             max_new_tokens=new_tokens, do_sample=False,             # 4.57 rejects them
                             pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = side
    return ngram_entropy(out[:, enc["input_ids"].shape[1]:].tolist())


def live_facts(store: Store) -> tuple[list[Fact], list[int]]:
    """Every live fact at head, whole (as pushed), and the batch it came from."""
    full: dict[int, list[dict]] = {}
    facts, origin = [], []
    for b, i in history.live_facts(store.records):
        if b not in full:
            full[b] = store.batch_facts(b)
        facts.append(Fact.from_dict(full[b][i]))
        origin.append(b)
    return facts, origin


def evaluate(path, fact_file=None, prefixes: int = EVAL_PREFIXES, log=_quiet) -> dict:
    """DESIGN §6 metrics for a fact file, or retention of every live fact at head:
    strict efficacy (bare and under `prefixes` sampled prefixes), paraphrases, neighbors
    unchanged vs the base model, fluency and held-out perplexity, each beside the base's."""
    store = Store.open(path)
    session = Session.open(store, log=log)
    if fact_file is not None:
        facts = load_facts(fact_file).facts
        origin: list[int | None] = [None] * len(facts)
    else:
        facts, origin = live_facts(store)
    n_rows, _ = neighbor_rows(session.tok, facts)
    heldout = store.info.get("heldout") or []
    prompts = [f.render() for f in facts]
    with session.weights(session.base()):
        base_preds = argmax_tokens(session.model, session.tok, n_rows) if n_rows else []
        ppl_base = perplexity(session.model, heldout) if heldout else None
        fluency_base = fluency(session.model, session.tok, prompts)
        ctx = store.info.get("eval_prefixes") or _eval_prefixes(session.model, session.tok, 3)
    scores = score_facts(session.model, session.tok, facts, base_preds, prefixes=ctx[:prefixes])
    ppl = perplexity(session.model, heldout) if heldout else None
    summary = summarize(scores)
    summary.update({"fluency": fluency(session.model, session.tok, prompts), "fluency_base": fluency_base,
                    "perplexity": ppl, "perplexity_base": ppl_base,
                    "perplexity_drift": (ppl / ppl_base - 1) if ppl and ppl_base else None,
                    "head": history.head(store.records), "source": str(fact_file) if fact_file else "retention"})
    return {"summary": summary, "facts": [{"subject": f.subject, "prompt": f.prompt, "target": f.target,
                                           "batch": b, **s.to_dict()} for f, b, s in zip(facts, origin, scores)]}


def complete(path, prompts: list[str], max_new_tokens: int = 6, at: int | None = None, log=_quiet) -> list[dict]:
    """Greedy continuations of plain prompts by the model at head (or after batch `at`)."""
    store = Store.open(path)
    session = Session.open(store, log=log, records=_records_at(store, at))
    out = []
    for prompt in prompts:
        enc = session.tok(prompt, return_tensors="pt").to(next(session.model.parameters()).device)
        with torch.no_grad():
            ids = session.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=session.tok.pad_token_id)
        text = session.tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append({"prompt": prompt, "completion": text})
    return out
