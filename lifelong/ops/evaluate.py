"""`lifelong eval`: DESIGN §6 metrics for a fact file, or retention of every live fact at head."""
from __future__ import annotations

from lifelong.eval.fluency import fluency
from lifelong.eval.meter import Meter
from lifelong.eval.budget import edit_budget
from lifelong.eval.scoring import EVAL_PREFIXES, base_neighbors, eval_prefixes, score_facts, summarize
from lifelong.facts import Fact, load_facts
from lifelong.ops import quiet
from lifelong.policy import policy_from_json
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
    unchanged vs the base model (and among the neighbors it was sure of), fluency and
    held-out perplexity, each beside the base's, and the edit budget left at that drift."""
    store = Store.open(path)
    if fact_file is not None:
        facts = load_facts(fact_file).facts
        origin: list[int | None] = [None] * len(facts)
    else:
        facts, origin = live_facts(store)
    meter = Meter(log)
    session = meter.base(store)
    prompts = [f.render() for f in facts]
    base_answers = base_neighbors(session.model, session.tok, facts)
    fluency_base = fluency(session.model, session.tok, prompts)
    ctx = store.info.get("eval_prefixes") or eval_prefixes(session.model, session.tok, 3)
    records = store.records
    session = meter.at(store, records)
    scores = score_facts(session.model, session.tok, facts, base_answers, prefixes=ctx[:prefixes])
    ppl, ppl_base = meter.perplexity(store, records), meter.ppl_base
    summary = summarize(scores)
    summary.update({"fluency": fluency(session.model, session.tok, prompts), "fluency_base": fluency_base,
                    "perplexity": ppl, "perplexity_base": ppl_base,
                    "perplexity_drift": (ppl / ppl_base - 1) if ppl and ppl_base else None,
                    "head": history.head(records), "source": str(fact_file) if fact_file else "retention"})
    drift = summary["perplexity_drift"]
    now = (len(history.live_facts(records)), drift) if drift is not None else None
    summary["budget"] = edit_budget(records, policy_from_json(store.policy_json).gates.max_perplexity_drift,
                                    now=now, measured_by="eval" if now else None)
    return {"summary": summary, "facts": [{"subject": f.subject, "prompt": f.prompt, "target": f.target,
                                           "batch": b, **s.to_dict()} for f, b, s in zip(facts, origin, scores)]}
