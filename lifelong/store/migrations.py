"""Store format migrations: the registry, and the body of each step.

A migration ``from_version -> from_version + 1`` is a function of the manifest dict
(the keys of `store._Snapshot`, "records" a list of plain dicts). One marked
read_compatible is applied in memory by `Store.open`; the others need `lifelong
migrate`, which rewrites the store at `layout.FORMAT_VERSION`.

Format 1 -> 2: the recorded fingerprints, recomputed for weights rounded once.

Format 1 computed the weights at a head as fp32 base + A₁B₁ + A₂B₂ + …, rounded after
every term; format 2 (`deltas.materialize`) sums in float64 and rounds once, so the
`fingerprint_after` of every batch changes. That fingerprint hashes the weights right
after the batch's push, i.e. of the batches active then, which the statuses alone do not
always tell (a reverted batch may have been pushed before or after its neighbours were
rolled back). But between two pushes only rollbacks happen, and a rollback keeps a prefix
of the active ids, so the set after push N is a prefix of the set after push N−1, plus N:
the prefix whose format-1 weights hash to what was recorded for N. So every recorded
fingerprint is checked before it is replaced, and a store that disagrees with itself is
refused, never rewritten.

The new fingerprints are `deltas.materialize`'s: its float64 sum, extended push by push
(recomputed from the base only after a rollback), rounded once. Cost: about two products
A·B per batch and layer for a history without rollbacks.
"""
from __future__ import annotations

import json
from typing import Callable

import numpy as np

from lifelong.errors import StoreError
from lifelong.store.history import ACTIVE
from lifelong.store.layout import layer_key as key
from lifelong.store import layout, objects

# read(batch_id, names) -> arrays of that batch's object file (batch 0: the base arrays)
Reader = Callable[[int, list[str]], dict[str, np.ndarray]]


def summed_v1(base, factors):
    """Format 1's weights: fp32 base + A₁B₁ + …, rounded after each term (to check format-1 records).
    base: (d_out, d_in) tensor; factors: [(A (d_out, r), B (r, d_in))] tensors."""
    import torch

    w = base.to(torch.float32).clone()  # (d_out, d_in)
    for a, b in factors:  # a: (d_out, r), b: (r, d_in)
        w = w + (a.to(torch.float32) @ b.to(torch.float32))
    return w


def refingerprint(records: list[dict], layers: list[int], read: Reader, where: str) -> list[dict]:
    """The records (plain dicts) with each `fingerprint_after` checked against format 1 and
    recomputed with `materialize`. StoreError naming the first batch that does not check.
    torch is imported here: only `lifelong migrate` of a format-1 store pays for it."""
    import torch

    from lifelong.deltas import fingerprint, float64_sum

    arr0 = read(0, [key(l, "W") for l in layers])
    base = {l: torch.from_numpy(arr0[key(l, "W")]) for l in layers}
    factors: dict[int, dict] = {}

    def delta(bid: int, l: int):
        if bid not in factors:
            arr = read(bid, [key(m, n) for m in layers for n in ("A", "B")])
            factors[bid] = {m: (torch.from_numpy(arr[key(m, "A")]), torch.from_numpy(arr[key(m, "B")]))
                            for m in layers}
        return factors[bid][l]

    def hashes(weights: dict) -> dict[str, str]:
        return {str(l): fingerprint(w) for l, w in weights.items()}

    active_now = {r["id"] for r in records if r["status"] == ACTIVE}
    prev: list[int] = []                      # the batches active right after the previous push
    prev_v1 = dict(base)                      # their format-1 weights
    prev_64 = dict(base)                      # their format-2 float64 sum
    out = []
    for rec in sorted(records, key=lambda r: r["id"]):
        n = rec["id"]
        keep = max((i + 1 for i, k in enumerate(prev) if k in active_now), default=0)  # never rolled back
        found = None
        for cut in range(len(prev), keep - 1, -1):   # the longest prefix first: no rollback in between
            ids = prev[:cut] + [n]
            extend = cut == len(prev)                # then N's Δ is added to the sums kept
            todo = [n] if extend else ids
            w1 = {l: summed_v1((prev_v1 if extend else base)[l], [delta(k, l) for k in todo]) for l in layers}
            if hashes(w1) == rec["fingerprint_after"]:
                w64 = {l: float64_sum((prev_64 if extend else base)[l], [delta(k, l) for k in todo])
                       for l in layers}
                found = ids, w1, w64
                break
        if found is None:
            raise StoreError(f"{where}: batch {n}'s recorded fingerprints match no set of batches that "
                             f"could have been active after its push; the store disagrees with itself",
                             hint="nothing was changed; restore the store from a backup, or keep it with "
                                  "the lifelong version that wrote it")
        prev, prev_v1, prev_64 = found
        out.append(dict(rec, fingerprint_after=hashes({l: w.to(torch.float32) for l, w in prev_64.items()})))
    return out


# from_version -> function(manifest dict at from_version) -> manifest dict at from_version + 1.
# The manifest dict has the keys of `_Snapshot` below, with "records" a list of plain dicts.
# A migration marked read_compatible is applied in memory by Store.open; the others
# require `lifelong migrate`, which rewrites the store at FORMAT_VERSION.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def migration(from_version: int, *, read_compatible: bool) -> Callable:
    """Register a format migration ``from_version -> from_version + 1``::

        @migration(1, read_compatible=True)
        def _add_notes(m): ...; return m
    """
    def register(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        if from_version in MIGRATIONS:
            raise ValueError(f"a migration from format version {from_version} is already registered")
        fn.read_compatible = read_compatible  # type: ignore[attr-defined]
        MIGRATIONS[from_version] = fn
        return fn
    return register


@migration(1, read_compatible=False)
def _weights_rounded_once(m: dict) -> dict:
    """Format 2 sums base + ΣAB in float64 and rounds once: every batch's recorded
    fingerprint_after is checked against format 1's summation and recomputed."""
    path = m["path"]

    def read(batch_id: int, names: list[str]) -> dict[str, np.ndarray]:
        file = layout.objects_dir(path) / layout.BASE_FILE if batch_id == 0 else layout.batch_file(path, batch_id)
        return objects.read_arrays(file, names, f"store {path}, migration to format 2")

    m["records"] = refingerprint(m["records"], json.loads(m["policy_json"])["layers"], read, str(path))
    return m


@migration(2, read_compatible=True)
def _keys_per_fact(m: dict) -> dict:
    """Format 3 batches may store a key row per fact of a merged group, with `units/group`
    naming each row's group; a batch without that array has one row per group, so format 2
    stores read as they are. The bump keeps older lifelong from misreading newer batches."""
    return m
