"""How much of an edit's damage to preserved knowledge the update rule could have avoided.

For each active batch of a store and each edited layer, from the stored factors Δ = A·B,
keys K and the base statistics C₀ = E[k₀k₀ᵀ]:
  leak      tr(Δ C₀ Δᵀ): the mean squared change of the layer's output on preserved keys
  least     the least leak of any Δ' that writes what Δ wrote on K (Δ'K = ΔK) and leaves
            every earlier batch's keys K_p where they were (Δ'K_p = 0):
            tr(R̃ (K̃ᵀC₀⁻¹K̃)⁻¹ R̃ᵀ) with K̃ = [K, K_p], R̃ = [ΔK, 0] (a 1e-6 ridge on the Gram)
  moved     ‖Δ K_p‖²: how far this batch moved the outputs of earlier batches' keys
Summed over layers. K_p is the keys of every earlier active batch's groups, less those a
merged group of a later batch replaced.

    python experiments/leak_bound.py bench/work/quality_quick/ngd08-r30x2.h5 [--out FILE.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lifelong.store.layout import UNITS, key_rows  # noqa: E402
from lifelong.store.store import Store  # noqa: E402


def leak(D: torch.Tensor, C: torch.Tensor) -> float:
    """tr(Δ C Δᵀ): the mean squared change of Δ's outputs on keys whose second moment is C."""
    return float(torch.trace(D @ C @ D.t()))


def _gram(K: torch.Tensor, C_inv: torch.Tensor) -> torch.Tensor:
    """KᵀC₀⁻¹K with a 1e-6 ridge (relative to its mean diagonal)."""
    G = K.t() @ C_inv @ K
    return G + 1e-6 * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)


def least_leak(R: torch.Tensor, K: torch.Tensor, C_inv: torch.Tensor) -> float:
    """min tr(Δ C₀ Δᵀ) subject to Δ K = R, for K (d_in, n) and R (d_out, n)."""
    return float(torch.trace(R @ torch.linalg.solve(_gram(K, C_inv), R.t())))


def least_leak_update(R: torch.Tensor, K: torch.Tensor, C_inv: torch.Tensor) -> torch.Tensor:
    """The Δ that reaches least_leak: R (KᵀC₀⁻¹K)⁻¹ KᵀC₀⁻¹."""
    return R @ torch.linalg.solve(_gram(K, C_inv), K.t() @ C_inv)


def active_batches(store: Store, layers: list[int]):
    """Each active batch's arrays (A, B, K per layer) with K_p: per layer, the keys (d_in, k) of
    every earlier active group it holds (those a merged group of this batch replaces left out)."""
    held: dict[tuple[int, int], dict[int, torch.Tensor]] = {}     # (batch, group) -> layer -> keys (d_in, k)
    for rec in store.records:
        if rec.status != "active":
            continue
        arr = store.batch_arrays(rec.id, [f"layer{l}/{x}" for l in layers for x in "ABK"], optional=(UNITS,))
        for g in rec.groups:
            for ref in g.replaces:
                held.pop(tuple(ref), None)
        d_in = arr[f"layer{layers[0]}/K"].shape[1]
        Kp = {l: torch.cat([torch.zeros(d_in, 0, dtype=torch.float64)] + [h[l] for h in held.values()], 1)
              for l in layers}
        yield rec, arr, Kp
        for gi in range(len(rec.groups)):
            held[(rec.id, gi)] = {l: torch.from_numpy(arr[f"layer{l}/K"][key_rows(arr, [gi])]).double().t()
                                  for l in layers}


def delta(arr: dict, layer: int) -> torch.Tensor:
    """A batch's stored Δ = A·B at one layer, float64."""
    return torch.from_numpy(arr[f"layer{layer}/A"]).double() @ torch.from_numpy(arr[f"layer{layer}/B"]).double()


def rows(store: Store) -> list[tuple[int, float, float, float]]:
    layers = json.loads(store.policy_json)["layers"]        # any store, whatever its policy's other fields
    base = store.base_arrays([f"layer{l}/mom2" for l in layers])
    C = {l: torch.from_numpy(base[f"layer{l}/mom2"]).double() for l in layers}
    C_inv = {l: torch.linalg.inv(C[l]) for l in layers}
    out = []
    for rec, arr, Kp_all in active_batches(store, layers):
        total = least = moved = 0.0
        for l in layers:
            D = delta(arr, l)
            K = torch.from_numpy(arr[f"layer{l}/K"]).double().t()
            Kp = Kp_all[l]
            total += leak(D, C[l])
            Rt = torch.cat([D @ K, torch.zeros(D.shape[0], Kp.shape[1], dtype=torch.float64)], 1)
            least += least_leak(Rt, torch.cat([K, Kp], 1), C_inv[l])
            moved += float((D @ Kp).pow(2).sum())
        out.append((rec.id, total, least, moved))
    return out


def report(text: str, out: str | None) -> None:
    """Print a table, and append it to the markdown file `out` when given."""
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    table = ["| batch | leak tr(ΔC₀Δᵀ) | least possible | ratio | earlier keys moved ‖ΔK_p‖² |",
             "|---:|---:|---:|---:|---:|"]
    for b, cost, least, moved in rows(Store.open(args.store)):
        table.append(f"| {b} | {cost:.1f} | {least:.1f} | {cost / least:.2f} | {moved:.1f} |")
    text = f"`python experiments/leak_bound.py {args.store}`\n\n" + "\n".join(table) + "\n"
    report(text, args.out)


if __name__ == "__main__":
    main()
