"""Whether init's C₀ tells the truth about what edits cost text it never saw.

The update is solved to change preserved outputs least by the yardstick C₀ = E[kkᵀ] that
`init` estimated from corpus_tokens tokens; what the model loses is measured on other text.
For each active batch of STORE and the stored Δ = A·B, summed over edited layers:
  leak under C    tr(Δ C Δᵀ) for C = the store's own C₀ (what the solve saw), held-out text
                  (the first 400 lines of WikiText-2 test, 64 × 128 tokens: what quality_quick
                  measures drift on) and the live facts' neighbor prompts (every token)
  re-solved       the least-leak Δ* that writes what Δ wrote on K and holds the earlier
                  batches' keys K_p (as experiments/leak_bound.py), solved with C₀ from N tokens of
                  the corpus for each --tokens N, and its leak on held-out text and neighbors
A C₀ from too few tokens underestimates its small eigenvalues, so the solve leans on
directions that real text does use.

    python experiments/leak_truth.py bench/work/quality_quick/memit20-hold.h5 --tokens 20000,200000
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # ../bench: benchdata.py, quality.py

from benchdata import WIKI, plain_wikitext, wikitext_test_chunks  # noqa: E402
from leak_bound import active_batches, delta, leak, least_leak_update, report  # noqa: E402

from lifelong.api import live_facts  # noqa: E402
from lifelong.model.corpus import chunk_tokens, read_corpus  # noqa: E402
from lifelong.model.loading import ModelSource, load_model  # noqa: E402
from lifelong.edit.stats import second_moments  # noqa: E402
from lifelong.store.store import Store  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--tokens", default="20000,200000", help="corpus sizes to re-solve with (comma list)")
    ap.add_argument("--corpus", default="bench/work/quality_quick/corpus.txt",
                    help="made from WikiText-2 valid (as quality_quick's init corpus) if missing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    store = Store.open(args.store)
    pol = json.loads(store.policy_json)                     # any store, whatever its policy's other fields
    layers = pol["layers"]
    names = [pol["module_template"].format(l) for l in layers]
    model, tok = load_model(ModelSource(**store.model["source"]), device="cpu", log=lambda *a: None)
    corpus = Path(args.corpus)
    if not corpus.is_file():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        plain_wikitext(corpus, lines=20_000, src=WIKI)
    texts = read_corpus(corpus)
    sizes = [int(n) for n in args.tokens.split(",")]

    def by_layer(moments: dict) -> dict[int, torch.Tensor]:
        return {l: moments[n].double() for l, n in zip(layers, names)}

    base = store.base_arrays([f"layer{l}/mom2" for l in layers])
    stored = {l: torch.from_numpy(base[f"layer{l}/mom2"]).double() for l in layers}
    heldout = by_layer(second_moments(model, names, wikitext_test_chunks(tok, 64))[0])
    facts, _ = live_facts(store)
    nbr = by_layer(second_moments(model, names, [tok(n.prompt)["input_ids"] for f in facts for n in f.neighbors])[0])
    solve_with = {n: by_layer(second_moments(model, names, chunk_tokens(tok, texts, n))[0]) for n in sizes}
    inv = {n: {l: torch.linalg.inv(C[l]) for l in layers} for n, C in solve_with.items()}

    head = ["batch", "stored C₀", "held-out", "neighbors"] + [f"re-solved, C₀ {n // 1000}k: held-out / neighbors" for n in sizes]
    table = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    total = [0.0] * (3 + 2 * len(sizes))
    for rec, arr, Kp in active_batches(store, layers):
        row = [0.0] * len(total)
        for l in layers:
            D = delta(arr, l)
            K = torch.from_numpy(arr[f"layer{l}/K"]).double().t()
            row[0] += leak(D, stored[l])
            row[1] += leak(D, heldout[l])
            row[2] += leak(D, nbr[l])
            Rt = torch.cat([D @ K, torch.zeros(D.shape[0], Kp[l].shape[1], dtype=torch.float64)], 1)
            for j, n in enumerate(sizes):
                Ds = least_leak_update(Rt, torch.cat([K, Kp[l]], 1), inv[n][l])
                row[3 + 2 * j] += leak(Ds, heldout[l])
                row[4 + 2 * j] += leak(Ds, nbr[l])
        total = [a + b for a, b in zip(total, row)]
        pairs = [f"{row[3 + 2 * j]:.1f} / {row[4 + 2 * j]:.1f}" for j in range(len(sizes))]
        table.append(f"| {rec.id} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | " + " | ".join(pairs) + " |")
        print(table[-1], flush=True)
    pairs = [f"{total[3 + 2 * j]:.1f} / {total[4 + 2 * j]:.1f}" for j in range(len(sizes))]
    table.append(f"| sum | {total[0]:.1f} | {total[1]:.1f} | {total[2]:.1f} | " + " | ".join(pairs) + " |")
    text = (f"`python experiments/leak_truth.py {args.store} --tokens {args.tokens}` (the store's C₀: "
            f"{store.info.get('corpus_tokens')} tokens)\n\n" + "\n".join(table) + "\n")
    report(text, args.out)


if __name__ == "__main__":
    main()
