"""Where an edited store's perplexity drift comes from, token by token.

Per next-token prediction of the first 400 lines of WikiText-2 test (32 × 128 tokens), the
NLL of the store's head minus the base model's: how much of the total increase the worst
1 %, 5 % and 20 % of tokens carry, and the worst ones with their context. Concentrated
damage after names (rather than spread thinly over all text) says the edits leak through
what the edited subjects share with other names, which the preserved statistics of plain
text barely see.

    python experiments/token_damage.py bench/work/quality_cpu10/counterfact-shipped.h5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # ../bench: benchdata.py, quality.py
from benchdata import wikitext_test_chunks  # noqa: E402


@torch.no_grad()
def token_nll(model, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch):
        logits = model(input_ids=x[i:i + batch], use_cache=False).logits[:, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[i:i + batch, 1:], reduction="none"))
    return torch.cat(out)


def main(argv=None) -> None:
    from lifelong.store import history
    from lifelong.model.session import Session
    from lifelong.store.store import Store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--show", type=int, default=12)
    args = ap.parse_args(argv)
    st = Store.open(args.store)
    s = Session.open(st, log=lambda *a, **k: None)
    x = torch.tensor(wikitext_test_chunks(s.tok, 32))
    with s.weights(s.base()):
        base = token_nll(s.model, x)
    diff = (token_nll(s.model, x) - base).flatten()
    total = float(diff.sum())
    ranked, order = torch.sort(diff, descending=True)
    print(f"{args.store} at batch {history.head(st.records)}: mean NLL {float(base.mean()):.3f} -> "
          f"{float(base.mean()) + total / diff.numel():.3f} over {diff.numel()} predictions; "
          f"{float((diff > 0).float().mean()):.0%} of them got worse")
    for q in (0.01, 0.05, 0.2):
        k = max(1, int(q * diff.numel()))
        print(f"  the worst {q:.0%} carry {float(ranked[:k].sum()) / total:.0%} of the increase")
    width = x.shape[1] - 1
    for j in order[:args.show].tolist():
        r, c = divmod(j, width)
        before = s.tok.decode(x[r, max(0, c - 7):c + 1])
        print(f"  {float(diff[j]):+6.2f}  …{before!r} → {s.tok.decode(x[r, c + 1:c + 2])!r}")


if __name__ == "__main__":
    main()
