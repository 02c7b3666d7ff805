"""One loaded model that measures any head of a store: strict efficacy of its facts and
perplexity on its held-out text, beside the base model's. `eval` and the refresh gates
both measure through it.

The model is loaded once, at the base weights (where the base perplexity is measured);
each head is then applied from the store's factors and verified against the recorded
fingerprints. Results are cached by those fingerprints, so the head after one refresh
file is not measured again as the head before the next.
"""
from __future__ import annotations

from lifelong.eval.metrics import perplexity, strict_hits
from lifelong.model.prompts import make_row
from lifelong.model.session import Session, expected_fingerprints, head_weights, verify
from lifelong.store import history
from lifelong.store.store import Store


def _key(fingerprints: dict) -> tuple:
    return tuple(sorted(fingerprints.items()))


class Meter:
    def __init__(self, log):
        self.log = log
        self.session: Session | None = None
        self.hits: dict[tuple, dict[tuple[int, int], bool]] = {}
        self.ppl: dict[tuple, float | None] = {}
        self.ppl_base: float | None = None
        self.applied: tuple | None = None      # the fingerprints of the weights the model holds now

    def base(self, store: Store) -> Session:
        """The model at the base weights (loaded on first use, the base perplexity measured then)."""
        if self.session is None:
            self.session = Session.open(store, log=self.log, records=[])   # base weights
            heldout = store.info.get("heldout") or []
            if heldout:
                self.ppl_base = perplexity(self.session.model, heldout)
                self.ppl[_key(store.base_fingerprint)] = self.ppl_base
        elif self.applied != _key(store.base_fingerprint):
            self.session.apply(self.session.base())
        self.applied = _key(store.base_fingerprint)
        return self.session

    def at(self, store: Store, records) -> Session:
        """The model with the weights at the head of `records`, verified."""
        if self.session is None:
            self.base(store)
        s = self.session
        expected = expected_fingerprints(store, records)
        if self.applied != _key(expected):
            weights = head_weights(store, records, s.policy)
            verify(weights, expected, f"weights at head {history.head(records)}")
            s.apply(weights)
            self.applied = _key(expected)
        return s

    def perplexity(self, store: Store, records) -> float | None:
        """Held-out perplexity at the head of `records` (None: the store has no held-out text)."""
        return self.facts_at(store, records, [])[1]

    def facts_at(self, store: Store, records, refs) -> tuple[dict, float | None]:
        """Strict efficacy of the facts `refs` ((batch id, index) pairs) and perplexity, at the
        head of `records`: ({ref: hit}, perplexity)."""
        key = _key(expected_fingerprints(store, records))
        hits = self.hits.setdefault(key, {})
        missing = [r for r in refs if r not in hits]
        heldout = store.info.get("heldout") or []
        if not missing and key in self.ppl:
            return hits, self.ppl[key]
        s = self.at(store, records)
        if missing:
            by_id = {r.id: r for r in records}
            rows = [make_row(s.tok, "{}", f["prompt"], f["subject"], f["target"])
                    for f in (by_id[b].facts[i] for b, i in missing)]
            hits.update(zip(missing, strict_hits(s.model, s.tok, rows)))
        if key not in self.ppl:
            self.ppl[key] = perplexity(s.model, heldout) if heldout else None
        return hits, self.ppl[key]
