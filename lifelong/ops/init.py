"""`lifelong init`: a store for a base model, with the statistics every later edit needs.

Reads (or samples) preserved-knowledge text, estimates per edited layer C₀ = E[kkᵀ] (from
sampled text, during the sampling passes themselves) and its null-space projector, and with
value_metric fisher the residual Fisher; samples the MEMIT contexts, the evaluation prefixes
and the held-out text; then creates the store in one step.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from lifelong.deltas import fingerprint
from lifelong.edit.fisher import residual_fisher
from lifelong.edit.stats import Moments, projector, second_moments
from lifelong.errors import BadInput, StoreExists
from lifelong.eval.scoring import eval_prefixes
from lifelong.model.corpus import chunk_tokens, context_templates, read_corpus, sample_sequences
from lifelong.model.loading import BUILTIN_MODELS, DEFAULT_MODEL, load_model, resolve_model
from lifelong.model.precision import matmuls, resolve
from lifelong.model.weights import get_module, read_matrix
from lifelong.ops import quiet
from lifelong.policy import find_policy, load_policy
from lifelong.store.layout import FISHER, layer_key
from lifelong.store.store import Store

HELDOUT_SEQS, HELDOUT_LEN = 16, 64          # model-sampled held-out text
HELDOUT_FILE_TOKENS = 4096                  # from a --heldout file, in SEQ_LEN chunks
SEQ_LEN = 128


def init(path, model: str = DEFAULT_MODEL, policy: str | None = None, corpus: str | None = None,
         log=quiet, progress=None, seed: int = 0, heldout: str | None = None) -> Store:
    """Create a store: base identity + fingerprint, policy, and per edited layer C₀ and P.
    heldout: a text file (as --corpus) whose perplexity `eval` and the refresh gates compare
    with the base model's; without one the model samples that text itself."""
    path = Path(path)
    if path.exists():
        raise StoreExists(f"a store already exists at {path}", hint="pick another --store, or remove it yourself")
    if policy is None:
        if model not in BUILTIN_MODELS:
            raise BadInput("--policy is required for a model that is not built in",
                           hint="e.g. --policy policies/llama3-8b.yaml")
        policy = model
    pol = load_policy(find_policy(policy))
    for line in pol.unused():
        log(f"warning: policy {pol.name!r}: {line}")
    if corpus is not None:
        texts = read_corpus(corpus)  # bad corpus fails before the model loads
    if heldout is not None:
        heldout_texts = read_corpus(heldout)
        if corpus is not None and Path(heldout).resolve() == Path(corpus).resolve():
            log("warning: --heldout is the --corpus file; perplexity will be measured on text "
                "the preserved statistics were computed from")
    source = resolve_model(model)
    t0 = time.perf_counter()
    net, tok = load_model(source, log=log)
    names = [pol.module_name(l) for l in pol.layers]
    base = {l: read_matrix(get_module(net, n)) for l, n in zip(pol.layers, names)}
    d_in = base[pol.layers[0]].shape[1]
    log(f"model {source.name}: {type(net).__name__}, {net.config.num_hidden_layers} layers; "
        f"edited {names[0]} … ({base[pol.layers[0]].shape[0]}×{d_in})")
    device = next(net.parameters()).device
    precision = resolve(pol.preserved.precision, device)
    if precision != "float32":
        log(f"statistics passes in {precision} (policy precision {pol.preserved.precision})")

    if corpus is not None:
        seqs = chunk_tokens(tok, texts, pol.preserved.corpus_tokens, SEQ_LEN)
        corpus_desc = f"file {corpus}"
        log(f"second moments over {sum(len(s) for s in seqs)} tokens at {len(names)} layers")
        with matmuls(precision, net):
            moments, counted = second_moments(net, names, seqs, progress=progress and progress("stats"))
    else:
        n_seq = math.ceil((pol.preserved.sampled_tokens or pol.preserved.corpus_tokens) / SEQ_LEN)
        log(f"sampling {n_seq * SEQ_LEN} tokens of text from the model for the preserved statistics, "
            f"with their second moments at {len(names)} layers")
        acc = Moments(names)              # C₀ read off the sampling passes: no second pass over the text
        with acc.reading(net), matmuls(precision, net):
            seqs = sample_sequences(net, tok, n_seq, SEQ_LEN, seed=seed, progress=progress and progress("sample"),
                                    on_step=acc.feed)
        moments, counted = acc.means(), acc.count
        corpus_desc = "model-sampled text"
    arrays, layer_info = {}, {}
    for l, n in zip(pol.layers, names):
        proj = projector(moments[n], pol.preserved.nullspace_threshold)
        arrays[layer_key(l, "W")] = base[l].cpu().numpy()
        arrays[layer_key(l, "mom2")] = proj.mom2.cpu().numpy()
        arrays[layer_key(l, "P")] = proj.P.cpu().numpy()
        arrays[layer_key(l, "eigvals")] = proj.eigvals.cpu().numpy()
        layer_info[str(l)] = {"kept_dims": proj.kept, "of": d_in, "kept_energy": proj.kept_energy,
                              "min_eig": float(proj.eigvals[0]), "max_eig": float(proj.eigvals[-1])}
        log(f"layer {l}: null space keeps {proj.kept}/{d_in} dims ({proj.kept_energy:.2%} of the energy)")
        if proj.kept == 0:
            raise BadInput(f"layer {l}: no eigenvalue of E[kkᵀ] is below nullspace_threshold="
                           f"{pol.preserved.nullspace_threshold}; nothing could be edited",
                           hint=f"raise the threshold above {float(proj.eigvals[0]):.3g} in the policy")
    fisher_info = {}
    if pol.values.metric == "fisher":
        fisher_seqs = seqs[: math.ceil(pol.preserved.fisher_tokens / SEQ_LEN)]
        log(f"residual Fisher over {sum(len(s) for s in fisher_seqs)} tokens (value_metric fisher)")
        with matmuls(precision, net):
            per_layer, n_fisher = residual_fisher(net, [pol.layer_name(l) for l in pol.layers],
                                                  fisher_seqs, progress=progress and progress("fisher"))
        arrays[FISHER] = sum(per_layer.values()).numpy()
        fisher_info = {"fisher_tokens": n_fisher}
    log("sampling the MEMIT contexts, the evaluation prefixes and the held-out text")
    contexts = context_templates(net, tok, pol.contexts.n_prefixes, pol.contexts.prefix_tokens, seed=seed + 1)
    prefixes = eval_prefixes(net, tok, seed + 3)      # both in float32: the texts every edit and eval uses
    if heldout is not None:
        heldout_seqs = chunk_tokens(tok, heldout_texts, HELDOUT_FILE_TOKENS, SEQ_LEN)
        heldout_desc = f"file {heldout}"
    else:
        with matmuls(precision, net):                 # only measured on: sampled as the statistics' text
            heldout_seqs = sample_sequences(net, tok, HELDOUT_SEQS, HELDOUT_LEN, seed=seed + 2)
        heldout_desc = "model-sampled text"
    info = {
        "contexts": contexts,
        "eval_prefixes": prefixes,
        "corpus": corpus_desc,
        "corpus_tokens": counted,
        "stats_precision": precision,
        **fisher_info,
        "layers": layer_info,
        "heldout": heldout_seqs,
        "heldout_source": heldout_desc,
        "init_seconds": round(time.perf_counter() - t0, 2),
    }
    model_info = {"source": source.to_dict(), "architecture": type(net).__name__,
                  "num_layers": int(net.config.num_hidden_layers)}
    fps = {str(l): fingerprint(w) for l, w in base.items()}
    return Store.create(path, model=model_info, policy_json=pol.stored_json(),
                        base_fingerprint=fps, info=info, base_arrays=arrays)
