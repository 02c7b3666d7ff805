"""Which layers' MLP keys set edited subjects apart from ordinary text (to choose a policy's layers).

Per decoder layer of SmolLM2-135M, at the input of mlp.down_proj: C₀ = E[kkᵀ] over 20k tokens
of WikiText-2 valid (what `init` computes), and the keys of the first 200 CounterFact dev
subjects at their last token (bare prompt). Reports
  - maha/d: median kᵀC₀⁻¹k / d over the subjects. A key drawn from the preserved text scores
    1; the higher, the less an update that reaches k must move ordinary tokens (MEMIT's
    least-squares damage is ‖r‖² / kᵀC₀⁻¹k);
  - the null space the policy threshold keeps (dimensions, share of C₀'s energy) and the
    median share of a subject key's energy inside it;
  - spill: what AlphaEdit's one-key update Δ = r(Pk)ᵀ/(kᵀPk + α) for subject i moves at
    subject j's key, |kᵢᵀPkⱼ| / (kᵢᵀPkᵢ + α), per unit of r: the median and the 95th
    percentile over pairs of different subjects (the neighbors metric's failure mode), and
    to ordinary text, √(kᵢᵀPC₀Pkᵢ) / (kᵢᵀPkᵢ + α) (the drift's), median over subjects.

    python experiments/layer_scan.py [--layers 0-12] [--threshold 1e-2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # ../bench: benchdata.py, quality.py
from benchdata import SHARED, WIKI, plain_wikitext  # noqa: E402


def main(argv=None) -> None:
    from lifelong.model.corpus import chunk_tokens, read_corpus
    from lifelong.facts import Fact
    from lifelong.model.loading import load_model, resolve_model
    from lifelong.model.prompts import make_row, pad_rows
    from lifelong.edit.stats import projector, second_moments
    from lifelong.model.hooks import module_inputs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0-12")
    ap.add_argument("--threshold", type=float, default=1e-2)
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=1.0)
    args = ap.parse_args(argv)
    lo, hi = (int(x) for x in args.layers.split("-"))
    net, tok = load_model(resolve_model("smollm2-135m"), device="cpu", log=lambda *a: None)
    names = [f"model.layers.{l}.mlp.down_proj" for l in range(lo, hi + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        texts = read_corpus(plain_wikitext(Path(tmp) / "c.txt", lines=20_000, src=WIKI))
    moments, _ = second_moments(net, names, chunk_tokens(tok, texts, 20_000, 128))
    rows = [json.loads(line) for line in open(SHARED / "counterfact" / "counterfact_dev_3000.jsonl")]
    facts = [Fact(r["subject"], r["prompt"], r["target"], r.get("relation", "")) for r in rows[:args.subjects]]
    made = [make_row(tok, "{}", f.prompt, f.subject, None) for f in facts]
    made = [r for r in made if r.subject_pos > 0]          # position 0 is the attention sink
    ids, mask = pad_rows(made, tok.pad_token_id, "cpu")
    with torch.no_grad():
        keys = module_inputs(net, names, ids, mask, torch.tensor([r.subject_pos for r in made]))
    print(f"{len(made)} subjects; threshold {args.threshold:g}")
    print(f"layer | maha/d | null dims | C₀ energy in null | subject-key energy in null | "
          f"spill to subjects med / p95 | spill to text (α {args.alpha:g})")
    for name in names:
        C, K = moments[name].double(), keys[name].double()
        vals, vecs = torch.linalg.eigh(C)
        inv = vecs @ torch.diag(1 / vals.clamp(min=1e-8)) @ vecs.T
        maha = ((K @ inv) * K).sum(1) / K.shape[1]
        proj = projector(moments[name], args.threshold)
        inside = ((K @ proj.P.double()) * K).sum(1) / (K * K).sum(1)
        PK = K @ proj.P.double()                                   # (n, d) rows Pkᵢ
        own = (PK * K).sum(1) + args.alpha                         # kᵢᵀPkᵢ + α
        cross = (PK @ K.T).abs() / own[:, None]                    # (i, j): spill of i's update at kⱼ
        off = cross[~torch.eye(len(K), dtype=torch.bool)]
        text = ((PK @ C) * PK).sum(1).sqrt() / own
        print(f"{name.split('.')[2]:>5} | {float(maha.median()):6.2f} | {proj.kept:4d}/{K.shape[1]} | "
              f"{proj.kept_energy:6.1%} | {float(inside.median()):6.1%} | "
              f"{float(off.median()):.3f} / {float(off.quantile(0.95)):.3f} | {float(text.median()):.4f}", flush=True)


if __name__ == "__main__":
    main()
