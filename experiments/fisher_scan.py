"""Where ordinary text is sensitive in the residual stream, and where stored values lie in it.

For each edited layer of STORE's policy, the residual Fisher F_l (lifelong/sensitivity.py) from
the first N tokens of the corpus `init` reads (WikiText-2 valid, as quality_quick's):
  mean eig      tr(F_l)/d: what a unit residual at that layer's output costs on average
  max, min      the largest and smallest eigenvalue over that mean
  alike         tr(F̃_a⁻¹F̃_b)/d against every other edited layer (1: the same metric up to scale)
and for the values of STORE's first batch (bank/deltas), how sensitive their directions are
under the metric the policy steps in, F = Σ_l F_l: δᵀFδ / (‖δ‖²·tr(F)/d), 1 for a random
direction. Values stepped in ‖δ‖ sit above 1; steps measured in F move them below.

    python experiments/fisher_scan.py bench/work/quality_quick/c200k.h5 --tokens 32768
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # ../bench: benchdata.py, quality.py

from benchdata import WIKI, plain_wikitext  # noqa: E402
from leak_bound import report  # noqa: E402

from lifelong.model.corpus import chunk_tokens, read_corpus  # noqa: E402
from lifelong.model.loading import ModelSource, load_model  # noqa: E402
from lifelong.edit.fisher import RIDGE, residual_fisher  # noqa: E402
from lifelong.store.store import Store  # noqa: E402
from lifelong.policy import layer_name  # noqa: E402


def sensitivity(deltas: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """δᵀFδ / (‖δ‖²·tr(F)/d) per row of deltas (n, d)."""
    mean = F.diagonal().mean()
    return ((deltas @ F) * deltas).sum(1) / (deltas.pow(2).sum(1) * mean)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--corpus", default="bench/work/quality_quick/corpus.txt",
                    help="made from WikiText-2 valid (as quality_quick's init corpus) if missing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="append the tables to this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    store = Store.open(args.store)
    pol = json.loads(store.policy_json)
    layers = pol["layers"]
    names = [layer_name(pol["module_template"], l) for l in layers]
    model, tok = load_model(ModelSource(**store.model["source"]), device="cpu", log=lambda *a: None)
    corpus = Path(args.corpus)
    if not corpus.is_file():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        plain_wikitext(corpus, lines=20_000, src=WIKI)
    per_layer, n = residual_fisher(model, names, chunk_tokens(tok, read_corpus(corpus), args.tokens))
    F = {l: per_layer[nm] for l, nm in zip(layers, names)}
    d = F[layers[0]].shape[0]

    def scaled(M):
        return M / M.diagonal().mean()

    head = ["layer", "mean eig", "max / mean", "min / mean"] + [f"alike {l}" for l in layers]
    table = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for a in layers:
        ev = torch.linalg.eigvalsh(F[a])
        inv = torch.linalg.inv(scaled(F[a]) + RIDGE * torch.eye(d, dtype=F[a].dtype))
        alike = [float(torch.trace(inv @ scaled(F[b]))) / d for b in layers]
        table.append(f"| {a} | {float(ev.mean()):.3g} | {float(ev[-1] / ev.mean()):.1f} | "
                     f"{float(ev[0] / ev.mean()):.3f} | " + " | ".join(f"{x:.2f}" for x in alike) + " |")
    total = sum(F.values())
    deltas = torch.from_numpy(store.batch_arrays(1, ["bank/deltas"])["bank/deltas"]).double()   # (n, d)
    s = sensitivity(deltas, total)
    lines = [f"`python experiments/fisher_scan.py {args.store} --tokens {args.tokens}` "
             f"({pol.get('value_metric', 'euclidean')} steps; F from {n} tokens of {corpus.name})", "",
             *table, "",
             f"Batch 1's {len(s)} values, δᵀFδ / (‖δ‖²·mean eig), F = Σ_l F_l: median {float(s.median()):.2f}, "
             f"range {float(s.min()):.2f}–{float(s.max()):.2f}.", ""]
    report("\n".join(lines), args.out)

if __name__ == "__main__":
    main()
