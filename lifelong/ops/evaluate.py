"""`lifelong eval`: DESIGN §6 metrics for a fact file, or retention of every live fact at head."""
from __future__ import annotations

from lifelong.eval.fluency import fluency
from lifelong.eval.meter import Meter
from lifelong.eval.metrics import argmax_tokens
from lifelong.eval.scoring import EVAL_PREFIXES, eval_prefixes, neighbor_rows, score_facts, summarize
from lifelong.facts import Fact, load_facts
from lifelong.ops import quiet
from lifelong.store import history
from lifelong.store.store import Store


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


def evaluate(path, fact_file=None, prefixes: int = EVAL_PREFIXES, log=quiet) -> dict:
    """DESIGN §6 metrics for a fact file, or retention of every live fact at head:
    strict efficacy (bare and under `prefixes` sampled prefixes), paraphrases, neighbors
    unchanged vs the base model, fluency and held-out perplexity, each beside the base's."""
    store = Store.open(path)
    if fact_file is not None:
        facts = load_facts(fact_file).facts
        origin: list[int | None] = [None] * len(facts)
    else:
        facts, origin = live_facts(store)
    meter = Meter(log)
    session = meter.base(store)
    n_rows, _ = neighbor_rows(session.tok, facts)
    prompts = [f.render() for f in facts]
    base_preds = argmax_tokens(session.model, session.tok, n_rows) if n_rows else []
    fluency_base = fluency(session.model, session.tok, prompts)
    ctx = store.info.get("eval_prefixes") or eval_prefixes(session.model, session.tok, 3)
    records = store.records
    session = meter.at(store, records)
    scores = score_facts(session.model, session.tok, facts, base_preds, prefixes=ctx[:prefixes])
    ppl, ppl_base = meter.perplexity(store, records), meter.ppl_base
    summary = summarize(scores)
    summary.update({"fluency": fluency(session.model, session.tok, prompts), "fluency_base": fluency_base,
                    "perplexity": ppl, "perplexity_base": ppl_base,
                    "perplexity_drift": (ppl / ppl_base - 1) if ppl and ppl_base else None,
                    "head": history.head(records), "source": str(fact_file) if fact_file else "retention"})
    return {"summary": summary, "facts": [{"subject": f.subject, "prompt": f.prompt, "target": f.target,
                                           "batch": b, **s.to_dict()} for f, b, s in zip(facts, origin, scores)]}
