"""`lifelong rollback`: make an earlier batch the head, verified bit for bit.

The weights at the new head are recomputed from the store alone (base + the Δ of the
batches still active) and checked against the fingerprints recorded when that head was
pushed, inside the writer transaction; a mismatch is an error and nothing is committed.
The refresh job rejects a batch through the same step.
"""
from __future__ import annotations

from lifelong.model.session import expected_fingerprints, head_weights, verify
from lifelong.policy import policy_from_json
from lifelong.store import history
from lifelong.store.store import Store, Transaction


def rollback(path, to: int, wait: bool = True) -> dict:
    """Make batch `to` the head (0 = base); verified against the recorded fingerprints."""
    store = Store.open(path)
    with store.writer(wait=wait) as tx:
        before = history.head(tx.records)
        new = history.rolled_back(tx.records, to)
        reverted = [r.id for r, o in zip(new, tx.records) if r.status != o.status]
        commit_verified(store, tx, new, f"rollback to {to}")
    return {"head_before": before, "head": to, "reverted": reverted}


def commit_verified(store: Store, tx: Transaction, new: list[history.BatchRecord], what: str) -> None:
    """Set the transaction's records to `new` once the weights at their head hash to what the
    store recorded for it (FingerprintMismatch naming `what` otherwise)."""
    policy = policy_from_json(store.policy_json)
    verify(head_weights(store, new, policy), expected_fingerprints(store, new), what)
    tx.set_records(new)
