"""Strict, teacher-forced metrics (DESIGN §6).

A row counts as a success when every target token is the argmax at its position
given the prompt and the earlier target tokens. "Unchanged" compares the argmax
tokens over the target span with the ones the base model produced.
"""
from __future__ import annotations

import math

import torch

from lifelong.model.corpus import padded_batches
from lifelong.model.prompts import Row, pad_rows, target_index


@torch.no_grad()
def argmax_tokens(model, tok, rows: list[Row], batch: int = 64) -> list[tuple[int, ...]]:
    """Per row, the argmax token at each target position (teacher forced)."""
    return argmax_with_confidence(model, tok, rows, batch)[0]


@torch.no_grad()
def argmax_with_confidence(model, tok, rows: list[Row], batch: int = 64) -> tuple[list[tuple[int, ...]], list[float]]:
    """Per row, the argmax token at each target position (teacher forced), and the lowest
    probability the model gives its own argmax over those positions (how sure it is)."""
    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    out: list[tuple[int, ...]] = []
    sure: list[float] = []
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        ids, mask = pad_rows(part, tok.pad_token_id, device)
        h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        r, p, _ = target_index(part, device)
        logits = lm_head(h[r, p])                                                # (n_tgt, vocab)
        top = logits.argmax(-1)                                                  # (n_tgt,)
        prob = torch.softmax(logits.float(), dim=-1).gather(-1, top[:, None])[:, 0].tolist()
        pred = top.tolist()
        i = 0
        for row in part:
            n = len(row.target)
            out.append(tuple(pred[i : i + n]))
            sure.append(min(prob[i : i + n]))
            i += n
    return out, sure


def strict_hits(model, tok, rows: list[Row]) -> list[bool]:
    """Per row: all target tokens are the argmax."""
    return [pred == row.target for pred, row in zip(argmax_tokens(model, tok, rows), rows)]


def fraction(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


@torch.no_grad()
def perplexity(model, seqs: list[list[int]], batch: int = 8) -> float:
    """exp(mean NLL) over every next-token prediction in seqs."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, mask in padded_batches(seqs, batch, device, by_length=False):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:].float()
        total += float((nll * m).sum())
        count += int(m.sum())
    return math.exp(total / max(count, 1))


def ngram_entropy(token_lists: list[list[int]], ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME/MEMIT fluency: weighted n-gram entropy of generations, averaged over texts."""
    from collections import Counter

    scores = []
    for toks in token_lists:
        ent = []
        for n in ns:
            grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
            total = sum(grams.values())
            ent.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
        scores.append(sum(w * e for w, e in zip(weights, ent)) / len(ns))
    return sum(scores) / len(scores) if scores else 0.0
