"""The HDF5 store: round trips, atomic commits, the writer lock, refusals, kills."""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from lifelong.store import atomic, history, migrations, store as store_mod
from lifelong.errors import StoreError, StoreExists, StoreLocked
from lifelong.store.history import BatchRecord, GroupRecord, rolled_back
from lifelong.store.layout import FORMAT_VERSION
from lifelong.store.store import Store

REPO = Path(__file__).resolve().parents[1]


def make_store(path: Path, **kw) -> Store:
    args = dict(
        model={"name": "tiny", "layers": [4, 5]},
        policy_json='{"alpha": 10}',
        base_fingerprint={"layer4": "ab" * 32},
        info={"kept_dims": {"4": 810}},
        base_arrays={"layer4/P": np.eye(4, dtype=np.float32), "layer4/C": np.ones((4, 4), np.float64)},
    )
    args.update(kw)
    return Store.create(path, **args)


def fact(subject: str, relation: str = "P1") -> dict:
    return {"subject": subject, "relation": relation, "prompt": "{} is in", "target": " Paris",
            "paraphrases": [f"Where is {subject}?"], "neighbors": [{"prompt": "Rome is in", "target": " Italy"}]}


def record(bid: int, facts: list[dict]) -> BatchRecord:
    return BatchRecord(
        id=bid, created=history.utc_now(), source=f"in/{bid}.jsonl", sha256="0" * 64, status="active",
        facts=facts, groups=[GroupRecord(f["subject"], [(bid, i)]) for i, f in enumerate(facts)],
        efficacy=[1.0] * len(facts), fingerprint_after={"layer4": f"{bid:064d}"})


def arrays(bid: int) -> dict[str, np.ndarray]:
    return {"layer4/U": np.full((4, 2), bid, np.float32), "layer4/V": np.full((2, 4), -bid, np.float16)}


def add(st: Store, facts: list[dict] | None = None) -> BatchRecord:
    with st.writer() as tx:
        rec = record(tx.next_id(), facts or [fact(f"s{tx.next_id()}")])
        tx.add_batch(rec, arrays(rec.id))
    return rec


# --------------------------------------------------------------------------- round trips


def test_create_open_round_trip(tmp_path):
    path = tmp_path / "nested" / "dir" / "s.h5"
    st = make_store(path)
    assert path.is_file() and (tmp_path / "nested/dir/s.h5.d/base.h5").is_file()
    for s in (st, Store.open(path)):
        assert s.model == {"name": "tiny", "layers": [4, 5]}
        assert s.policy_json == '{"alpha": 10}'
        assert s.base_fingerprint == {"layer4": "ab" * 32}
        assert s.info == {"kept_dims": {"4": 810}}
        assert s.records == [] and s.format_version == FORMAT_VERSION and s.created.endswith("Z")
        base = s.base_arrays()
        assert set(base) == {"layer4/P", "layer4/C"}
        assert base["layer4/P"].dtype == np.float32 and np.array_equal(base["layer4/P"], np.eye(4))
        assert base["layer4/C"].dtype == np.float64
        assert list(s.base_arrays(["layer4/C"])) == ["layer4/C"]
        assert s.size_bytes() > 0
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "lifelong-store" and f.attrs["format_version"] == FORMAT_VERSION
    with pytest.raises(StoreError, match="no array"):
        st.base_arrays(["nope"])


def test_create_refuses_an_existing_store(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path)
    before = path.read_bytes()
    with pytest.raises(StoreExists, match="already exists"):
        make_store(path, base_arrays={})
    assert path.read_bytes() == before


def test_batches_rollback_and_reopen(tmp_path):
    path = tmp_path / "s.h5"
    st = make_store(path)
    r1 = add(st, [fact("Paris"), fact("Rome", "P2")])
    add(st)
    assert [r.id for r in st.records] == [1, 2]
    st2 = Store.open(path)
    got = st2.records[0]
    assert got.groups == r1.groups and got.fingerprint_after == r1.fingerprint_after
    # the manifest keeps the index fields; the full facts sit beside the arrays
    assert got.facts == history.index_facts(r1.facts) and "paraphrases" not in got.facts[0]
    assert st2.batch_facts(1) == r1.facts
    a = st2.batch_arrays(2)
    assert set(a) == {"layer4/U", "layer4/V"} and a["layer4/V"].dtype == np.float16
    assert np.all(a["layer4/U"] == 2) and np.all(a["layer4/V"] == -2)
    assert st2.record(2).id == 2

    with st2.writer() as tx:
        tx.set_records(rolled_back(tx.records, 1))
    for s in (st2, Store.open(path)):
        assert [r.status for r in s.records] == ["active", "reverted"]
        assert history.head(s.records) == 1
        assert np.all(s.batch_arrays(2)["layer4/U"] == 2)  # a reverted batch stays readable
    rec3 = add(st2)
    assert rec3.id == 3 and [r.status for r in Store.open(path).records] == ["active", "reverted", "active"]
    with pytest.raises(StoreError, match="no batch 9"):
        st2.batch_arrays(9)


def test_transaction_misuse_is_refused(tmp_path):
    st = make_store(tmp_path / "s.h5")
    add(st)
    before = st.path.read_bytes()
    with pytest.raises(StoreError, match="not the next id"):
        with st.writer() as tx:
            tx.add_batch(record(5, [fact("x")]), {})
    with pytest.raises(StoreError, match="same batch ids"):
        with st.writer() as tx:
            tx.set_records([])
    with pytest.raises(StoreError, match="changed directly"):
        with st.writer() as tx:
            tx.records.append(record(2, [fact("x")]))
    with pytest.raises(StoreError, match="bad array name"):
        with st.writer() as tx:
            tx.add_batch(record(2, [fact("x")]), {"_lifelong/facts": np.zeros(1)})
    assert st.path.read_bytes() == before
    assert not st.batch_file(2).exists()


def test_update_info_and_no_op_writer(tmp_path):
    st = make_store(tmp_path / "s.h5")
    before = st.path.read_bytes()
    with st.writer() as tx:
        _ = tx.records  # reading changes nothing
    assert st.path.read_bytes() == before
    with st.writer() as tx:
        tx.update_info(last_refresh="2025-01-01")
    assert Store.open(st.path).info == {"kept_dims": {"4": 810}, "last_refresh": "2025-01-01"}


# --------------------------------------------------------------------------- failures leave the store unchanged


def test_failing_transaction_changes_nothing(tmp_path):
    st = make_store(tmp_path / "s.h5")
    add(st)
    before = st.path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with st.writer() as tx:
            tx.add_batch(record(2, [fact("x")]), arrays(2))
            assert st.batch_file(2).exists()
            raise RuntimeError("boom")
    assert st.path.read_bytes() == before
    assert not st.batch_file(2).exists()
    assert [r.id for r in Store.open(st.path).records] == [1]
    assert add(st).id == 2


def test_nan_arrays_are_refused(tmp_path):
    with pytest.raises(StoreError, match="'layer4/P'.*NaN"):
        make_store(tmp_path / "a.h5", base_arrays={"layer4/P": np.array([1.0, np.nan])})
    assert not (tmp_path / "a.h5").exists()
    st = make_store(tmp_path / "s.h5")
    before = st.path.read_bytes()
    with pytest.raises(StoreError, match="'layer4/U'.*NaN/inf"):
        with st.writer() as tx:
            tx.add_batch(record(1, [fact("x")]), {"layer4/U": np.array([np.inf], np.float32)})
    assert st.path.read_bytes() == before and not st.batch_file(1).exists()


@pytest.mark.parametrize("stage", ["object", "manifest"])
def test_disk_full_leaves_the_store_unchanged(tmp_path, monkeypatch, stage):
    st = make_store(tmp_path / "s.h5")
    add(st)
    before = st.path.read_bytes()
    real = atomic.fsync_path

    def fsync(p):
        if (stage == "object") == ("batch_" in Path(p).name):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(p)

    monkeypatch.setattr(atomic, "fsync_path", fsync)
    with pytest.raises(StoreError, match="disk full while .*the store is unchanged"):
        add(st)
    assert st.path.read_bytes() == before
    assert not st.batch_file(2).exists()
    leftovers = [p.name for p in list(tmp_path.iterdir()) + list(st.objects_dir.iterdir()) if ".tmp-" in p.name]
    assert leftovers == []
    monkeypatch.undo()
    assert add(st).id == 2


def test_stale_temp_files_are_cleaned_by_the_next_writer(tmp_path):
    st = make_store(tmp_path / "s.h5")
    stale = [st.objects_dir / ".batch_000001.h5.tmp-1-deadbeef", tmp_path / ".s.h5.tmp-1-deadbeef"]
    for p in stale:
        p.write_bytes(b"half")
    add(st)
    assert not any(p.exists() for p in stale)


# --------------------------------------------------------------------------- the lock


def test_second_writer_is_refused_while_a_thread_holds_the_lock(tmp_path):
    st = make_store(tmp_path / "s.h5")
    held, release = threading.Event(), threading.Event()

    def hold():
        with Store.open(st.path).writer():
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(StoreLocked, match=r"s\.h5\.lock"):
            with st.writer(wait=False):
                pass
        with pytest.raises(StoreLocked, match="waited 0.2 s"):
            with st.writer(timeout=0.2):
                pass
        assert Store.open(st.path).records == []  # readers need no lock
    finally:
        release.set()
        t.join()
    add(st)  # free again


def test_second_writer_is_refused_while_another_process_holds_the_lock(tmp_path):
    st = make_store(tmp_path / "s.h5")
    code = textwrap.dedent(f"""
        import sys, time
        from lifelong.store.store import Store
        with Store.open({str(st.path)!r}).writer():
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=REPO, env=_env())
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match="another process"):
            with st.writer(wait=False):
                pass
    finally:
        p.communicate("go\n", timeout=30)
    assert p.returncode == 0
    add(st)


# --------------------------------------------------------------------------- refusing what is not a store


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no store at .*missing.h5") as e:
        Store.open(tmp_path / "missing.h5")
    assert "lifelong init" in str(e.value)


def test_non_hdf5_file_is_refused(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("hello\n")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        Store.open(p)


def test_foreign_hdf5_file_is_refused(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a lifelong store"):
        Store.open(p)


def test_truncated_store_is_refused(tmp_path):
    st = make_store(tmp_path / "s.h5")
    add(st)
    data = st.path.read_bytes()
    st.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="damaged|truncated"):
        Store.open(st.path)


def test_newer_format_is_refused(tmp_path):
    st = make_store(tmp_path / "s.h5")
    with h5py.File(st.path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match="upgrade lifelong"):
        Store.open(st.path)


def _make_old(tmp_path) -> Store:
    st = make_store(tmp_path / "s.h5")
    add(st)
    with h5py.File(st.path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION - 1
    return st


def test_older_format_without_migration_is_refused(tmp_path, monkeypatch):
    st = _make_old(tmp_path)
    monkeypatch.setattr(migrations, "MIGRATIONS", {})
    with pytest.raises(StoreError, match="cannot read or migrate"):
        Store.open(st.path)


def test_older_format_is_migrated_in_memory_or_by_migrate(tmp_path, monkeypatch):
    st = _make_old(tmp_path)
    monkeypatch.setattr(migrations, "MIGRATIONS", {})

    @migrations.migration(FORMAT_VERSION - 1, read_compatible=False)
    def up(m):
        m["info"] = dict(m["info"], upgraded=True)
        for r in m["records"]:
            r["note"] = "migrated"
        return m

    with pytest.raises(StoreError, match="lifelong migrate"):
        Store.open(st.path)
    up.read_compatible = True
    old = Store.open(st.path)
    assert old.format_version == FORMAT_VERSION - 1 and old.info["upgraded"] is True
    assert old.records[0].note == "migrated"
    with pytest.raises(StoreError, match="lifelong migrate"):
        with old.writer():
            pass
    assert old.migrate() == [FORMAT_VERSION - 1]
    new = Store.open(st.path)
    assert new.format_version == FORMAT_VERSION and new.records[0].note == "migrated"
    assert new.info["migrations"][0]["from"] == FORMAT_VERSION - 1
    assert add(new).id == 2


# --------------------------------------------------------------------------- kill safety

KILL_CHILD = """
import random, sys
import numpy as np
from lifelong.store.history import BatchRecord, GroupRecord, active, rolled_back
from lifelong.store.store import Store

st = Store.open(sys.argv[1])
while True:
    with st.writer() as tx:
        act = active(tx.records)
        if len(act) >= 2 and random.random() < 0.25:
            tx.set_records(rolled_back(tx.records, act[-2].id))
            what = "back"
        else:
            n = tx.next_id()
            f = {"subject": f"s{n}", "prompt": "{} is in", "target": " X",
                 "neighbors": [{"prompt": "p", "target": "t"}]}
            rec = BatchRecord(n, "t", "f", "0" * 64, "active", [f], [GroupRecord(f"s{n}", [(n, 0)])])
            tx.add_batch(rec, {"w/U": np.full((256, 8), n, np.float32), "w/V": np.full(8, n, np.float64)})
            what = f"add {n}"
    print(what, flush=True)
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check_consistent(path: Path, at_least: int) -> int:
    st = Store.open(path)
    recs = st.records
    assert [r.id for r in recs] == list(range(1, len(recs) + 1))
    assert len(recs) >= at_least  # every commit the child reported is durable
    for r in recs:
        a = st.batch_arrays(r.id)
        assert np.all(a["w/U"] == r.id) and np.all(a["w/V"] == r.id)
        assert st.batch_facts(r.id)[0]["subject"] == f"s{r.id}"
    history.live_groups(recs), history.live_facts(recs)
    return len(recs)


def _kill_trials(tmp_path: Path, trials: int) -> None:
    path = tmp_path / "k.h5"
    make_store(path, base_arrays={"w/P": np.eye(8)})
    rng = random.Random(1234)
    reported = 0
    for _ in range(trials):
        p = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
        first = p.stdout.readline()
        if not first:
            p.wait()
            pytest.fail("child failed: " + p.stderr.read())
        try:
            p.wait(timeout=rng.uniform(0.0, 0.25))
        except subprocess.TimeoutExpired:
            pass
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        for line in [first] + out.splitlines():
            if line.startswith("add "):
                reported = max(reported, int(line.split()[1]))
        _check_consistent(path, reported)
    with Store.open(path).writer() as tx:  # the next writer sweeps what the kills left
        tx.update_info(swept=True)
    left = [p.name for p in list(tmp_path.iterdir()) + list((tmp_path / "k.h5.d").iterdir()) if ".tmp-" in p.name]
    assert left == []
    assert reported >= trials


def test_killed_writers_leave_a_consistent_store(tmp_path):
    _kill_trials(tmp_path, 10)


@pytest.mark.slow
def test_killed_writers_leave_a_consistent_store_many(tmp_path):
    _kill_trials(tmp_path, 60)


# --------------------------------------------------------------------------- scale (not timed)


@pytest.mark.slow
def test_ten_thousand_batches(tmp_path):
    """10^4 batches x 10 facts: open reads without parsing; an append reuses the stored JSON."""
    import time

    st = make_store(tmp_path / "s.h5")
    recs = [record(b, [fact(f"s{b}-{i}") for i in range(10)]) for b in range(1, 10_001)]
    snap = replace(st._snap, raw=[store_mod._indexed(r).to_json() for r in recs], parsed=None)
    store_mod._write_manifest(st.path, snap, snap.raw)
    for b in range(1, 10_001):  # the object files the records reference
        os.link(st.objects_dir / "base.h5", st.batch_file(b))
    t0 = time.perf_counter()
    big = Store.open(st.path)
    t1 = time.perf_counter()
    n = len(big.records)
    t2 = time.perf_counter()
    add(big)
    t3 = time.perf_counter()
    print(f"open {t1 - t0:.3f} s, parse {n} records {t2 - t1:.3f} s, append commit {t3 - t2:.3f} s")
    assert [r.id for r in Store.open(st.path).records][-2:] == [10_000, 10_001]


def test_migrate_command_upgrades_an_older_store(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lifelong.cli import main

    st = _make_old(tmp_path)
    monkeypatch.setattr(migrations, "MIGRATIONS", {})

    @migrations.migration(FORMAT_VERSION - 1, read_compatible=False)
    def up(m):
        return m

    runner = CliRunner()
    refused = runner.invoke(main, ["log", "--store", str(st.path)])
    assert refused.exit_code == 1 and "lifelong migrate" in refused.output
    res = runner.invoke(main, ["migrate", "--store", str(st.path)])
    assert res.exit_code == 0, res.output
    assert f"migrated from format [{FORMAT_VERSION - 1}]" in res.output
    assert Store.open(st.path).format_version == FORMAT_VERSION
    again = runner.invoke(main, ["migrate", "--store", str(st.path)])
    assert again.exit_code == 0 and "already at format" in again.output
