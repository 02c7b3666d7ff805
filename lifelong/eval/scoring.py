"""Per-fact evaluation on a model: efficacy (bare and under sampled prefixes), paraphrases, neighbors vs the base model."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lifelong.facts import Fact
from lifelong.eval.metrics import argmax_tokens, argmax_with_confidence, fraction
from lifelong.model.corpus import context_templates
from lifelong.model.prompts import make_row, plain_row


@dataclass
class FactScore:
    efficacy: bool                      # strict, bare prompt
    prefixed: float | None              # strict, fraction of prefixed prompts
    paraphrase: float | None            # strict, fraction of paraphrases
    neighbors_unchanged: float | None   # same argmax tokens as the base model
    neighbors_true: float | None        # neighbor still gives its own target
    neighbors_unchanged_sure: float | None = None   # unchanged, among neighbors the base model was sure of

    def to_dict(self) -> dict:
        return asdict(self)


def _rows(tok, facts: list[Fact], prefixes: list[str]):
    """All rows to score, tagged (fact index, kind)."""
    rows, tags = [], []
    for i, f in enumerate(facts):
        rows.append(make_row(tok, "{}", f.prompt, f.subject, f.target))
        tags.append((i, "efficacy"))
        for p in prefixes:
            rows.append(make_row(tok, p, f.prompt, f.subject, f.target))
            tags.append((i, "prefixed"))
        for para in f.paraphrases:
            rows.append(plain_row(tok, para, f.target))
            tags.append((i, "paraphrase"))
    return rows, tags


def neighbor_rows(tok, facts: list[Fact]):
    rows, owner = [], []
    for i, f in enumerate(facts):
        for n in f.neighbors:
            rows.append(plain_row(tok, n.prompt, n.target))
            owner.append(i)
    return rows, owner


SURE = 0.5   # the base model's probability of its own answer, at every target position, to count as sure


@dataclass
class BaseNeighbors:
    """What the base model answers on a batch's neighbor prompts (`neighbor_rows` order)."""

    preds: list[tuple[int, ...]]   # argmax tokens over each target span
    sure: list[bool]               # the base model gave each of them probability ≥ SURE


def base_neighbors(model, tok, facts: list[Fact]) -> BaseNeighbors:
    """Run with the base weights: the answers `score_facts` compares neighbors against."""
    n_rows, _ = neighbor_rows(tok, facts)
    if not n_rows:
        return BaseNeighbors([], [])
    preds, conf = argmax_with_confidence(model, tok, n_rows)
    return BaseNeighbors(preds, [c >= SURE for c in conf])


def score_facts(model, tok, facts: list[Fact], base_neighbor_preds: list[tuple] | BaseNeighbors | None = None,
                prefixes: list[str] = ()) -> list[FactScore]:
    """Strict scores per fact. base_neighbor_preds: the base model's answers on
    neighbor_rows(tok, facts) (`base_neighbors`, or its argmax tokens alone; None: neighbors
    not scored). Beside the strict neighbors-unchanged, the same over the neighbors the base
    model was sure of (its top-1 probability ≥ SURE at every target position): most neighbor
    prompts of a small model are low-margin guesses that any change flips."""
    sure = None
    if isinstance(base_neighbor_preds, BaseNeighbors):
        base_neighbor_preds, sure = base_neighbor_preds.preds, base_neighbor_preds.sure
    rows, tags = _rows(tok, facts, list(prefixes))
    preds = argmax_tokens(model, tok, rows)
    hits: dict[tuple[int, str], list[bool]] = {}
    for (i, kind), row, pred in zip(tags, rows, preds):
        hits.setdefault((i, kind), []).append(pred == row.target)
    n_rows, n_owner = neighbor_rows(tok, facts)
    unchanged: dict[int, list[bool]] = {}
    unchanged_sure: dict[int, list[bool]] = {}
    true: dict[int, list[bool]] = {}
    if base_neighbor_preds is not None and n_rows:
        now = argmax_tokens(model, tok, n_rows)
        for j, (i, row, a, b) in enumerate(zip(n_owner, n_rows, now, base_neighbor_preds)):
            unchanged.setdefault(i, []).append(a == b)
            true.setdefault(i, []).append(a == row.target)
            if sure is not None and sure[j]:
                unchanged_sure.setdefault(i, []).append(a == b)
    return [
        FactScore(
            efficacy=all(hits[(i, "efficacy")]),
            prefixed=fraction(hits.get((i, "prefixed"), [])),
            paraphrase=fraction(hits.get((i, "paraphrase"), [])),
            neighbors_unchanged=fraction(unchanged.get(i, [])),
            neighbors_true=fraction(true.get(i, [])),
            neighbors_unchanged_sure=fraction(unchanged_sure.get(i, [])),
        )
        for i in range(len(facts))
    ]


def summarize(scores: list[FactScore]) -> dict:
    """Means over facts of each metric (None where no fact had that kind of prompt)."""
    out = {"n_facts": len(scores)}
    for key in ("efficacy", "prefixed", "paraphrase", "neighbors_unchanged", "neighbors_true"):
        vals = [float(getattr(s, key)) for s in scores if getattr(s, key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    sure = [s.neighbors_unchanged_sure for s in scores if s.neighbors_unchanged_sure is not None]
    if sure:    # only where the base model's answers were scored with their confidence
        out["neighbors_unchanged_sure"] = sum(sure) / len(sure)
    return out


EVAL_PREFIXES, EVAL_PREFIX_TOKENS = 10, 5


def eval_prefixes(model, tok, seed: int) -> list[str]:
    """10 distinct 5-token prefixes, sampled apart from the edit's own contexts (DESIGN §6);
    init stores them, so every later `eval` scores under the same ones."""
    return context_templates(model, tok, EVAL_PREFIXES, EVAL_PREFIX_TOKENS, seed=seed)[1:]
