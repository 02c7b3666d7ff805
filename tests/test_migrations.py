"""Store format 1 -> 2 (`lifelong migrate`): fingerprints of weights rounded once.

A format-1 store is built here with small random factors and a history with rollbacks and
a rejection, its fingerprints computed as format 1 did (fp32, rounded after each batch).
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from lifelong import api
from lifelong.store import history
from lifelong.store.history import BatchRecord, GroupRecord
from lifelong.policy import find_policy, load_policy
from lifelong.store.migrations import summed_v1
from lifelong.store.layout import FORMAT_VERSION
from lifelong.store.store import Store
from lifelong.deltas import fingerprint, materialize
from helpers import cli, sha

LAYERS, D_OUT, D_IN = [0, 1], 6, 8
# (op, arg): push a batch / roll back to a head / push a batch that a gate rejects
HISTORY = [("push", 1), ("push", 2), ("push", 3), ("rollback", 1), ("push", 4), ("rollback", 1),
           ("push", 5), ("reject", 6), ("push", 7)]


def _format1_store(path) -> tuple[Store, dict[int, list[int]]]:
    """A format-1 store run through HISTORY, and per batch the ids active right after its push."""
    g = torch.Generator().manual_seed(0)
    base = {l: torch.randn(D_OUT, D_IN, generator=g) for l in LAYERS}
    policy = load_policy(find_policy("smollm2-135m")).model_copy(update={"layers": LAYERS})
    st = Store.create(path, model={"source": {"name": "synthetic"}}, policy_json=policy.model_dump_json(),
                      base_fingerprint={str(l): fingerprint(w) for l, w in base.items()}, info={},
                      base_arrays={f"layer{l}/W": w.numpy() for l, w in base.items()})
    factors, sets, act = {}, {}, []
    for op, arg in HISTORY:
        if op == "rollback":
            with st.writer() as tx:
                tx.set_records(history.rolled_back(tx.records, arg))
            act = [k for k in act if k <= arg]
            continue
        factors[arg] = {l: (1e-3 * torch.randn(D_OUT, 2, generator=g), torch.randn(2, D_IN, generator=g))
                        for l in LAYERS}
        act = act + [arg]
        sets[arg] = act
        after = {str(l): fingerprint(summed_v1(base[l], [factors[k][l] for k in act])) for l in LAYERS}
        rec = BatchRecord(id=arg, created=history.utc_now(), source=f"b{arg}.jsonl", sha256="0" * 64,
                          status="active", facts=[{"subject": f"s{arg}", "prompt": "{} is", "target": "x"}],
                          groups=[GroupRecord(f"s{arg}", [(arg, 0)])], fingerprint_after=after)
        arrays = {f"layer{l}/{n}": t.numpy() for l, (a, b) in factors[arg].items() for n, t in (("A", a), ("B", b))}
        with st.writer() as tx:
            tx.add_batch(rec, arrays)
        if op == "reject":
            with st.writer() as tx:
                tx.set_records(history.rolled_back(tx.records, act[-2], status=history.REJECTED))
            act = act[:-1]
    with h5py.File(st.path, "r+") as f:
        f.attrs["format_version"] = 1
    st.factors, st.base = factors, base
    return st, sets


def test_migrate_checks_and_recomputes_every_fingerprint(tmp_path):
    assert FORMAT_VERSION == 3
    st, sets = _format1_store(tmp_path / "s.h5")
    old = {r.id: r.fingerprint_after for r in st.records}
    for args in (["log"], ["rollback", "--to", "1"]):     # never misread: refused until migrated
        res = cli(*args, "--store", st.path, code=1)
        assert "lifelong migrate" in res.stderr
    res = cli("migrate", "--store", st.path)
    assert "migrated from format [1, 2] to 3" in res.stdout

    new = Store.open(st.path)
    assert new.format_version == 3 and new.info["migrations"][0]["from"] == 1
    assert [r.status for r in new.records] == ["active", "reverted", "reverted", "reverted", "active",
                                               "rejected", "active"]
    for r in new.records:   # reverted 3 was pushed over 1, 2; reverted 4 over 1 alone
        want = {str(l): fingerprint(materialize(st.base[l], [st.factors[k][l] for k in sets[r.id]]))
                for l in LAYERS}
        assert r.fingerprint_after == want, r.id
    assert sum(new.records[i].fingerprint_after != old[i + 1] for i in range(7)) > 0   # the bits moved
    assert api.rollback(st.path, 5)["reverted"] == [7]     # verified against the new fingerprints
    assert api.rollback(st.path, 0)["head"] == 0


def test_migrate_refuses_a_store_whose_fingerprints_disagree(tmp_path):
    st, _ = _format1_store(tmp_path / "s.h5")
    with h5py.File(st.path, "r+") as f:
        recs = [r.decode() if isinstance(r, bytes) else r for r in f["records"][()]]
        recs[2] = recs[2].replace('"fingerprint_after":{"0":"', '"fingerprint_after":{"0":"f')
        del f["records"]
        f.create_dataset("records", data=np.array(recs, dtype=object), dtype=h5py.string_dtype("utf-8"))
    before = sha(st.path)
    res = cli("migrate", "--store", st.path, code=1)
    assert "batch 3's recorded fingerprints match no set of batches" in res.stderr and "hint:" in res.stderr
    assert sha(st.path) == before
    with pytest.raises(Exception, match="lifelong migrate"):
        Store.open(st.path)


def test_format_2_reads_as_it_is(tmp_path):
    """2 -> 3 only adds the optional units/group array: a format-2 store opens without
    `lifelong migrate`, its batches read with one key row per group."""
    st, _ = _format1_store(tmp_path / "s.h5")
    cli("migrate", "--store", st.path)
    with h5py.File(st.path, "r+") as f:
        f.attrs["format_version"] = 2
    again = Store.open(st.path)
    assert again.format_version == 2 and len(again.records) == 7       # on disk; read as 3 in memory
    res = cli("log", "--store", st.path)
    assert "active" in res.stdout
