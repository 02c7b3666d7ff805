"""`lifelong export`: the model at head as a transformers checkpoint, or the edit as a PEFT adapter.

The folder appears whole or not at all (`store.atomic.staged_dir`), and the weights
written are verified against the store's recorded fingerprints first.
"""
from __future__ import annotations

import json
from pathlib import Path

from lifelong import __version__
from lifelong.errors import BadInput
from lifelong.model.session import Session, expected_fingerprints, verify
from lifelong.ops import quiet
from lifelong.store import history
from lifelong.store.atomic import staged_dir
from lifelong.store.store import Store


def records_at(store: Store, at: int | None) -> list[history.BatchRecord]:
    """The store's records, or (at = N) the records as a rollback to N would leave them (a copy)."""
    if at is None:
        return store.records
    return history.rolled_back(store.records, at)


def export(path, out, at: int | None = None, log=quiet, format: str = "merged") -> dict:
    """Write the model at head (or after batch `at`) as a plain transformers checkpoint
    (format "merged"), or the cumulative edit as a PEFT LoRA adapter (format "peft")."""
    if format == "peft":
        from lifelong.ops.peft_export import export_peft

        return export_peft(path, out, at=at, log=log)
    if format != "merged":
        raise BadInput(f"unknown export format {format!r}", hint="use 'merged' or 'peft'")
    store = Store.open(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not empty", hint="export into a new directory")
    records = records_at(store, at)
    session = Session.open(store, log=log, records=records)
    verify(session.current(), expected_fingerprints(store, records), "export")
    with staged_dir(out) as tmp:
        session.model.save_pretrained(tmp)
        session.tok.save_pretrained(tmp)
        meta = {"lifelong_version": __version__, "store": str(store.path), "head": history.head(records),
                "fingerprints": expected_fingerprints(store, records)}
        (tmp / "lifelong_export.json").write_text(json.dumps(meta, indent=2))
    return {"out": str(out), **meta}
