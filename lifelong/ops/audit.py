"""Read-only views of a store for `log`, `show` and `status`: no torch, fast to start."""
from __future__ import annotations

import json

from lifelong.store import history
from lifelong.errors import BadInput
from lifelong.eval.budget import edit_budget
from lifelong.policy import policy_from_json
from lifelong.store.store import Store


def log_rows(path) -> list[dict]:
    """One row per batch (history.describe)."""
    return history.describe(Store.open(path).records)


def show(path, batch_id: int) -> dict:
    """Everything recorded about one batch, plus what it superseded or was superseded by."""
    store = Store.open(path)
    rec = next((r for r in store.records if r.id == batch_id), None)
    if rec is None:
        ids = [r.id for r in store.records]
        hint = f"batch ids run from {ids[0]} to {ids[-1]}" if ids else "the store has no batches yet"
        raise BadInput(f"no batch {batch_id} in {store.path}", hint=hint)
    d = rec.to_dict()
    sup = history.superseded_by(store.records)
    d["superseded"] = [f"{history.ref_str(k)} -> {history.ref_str(v)}" for k, v in sup.items()
                       if batch_id in (k[0], v[0])]
    return d


def status(path) -> dict:
    """Where the store is, what model and policy, head, counts, size and format version, and the
    edit budget: drift measured by the last push and the edits left at the store's slope."""
    store = Store.open(path)
    recs = store.records
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.status] = counts.get(r.status, 0) + 1
    policy = json.loads(store.policy_json)
    return {
        "store": str(store.path), "format_version": store.format_version, "size_bytes": store.size_bytes(),
        "model": store.model["source"]["name"], "architecture": store.model.get("architecture"),
        "policy": policy.get("name"), "layers": policy.get("layers"), "head": history.head(recs),
        "batches": len(recs), "by_status": counts, "live_facts": len(history.live_facts(recs)),
        "null_space": store.info.get("layers"), "created": store.created,
        "budget": edit_budget(recs, policy_from_json(store.policy_json).gates.max_perplexity_drift),
    }


def migrate(path) -> dict:
    """Rewrite an older store at the current format version (numbered migrations, recorded)."""
    from pathlib import Path

    from lifelong.store.layout import FORMAT_VERSION
    from lifelong.store.store import _read_manifest

    p = Path(path)
    store = Store(p, _read_manifest(p, as_stored=True))  # a missing or foreign store fails here, unlocked
    steps = store.migrate()                               # migrates once, under the lock
    return {"store": str(p), "migrated_from": steps, "format_version": FORMAT_VERSION}
