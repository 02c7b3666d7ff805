"""Turning facts into token rows: where the subject ends and where the target is scored.

A row is the tokens of `context ⊕ prompt(subject)` followed by the target's tokens;
the target is tokenized on its own with a leading space (" Paris", not "Paris"),
exactly as evaluation scores it. The last subject token is found from character
offsets, so a subject whose last token merges with the next character is still found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.errors import BadInput


@dataclass(frozen=True)
class Row:
    """One teacher-forced sequence: ids[:prompt_len] is the prompt, the rest the target."""

    ids: tuple[int, ...]       # prompt tokens + target tokens
    prompt_len: int            # tokens before the target
    subject_pos: int           # index of the last subject token (-1: not located)

    @property
    def target(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len:]


def target_ids(tok, target: str) -> list[int]:
    text = target if target.startswith(" ") else " " + target
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadInput(f"target {target!r} tokenizes to nothing")
    return ids


def encode_prompt(tok, text: str, subject_end: int | None = None) -> tuple[list[int], int]:
    """Tokens of `text` and the index of the token holding character subject_end-1."""
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=subject_end is not None)
    ids = list(enc["input_ids"])
    if subject_end is None:
        return ids, -1
    pos = -1
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if start < subject_end and end > start:
            pos = i  # last token that starts before the subject's end
    return ids, pos


def make_row(tok, context: str, template: str, subject: str, target: str | None) -> Row:
    """Row for `context` (a string with one "{}") around `template` filled with subject.

    template has one "{}" for the subject; target None gives a prompt-only row.
    """
    prompt = template.replace("{}", subject, 1)
    text = context.replace("{}", prompt, 1)
    subject_end = context.index("{}") + template.index("{}") + len(subject)
    ids, pos = encode_prompt(tok, text, subject_end)
    tgt = target_ids(tok, target) if target is not None else []
    return Row(tuple(ids + tgt), len(ids), pos)


def plain_row(tok, prompt: str, target: str) -> Row:
    """Row for a full prompt (no subject marker), as used by paraphrases and neighbors."""
    ids, _ = encode_prompt(tok, prompt)
    return Row(tuple(ids + target_ids(tok, target)), len(ids), -1)


def pad_rows(rows: list[Row], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids (n, T) of every row minus its last token, and the mask."""
    inputs = [r.ids[:-1] if len(r.ids) > r.prompt_len else r.ids for r in rows]
    width = max(len(x) for x in inputs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(inputs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids.to(device), mask.to(device)


def target_index(rows: list[Row], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, token) triples scoring each target token under teacher forcing.

    The logit at position p predicts token p+1, so target token j of a row is read
    at position prompt_len - 1 + j.
    """
    r_idx, p_idx, t_idx = [], [], []
    for i, r in enumerate(rows):
        for j, token in enumerate(r.target):
            r_idx.append(i)
            p_idx.append(r.prompt_len - 1 + j)
            t_idx.append(token)
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return as_t(r_idx), as_t(p_idx), as_t(t_idx)
