"""Text for preserved-knowledge statistics and for the context prefixes of an edit.

`init` needs text the model should keep behaving the same on. With `--corpus FILE`
that is the user's text (plain text, or JSONL with a "text" field); by default the
model samples it itself, batched, so `init` works offline with nothing but the model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lifelong.errors import BadInput
from lifelong.model.hf_cache import cache_kwarg, cache_of, last_logits_only, preallocated_cache

# Openers for sampled text, as in MEMIT's context templates.
SAMPLE_BATCH = 160      # rows sampled at once: init samples 157 sequences of 128 tokens
OPENERS = ["The", "Therefore", "Because", "I", "You", "In", "A", "When", "It", "This", "After", "Many"]


def padded_batches(seqs: list[list[int]], batch: int, device, by_length: bool = True):
    """Yield (ids, mask), each (n, T) long on device, for batches of token sequences,
    right-padded with 0 (mask 0 there); by_length batches sequences of similar length together."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if by_length else range(len(seqs))
    order = list(order)
    for start in range(0, len(order), batch):
        chunk = [seqs[i] for i in order[start : start + batch]]
        width = max(len(s) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        yield ids.to(device), mask.to(device)


def read_corpus(path: str | Path) -> list[str]:
    """Paragraphs of a plain-text or JSONL ("text" field) corpus file."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p}: cannot read corpus: {exc}") from exc
    texts: list[str] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{p}:{n}: line: bad JSON ({exc.msg})") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise BadInput(f"{p}:{n}: text: a JSON object with a string 'text' field is expected")
            texts.append(rec["text"])
    else:
        texts = [t.strip() for t in raw.split("\n") if t.strip()]
    if not texts:
        raise BadInput(f"{p}: the corpus holds no text")
    return texts


def opening_tokens(tok) -> list[int]:
    """The special tokens the tokenizer puts before a text (Gemma's <bos>; none for SmolLM2)."""
    bare = tok("x", add_special_tokens=False)["input_ids"]
    full = tok("x", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
    return list(full[:at])


def chunk_tokens(tok, texts: list[str], n_tokens: int, seq_len: int = 128) -> list[list[int]]:
    """Token sequences of at most seq_len, n_tokens in all (fewer if the corpus is short),
    each opened as the tokenizer opens a text: a model trained always to see <bos> first
    (Gemma) reads a sequence without it as nothing it knows."""
    head = opening_tokens(tok)
    body = seq_len - len(head)
    seqs, total, buf = [], 0, []
    for text in texts:
        buf.extend(tok(text + "\n", add_special_tokens=False)["input_ids"])
        while len(buf) >= body and total < n_tokens:
            take = min(seq_len, n_tokens - total)
            seqs.append(head + buf[: take - len(head)])
            total += take
            buf = buf[body:]
        if total >= n_tokens:
            break
    rest = n_tokens - total - len(head)
    if rest > 0 and len(buf) > 1:
        seqs.append(head + buf[:rest])
    return seqs


@torch.no_grad()
def sample_sequences(model, tok, n_seq: int, length: int, seed: int, top_k: int = 50,
                     batch: int | None = None, progress=None, on_step=None) -> list[list[int]]:
    """n_seq sampled continuations of OPENERS, `length` new tokens each, in batches of at most
    SAMPLE_BATCH of even size (a step costs little more for 157 rows than for 32 on a CPU:
    init's 20k tokens sample 1.45x faster in one batch than in batches of 32).
    on_step(mask): called before each forward with (rows, tokens) 1 where its input is real,
    so hooks can read every token the model sees (all but each sequence's last)."""
    if batch is None:
        batch = math.ceil(n_seq / math.ceil(n_seq / SAMPLE_BATCH)) if n_seq else 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    last_only = last_logits_only(model)
    for start in range(0, n_seq, batch):
        count = min(batch, n_seq - start)
        openers = [OPENERS[(start + i) % len(OPENERS)] for i in range(count)]
        firsts = [tok(o, add_special_tokens=True)["input_ids"] for o in openers]
        width = max(len(f) for f in firsts)
        ids = torch.full((count, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((count, width), dtype=torch.long)
        for i, f in enumerate(firsts):  # left padding keeps every row's last token aligned
            ids[i, width - len(f):] = torch.tensor(f)
            mask[i, width - len(f):] = 1
        ids, mask = ids.to(device), mask.to(device)
        past = preallocated_cache(model, width + length)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, new = ids, []
        for _ in range(length):
            if on_step is not None:
                on_step(mask if step_ids is ids else torch.ones_like(step_ids))
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                        use_cache=True, **{cache_kwarg(model): past}, **last_only)
            past = cache_of(res)
            # top-k of the logits as they come (bfloat16 under autocast): the same values as
            # a float32 copy of all 262k, without making one
            kth = torch.topk(res.logits[:, -1, :], top_k, dim=-1)
            probs = torch.softmax(kth.values.float().cpu(), dim=-1)
            pick = kth.indices.cpu().gather(1, torch.multinomial(probs, 1, generator=gen))  # (count, 1)
            new.append(pick)
            step_ids = pick.to(device)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            pos = pos[:, -1:] + 1
        gen_ids = torch.cat(new, dim=1).tolist()
        out.extend(f + g for f, g in zip(firsts, gen_ids))
        if progress is not None:
            progress(count * length)
    return out


def context_templates(model, tok, n_prefixes: int, prefix_tokens: int, seed: int) -> list[str]:
    """MEMIT's context templates: the bare "{}" and n sampled short prefixes + ". {}"."""
    if n_prefixes == 0:
        return ["{}"]
    seqs = sample_sequences(model, tok, n_prefixes, prefix_tokens, seed=seed, top_k=5)
    templates = ["{}"]
    for s in seqs:
        text = tok.decode(s, skip_special_tokens=True).replace("{", " ").replace("}", " ")
        text = " ".join(text.split())
        templates.append(text + ". {}")
    return templates
