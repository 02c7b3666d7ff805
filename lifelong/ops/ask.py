"""`lifelong ask`: greedy continuations of plain prompts by the model at head, to see an edit."""
from __future__ import annotations

import torch

from lifelong.model.session import Session
from lifelong.ops import quiet
from lifelong.ops.export import records_at
from lifelong.store.store import Store


def complete(path, prompts: list[str], max_new_tokens: int = 6, at: int | None = None, log=quiet) -> list[dict]:
    """Greedy continuations of plain prompts by the model at head (or after batch `at`)."""
    store = Store.open(path)
    session = Session.open(store, log=log, records=records_at(store, at))
    out = []
    for prompt in prompts:
        enc = session.tok(prompt, return_tensors="pt").to(next(session.model.parameters()).device)
        with torch.no_grad():
            ids = session.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=session.tok.pad_token_id)
        text = session.tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append({"prompt": prompt, "completion": text})
    return out
