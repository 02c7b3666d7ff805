"""How a store's residual bank is shaped: what EAMET alignment changes, and what it costs.

For the live groups of each STORE (bank/keys and bank/deltas of every batch they sit in):
  key cos       mean pairwise cosine of the groups' keys (the structure alignment copies)
  δ cos         mean pairwise cosine of their residuals (δ)
  corr          Pearson correlation of the two over all pairs: how far the residuals follow
                the keys' structure (EAMET's aim)
  ‖δ‖           median residual length
  δᵀF̃δ          median cost of a residual in the store's residual Fisher, scaled to mean
                eigenvalue 1 (stores with value_metric fisher only): what it asks of text
Compare two stores built from the same facts with alignment off and on.

    python experiments/bank_geometry.py bench/work/quality_cpu10/counterfact-shipped.h5 \
        bench/work/quality_cpu10/counterfact-full.h5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leak_bound import report  # noqa: E402

from lifelong.ops.inputs import EditInputs  # noqa: E402
from lifelong.policy import policy_from_json  # noqa: E402
from lifelong.store.history import live_groups  # noqa: E402
from lifelong.store.store import Store  # noqa: E402


def live_bank(store: Store) -> tuple[np.ndarray, np.ndarray]:
    """Keys and residuals of the store's live groups, in batch order."""
    inputs = EditInputs.read(store, store.records, policy_from_json(store.policy_json), live_groups(store.records))
    return tuple(np.concatenate(x).astype(np.float64) for x in (inputs.bank_keys, inputs.bank_deltas))


def geometry(keys: np.ndarray, deltas: np.ndarray, fisher: np.ndarray | None) -> dict:
    """The table's columns for one bank (see the module docstring)."""
    norms = np.linalg.norm(deltas, axis=1)
    ku, du = keys / np.linalg.norm(keys, axis=1, keepdims=True), deltas / norms[:, None]
    pairs = np.triu_indices(len(keys), 1)
    kc, dc = (ku @ ku.T)[pairs], (du @ du.T)[pairs]
    out = {"groups": len(keys), "key_cos": kc.mean(), "delta_cos": dc.mean(),
           "corr": np.corrcoef(kc, dc)[0, 1], "norm": np.median(norms)}
    if fisher is not None:
        f = fisher / (np.trace(fisher) / len(fisher))
        out["f_cost"] = np.median(np.einsum("nd,de,ne->n", deltas, f, deltas))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    table = ["| store | live groups | key cos | δ cos | corr(key cos, δ cos) | median ‖δ‖ | median δᵀF̃δ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for path in args.stores:
        store = Store.open(path)
        fisher = store.base_arrays([], optional=("residual_fisher",)).get("residual_fisher")
        g = geometry(*live_bank(store), None if fisher is None else fisher.astype(np.float64))
        cost = f"{g['f_cost']:.0f}" if "f_cost" in g else "–"
        table.append(f"| `{path}` | {g['groups']} | {g['key_cos']:.3f} | {g['delta_cos']:.3f} | "
                     f"{g['corr']:.3f} | {g['norm']:.1f} | {cost} |")
    report("\n".join(table), args.out)


if __name__ == "__main__":
    main()
