"""Causal tracing (ROME, Meng et al. 2022, §2 and appendix B): which layers recall a fact.

For one fact (a prompt with the subject written out, and the answer the model gives):

1. clean run: p_clean, the probability of the answer's first token after the prompt, and
   every decoder layer's output h^l_t and every MLP output m^l_t (t a token position);
2. corrupted run: Gaussian noise of std `noise` (by default 3 × the std of the input
   embeddings over the vocabulary, `noise_std`) is added to the input embeddings of the
   subject's tokens; S noise samples (one seed, the same samples for every restoration)
   give p_corrupted, the mean of the S probabilities;
3. restorations, each on the same corrupted samples: (a) hidden state: layer l's output
   at position t is set back to its clean value; (b) MLP window: the MLP outputs of
   layers [l - w/2, l + w/2) (clipped to the model) at position t are set back to theirs.

The indirect effect of (l, t) is p_restored − p_corrupted. Positions are grouped as in
ROME (`CATEGORIES`) so facts of different lengths average; the MLP effect at the last
subject token is what MEMIT picks its edit layers from (`suggest_window`).

Positions before the first subject token are never run: with causal attention the noise
cannot reach them, so restoring them changes nothing and their effect is recorded as 0.

Pure measurement: a loaded transformers causal LM and its tokenizer in, numbers out;
forward passes only, under torch.no_grad(), the model is not changed (hooks are removed).
May import `lifelong.model` and the foundation; never `store` or `ops`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lifelong.errors import BadInput
from lifelong.model.hf_cache import last_logits_only
from lifelong.model.hooks import _hidden
from lifelong.model.prompts import encode_prompt, target_ids

# ROME's position groups (its average_causal_effects notebook); tokens before the subject
# (a BOS token, "The mother tongue of") belong to none.
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token")
LAST_SUBJECT = CATEGORIES.index("last subject token")
NOISE_FACTOR = 3.0   # noise std, in stds of the input embeddings (ROME §2)

HIDDEN, MLP = "hidden", "mlp"
# what one restored run sets back to its clean value: (kind, layer, position) triples
Restoration = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class TraceFact:
    """A fact to trace: `prompt` (subject written out) should be followed by `answer`."""

    prompt: str
    subject: str
    answer: str          # scored by its first token, tokenized with a leading space
    subject_start: int   # character offset of the subject in `prompt`
    line: int = 0        # where it came from in its file (0: unknown), for messages

    @property
    def subject_end(self) -> int:
        return self.subject_start + len(self.subject)


@dataclass(frozen=True)
class Encoded:
    """A fact as tokens: ids[first..last] are the subject, `answer` the scored token id."""

    ids: tuple[int, ...]
    first: int
    last: int
    answer: int


def encode(tok, fact: TraceFact) -> Encoded:
    """Tokens of the prompt (special tokens the tokenizer adds, e.g. BOS, kept) and where the
    subject lies, from character offsets as `prompts.encode_prompt` finds the last subject token."""
    ids, last = encode_prompt(tok, fact.prompt, fact.subject_end)
    _, first = encode_prompt(tok, fact.prompt, fact.subject_start + 1)  # the token holding its 1st char
    if first < 0 or last < first:
        where = f"line {fact.line}: " if fact.line else ""
        raise BadInput(f"{where}subject {fact.subject!r} not found among the tokens of {fact.prompt!r}")
    return Encoded(tuple(ids), first, last, target_ids(tok, fact.answer)[0])


# -- the model's parts --------------------------------------------------------

def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers in order: `base_model.layers` (Llama, Qwen, Gemma, Mistral) or
    `base_model.h` (GPT-2, GPT-J)."""
    base = model.base_model
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise BadInput(f"cannot trace {type(model).__name__}: its base model "
                   f"{type(base).__name__} has neither .layers nor .h (a list of decoder layers)")


def mlp_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's `mlp` module, in order."""
    layers = decoder_layers(model)
    missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if missing:
        raise BadInput(f"cannot trace {type(model).__name__}: decoder layer {missing[0]} has no .mlp module")
    return [layer.mlp for layer in layers]


def window_layers(layer: int, n_layers: int, window: int) -> range:
    """Layers [layer - window/2, layer + window/2) clipped to the model (ROME's rule; an odd
    window has one more layer above)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def noise_std(model, factor: float = NOISE_FACTOR, chunk: int = 8192) -> float:
    """`factor` × the std of the input embedding module's outputs over the whole vocabulary
    (outputs, not weights: a scaled embedding such as Gemma's is measured as the layers see it)."""
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    device = emb.weight.device
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for lo in range(0, vocab, chunk):
            x = emb(torch.arange(lo, min(vocab, lo + chunk), device=device)).double()  # (c, d)
            total += x.sum().item()
            total_sq += (x * x).sum().item()
            count += x.numel()
    mean = total / count
    return factor * max(total_sq / count - mean * mean, 0.0) ** 0.5


# -- forward passes -----------------------------------------------------------

def _replace_hook(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor):
    """A forward hook setting output[rows[k], positions[k]] = values[k] (K,), (K,), (K, d)."""
    def hook(_module, _args, output):
        h = _hidden(output).clone()              # (B, T, d)
        h[rows, positions] = values.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return hook


def _noise_hook(first: int, noise: torch.Tensor):
    """A forward hook on the input embeddings adding noise (B, n_subject, d) to the subject."""
    def hook(_module, _args, output):
        x = output.clone()                       # (B, T, d)
        x[:, first:first + noise.shape[1]] += noise.to(x.dtype)
        return x
    return hook


def _answer_probs(model, ids: torch.Tensor, answer: int, hooks: list) -> torch.Tensor:
    """p(answer) after the last position of each row of ids (B, T), with forward hooks
    [(module, fn)] in place for this one pass -> (B,)."""
    last_only = last_logits_only(model)                  # only the last position's logits are needed
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, **last_only).logits  # (B, 1 or T, V)
    finally:
        for h in handles:
            h.remove()
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer]


class _Tracer:
    """One fact on one model: the clean run's states and the corrupted samples, reused by
    every restoration."""

    def __init__(self, model, tok, fact: TraceFact, samples: int, noise: float, seed: int):
        if samples < 1:
            raise BadInput(f"samples must be at least 1, got {samples}")
        self.model, self.fact, self.samples = model, fact, samples
        self.enc = encode(tok, fact)
        self.layers, self.mlps = decoder_layers(model), mlp_modules(model)
        self.emb = model.get_input_embeddings()
        device = self.emb.weight.device
        self.ids = torch.tensor([self.enc.ids], device=device)           # (1, T)
        # clean run: every layer's and MLP's output at every position
        self.clean: dict[str, list[torch.Tensor]] = {HIDDEN: [None] * len(self.layers),
                                                     MLP: [None] * len(self.layers)}

        def keep(kind, i):
            def hook(_module, _args, output):
                self.clean[kind][i] = _hidden(output)[0].detach()      # (T, d)
            return hook

        spec = [(m, keep(HIDDEN, i)) for i, m in enumerate(self.layers)]
        spec += [(m, keep(MLP, i)) for i, m in enumerate(self.mlps)]
        self.p_clean = _answer_probs(model, self.ids, self.enc.answer, spec).item()
        # one set of noise samples for every restoration
        n_subject = self.enc.last - self.enc.first + 1
        gen = torch.Generator().manual_seed(seed)
        d = self.emb.weight.shape[1]
        self.noise = (noise * torch.randn(samples, n_subject, d, generator=gen)).to(device)  # (S, n, d)
        self.p_corrupted = self.restored([()])[0]

    def restored(self, restorations: list[Restoration], max_rows: int = 512) -> list[float]:
        """p(answer), averaged over the noise samples, for each restoration (in forwards of at
        most max_rows rows: S rows per restoration)."""
        per_pass = max(1, max_rows // self.samples)
        out: list[float] = []
        for lo in range(0, len(restorations), per_pass):
            out += self._pass(restorations[lo:lo + per_pass])
        return out

    def _pass(self, restorations: list[Restoration]) -> list[float]:
        S, R = self.samples, len(restorations)
        wanted: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for r, triples in enumerate(restorations):
            for kind, layer, pos in triples:
                rows, positions = wanted.setdefault((kind, layer), ([], []))
                rows += range(r * S, (r + 1) * S)
                positions += [pos] * S
        device = self.ids.device
        hooks = [(self.emb, _noise_hook(self.enc.first, self.noise.repeat(R, 1, 1)))]  # row r*S+s: sample s
        for (kind, layer), (rows, positions) in wanted.items():
            module = (self.layers if kind == HIDDEN else self.mlps)[layer]
            pos = torch.tensor(positions, device=device)
            hooks.append((module, _replace_hook(torch.tensor(rows, device=device), pos,
                                                self.clean[kind][layer][pos])))
        probs = _answer_probs(self.model, self.ids.expand(R * S, -1), self.enc.answer, hooks)  # (R*S,)
        return probs.view(R, S).mean(dim=1).tolist()


def restored_probs(model, tok, fact: TraceFact, restorations: list[Restoration], *, samples: int = 10,
                   noise: float | None = None, seed: int = 0) -> tuple[float, float, list[float]]:
    """(p_clean, p_corrupted, [p(answer) with each restoration]) for one fact: a restoration
    is a tuple of (kind "hidden"|"mlp", layer, position) set back to their clean values together."""
    noise = noise_std(model) if noise is None else noise
    tracer = _Tracer(model, tok, fact, samples, noise, seed)
    return tracer.p_clean, tracer.p_corrupted, tracer.restored(restorations)


# -- results --------------------------------------------------------------------

def categorize(scores: np.ndarray, first: int, last: int) -> np.ndarray:
    """(L, T) per-position values -> (L, len(CATEGORIES)) per ROME position group; a group a
    fact lacks (no middle subject tokens, nothing after the subject) is NaN. Middle and
    further tokens are averaged within the fact, so every fact weighs the same."""
    L, T = scores.shape
    nan = np.full(L, np.nan)

    def mean(lo, hi):
        return scores[:, lo:hi].mean(axis=1) if hi > lo else nan

    return np.stack([scores[:, first], mean(first + 1, last), scores[:, last],
                     scores[:, last + 1] if last + 1 < T else nan, mean(last + 2, T - 1),
                     scores[:, T - 1]], axis=1)


def _nanmean(stack: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where every entry is NaN (no warning)."""
    ok = ~np.isnan(stack)
    n = ok.sum(axis=0)
    total = np.where(ok, stack, 0.0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


@dataclass
class FactTrace:
    """One fact's trace; hidden and mlp are p(answer) after each restoration."""

    fact: TraceFact
    tokens: list[str]       # the prompt's tokens, decoded one by one
    first: int              # first subject token
    last: int               # last subject token
    answer_id: int
    p_clean: float
    p_corrupted: float
    hidden: np.ndarray      # (L, T) layer l's output restored at position t
    mlp: np.ndarray         # (L, T) MLP outputs of window_layers(l) restored at position t

    def effect(self, kind: str) -> np.ndarray:
        """(L, T) indirect effect p_restored − p_corrupted of `kind` ("hidden" | "mlp")."""
        return (self.hidden if kind == HIDDEN else self.mlp) - self.p_corrupted

    def by_category(self, kind: str) -> np.ndarray:
        """(L, len(CATEGORIES)) indirect effect per ROME position group (NaN: group absent)."""
        return categorize(self.effect(kind), self.first, self.last)


@dataclass
class Trace:
    """Traces of several facts and their average indirect effects per position group."""

    facts: list[FactTrace]
    window: int
    samples: int
    noise: float            # the noise std used
    seed: int
    hidden_effect: np.ndarray   # (L, len(CATEGORIES)) mean over facts; NaN if no fact has the group
    mlp_effect: np.ndarray      # (L, len(CATEGORIES))

    @property
    def n_layers(self) -> int:
        return self.hidden_effect.shape[0]

    def at_last_subject(self, kind: str) -> np.ndarray:
        """(L,) mean indirect effect of `kind` at the last subject token."""
        return (self.hidden_effect if kind == HIDDEN else self.mlp_effect)[:, LAST_SUBJECT]


def trace_fact(model, tok, fact: TraceFact, *, samples: int = 10, window: int = 10,
               noise: float | None = None, seed: int = 0, max_rows: int = 512,
               last_subject_only: bool = False) -> FactTrace:
    """Restore each (layer, position) from the first subject token on, hidden state and MLP
    window, on `samples` noise samples (max_rows rows per forward pass). last_subject_only:
    only the last subject token's column (what the edit layers are picked from; a few times
    cheaper), the other positions NaN."""
    if window < 1:
        raise BadInput(f"window must be at least 1 layer, got {window}")
    noise = noise_std(model) if noise is None else noise
    t = _Tracer(model, tok, fact, samples, noise, seed)
    L, T, first = len(t.layers), len(t.enc.ids), t.enc.first
    run = [t.enc.last] if last_subject_only else list(range(first, T))
    cells = [(layer, pos) for layer in range(L) for pos in run]
    hidden = t.restored([((HIDDEN, layer, pos),) for layer, pos in cells], max_rows)
    mlp = t.restored([tuple((MLP, j, pos) for j in window_layers(layer, L, window)) for layer, pos in cells],
                     max_rows)
    grids = []
    for values in (hidden, mlp):
        grid = np.full((L, T), t.p_corrupted)   # before the subject: restoring changes nothing
        grid[:, first:] = np.nan
        grid[:, run] = np.asarray(values).reshape(L, len(run))
        grids.append(grid)
    tokens = [tok.decode([i]) for i in t.enc.ids]
    return FactTrace(fact, tokens, first, t.enc.last, t.enc.answer, t.p_clean, t.p_corrupted, *grids)


def trace(model, tok, facts: list[TraceFact], *, samples: int = 10, window: int = 10,
          noise: float | None = None, seed: int = 0, max_rows: int = 512, grid_facts: int | None = None,
          log=lambda *_: None) -> Trace:
    """Trace every fact and average the indirect effects per position group over facts; the
    facts after the first `grid_facts` (None: all get the grid) only at the last subject token."""
    if not facts:
        raise BadInput("no facts to trace")
    noise = noise_std(model) if noise is None else noise
    traces = []
    for i, f in enumerate(facts, 1):
        log(f"tracing fact {i}/{len(facts)}: {f.prompt!r} -> {f.answer!r}")
        traces.append(trace_fact(model, tok, f, samples=samples, window=window, noise=noise,
                                 seed=seed, max_rows=max_rows,
                                 last_subject_only=grid_facts is not None and i > grid_facts))
    avg = {kind: _nanmean(np.stack([ft.by_category(kind) for ft in traces])) for kind in (HIDDEN, MLP)}
    return Trace(traces, window, samples, noise, seed, avg[HIDDEN], avg[MLP])


def known_facts(model, tok, facts: list[TraceFact], batch: int = 16) -> list[TraceFact]:
    """The facts whose answer's first token is the model's strict argmax after the prompt
    (strictly above every other token: the model knows them), in their order."""
    device = model.get_input_embeddings().weight.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kept = []
    for lo in range(0, len(facts), batch):
        chunk = facts[lo:lo + batch]
        encs = [encode(tok, f) for f in chunk]
        width = max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):   # right padding: a causal LM's last real position ignores pads
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for i, (f, e) in enumerate(zip(chunk, encs)):
            top = logits[i, len(e.ids) - 1].float().topk(2)
            if top.indices[0].item() == e.answer and top.values[0] > top.values[1]:
                kept.append(f)
    return kept


def suggest_window(avg_mlp_effect, n_edit_layers: int = 5) -> list[int]:
    """The `n_edit_layers` consecutive layers whose summed MLP indirect effect (avg_mlp_effect:
    (L,), one value per layer, e.g. `Trace.at_last_subject("mlp")`) is largest. Ties go to
    the lowest layers (the earliest run wins unless a later one is strictly larger)."""
    effect = np.asarray(avg_mlp_effect, dtype=float)
    if effect.ndim != 1:
        raise BadInput(f"suggest_window takes one value per layer, got shape {effect.shape}")
    L = effect.shape[0]
    if not 1 <= n_edit_layers <= L:
        raise BadInput(f"cannot pick {n_edit_layers} consecutive layers of {L}")
    if np.isnan(effect).any():
        raise BadInput("the MLP effect has NaN entries; trace at least one fact")
    sums = [effect[lo:lo + n_edit_layers].sum() for lo in range(L - n_edit_layers + 1)]
    best = 0
    for lo, s in enumerate(sums):
        if s > sums[best]:
            best = lo
    return list(range(best, best + n_edit_layers))
