"""Fluency (DESIGN §6): how varied the model's own greedy continuations stay after edits."""
from __future__ import annotations

import torch

from lifelong.eval.metrics import ngram_entropy

FLUENCY_TOKENS = 32


@torch.no_grad()
def fluency(model, tok, prompts: list[str], new_tokens: int = FLUENCY_TOKENS) -> float | None:
    """ROME/MEMIT fluency: weighted 2/3-gram entropy of greedy continuations of the prompts."""
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
