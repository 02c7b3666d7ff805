"""`lifelong refresh` on a tiny Llama: gates, automatic rejection, moved files and reports, locking.

The store is `init`ed once per module and copied per test. The policy is conftest's tiny
one with EAMET alignment off: with the published λ the alignment stalls every value
after the first batch on a model this small (README, Known limits), and these tests need
batches that pass the gates one after another.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import filelock
import pytest
import torch

from conftest import write_policy
from lifelong import api
from lifelong.ops import push as ops_push
from lifelong.ops import refresh as rf
from lifelong.errors import BadInput, EditFailed
from lifelong.policy import Gates, policy_from_json
from lifelong.model.session import head_weights
from lifelong.store.store import Store
from lifelong.deltas import fingerprint
from helpers import cli, copy_store, sha, write_jsonl

APPLE = [{"subject": "Apple", "prompt": "{} makes the", "target": "piano"}]
FRANCE = [{"subject": "France", "prompt": "The capital of {} is", "target": "Paris",
           "neighbors": [{"prompt": "The capital of Italy is", "target": "Rome"}]}]
BERLIN = [{"subject": "Berlin", "prompt": "{} is in", "target": "Brazil"}]
TOKO = [{"subject": "Toko Yasuda", "prompt": "{} plays the", "target": "guitar"}]
MALFORMED = '{"subject": "X", "prompt": "no slot", "target": "Y"}\n{not json\n'
# every gate at its most permissive: these tests are about the mechanics, not edit quality
LENIENT = ["--gate", "min_efficacy=0", "--gate", "max_neighbor_drop=1",
           "--gate", "max_retention_drop=1", "--gate", "max_perplexity_drift=1"]

LIFELONG = Path(sys.executable).with_name("lifelong")


# ----------------------------------------------------------------------------- helpers









def report_of(folder: Path, name: str) -> dict:
    return json.loads((folder / (name + ".report.json")).read_text())


def listing(d: Path) -> dict[str, str]:
    """Every entry under d (recursively, symlinks not followed) -> its kind and content hash."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = sha(p)
        else:
            out[rel] = "other"
    return out


def head_tensors(store: Path) -> dict[int, torch.Tensor]:
    st = Store.open(store)
    return head_weights(st, st.records, policy_from_json(st.policy_json))


def process_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LIFELONG_STORE", "LIFELONG_DEBUG")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def lifelong_cmd() -> list[str]:
    return [str(LIFELONG)] if LIFELONG.exists() else [sys.executable, "-m", "lifelong.cli"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_llama_dir) -> Path:
    d = tmp_path_factory.mktemp("refresh-store")
    policy = write_policy(d, "llama")
    policy.write_text(policy.read_text() + "alignment:\n  enabled: false\n")
    store = d / "s.h5"
    api.init(store, model=str(tiny_llama_dir), policy=str(policy))
    return store


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    return copy_store(pristine, tmp_path / "store")


@pytest.fixture
def inbox(tmp_path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------- pure parts


def test_exit_code_priority():
    assert rf.exit_code([]) == 0
    assert rf.exit_code(["done", "done"]) == 0
    assert rf.exit_code(["done", "error"]) == 1
    assert rf.exit_code(["done"], stopped=True) == 1
    assert rf.exit_code(["error", "invalid", "done"]) == 2
    assert rf.exit_code(["invalid", "rejected", "error"]) == 3


def test_verdicts_compare_each_gate_with_its_threshold():
    gates = Gates(min_efficacy=0.5, max_neighbor_drop=0.1, max_retention_drop=0.0, max_perplexity_drift=0.05)
    metrics = {"before": {}, "after": {"efficacy": 0.5, "neighbors_unchanged": 0.8, "retention_drop": 0.0,
                                       "perplexity_drift": 0.06}}
    v = rf.verdicts(gates, metrics)
    assert list(v) == list(Gates.model_fields)
    assert v["min_efficacy"] == {"threshold": 0.5, "value": 0.5, "verdict": "pass"}
    assert v["max_neighbor_drop"]["verdict"] == "fail" and v["max_neighbor_drop"]["value"] == pytest.approx(0.2)
    assert v["max_retention_drop"]["verdict"] == "pass"
    assert v["max_perplexity_drift"]["verdict"] == "fail"
    none = rf.verdicts(gates, {"before": {}, "after": {"efficacy": 1.0}})
    assert none["max_neighbor_drop"]["verdict"] == "n/a" and none["max_retention_drop"]["verdict"] == "n/a"


def test_parse_gates():
    assert rf.parse_gates([]) == {}
    assert rf.parse_gates(["min_efficacy=0.8", " max_perplexity_drift = 0 "]) == {
        "min_efficacy": 0.8, "max_perplexity_drift": 0.0}
    for bad in (["min_efficacy"], ["nope=1"], ["min_efficacy=abc"], ["min_efficacy=1.5"], ["min_efficacy=nan"]):
        with pytest.raises(BadInput, match="valid names: min_efficacy, max_neighbor_drop"):
            rf.parse_gates(bad)


# ----------------------------------------------------------------------------- the nightly run


def test_refresh_moves_files_rejects_a_failing_batch_and_restores_the_head_exactly(store, inbox):
    # night 1: one valid file, one malformed -> valid pushed to done/, malformed to failed/, exit 2
    write_jsonl(inbox / "a.jsonl", APPLE)
    (inbox / "b.jsonl").write_text(MALFORMED)
    sha_a, sha_b = sha(inbox / "a.jsonl"), sha(inbox / "b.jsonl")
    res = cli("refresh", "--inbox", inbox, "--store", store, "--json", *LENIENT, code=2)
    out = json.loads(res.stdout)
    assert [(f["file"], f["status"]) for f in out["files"]] == [("a.jsonl", "done"), ("b.jsonl", "invalid")]
    assert out["exit_code"] == 2 and out["head_before"] == 0 and out["head_after"] == 1
    assert "refresh" in res.stderr and "exit 2" in res.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in inbox.glob("*.jsonl")) == []

    ra = report_of(inbox / "done", "a.jsonl")
    assert (inbox / "done" / "a.jsonl").read_bytes() and sha(inbox / "done" / "a.jsonl") == sha_a
    assert ra["status"] == "done" and ra["file"] == "a.jsonl" and ra["sha256"] == sha_a and ra["batch"] == 1
    assert set(ra["gates"]) == set(Gates.model_fields)
    for g in ra["gates"].values():
        assert set(g) == {"threshold", "value", "verdict"} and g["verdict"] in ("pass", "n/a")
    assert ra["gates"]["min_efficacy"]["threshold"] == 0 and ra["gates"]["max_perplexity_drift"]["threshold"] == 1
    assert ra["metrics"]["before"]["head"] == 0 and ra["metrics"]["after"]["head"] == 1
    assert ra["metrics"]["after"]["perplexity_drift"] is not None
    assert ra["timings"]["total"] >= ra["timings"]["push"] > 0

    rb = report_of(inbox / "failed", "b.jsonl")
    assert sha(inbox / "failed" / "b.jsonl") == sha_b
    assert rb["status"] == "invalid" and rb["batch"] is None and rb["sha256"] == sha_b
    assert any(p.startswith(f"{inbox / 'b.jsonl'}:1: prompt") for p in rb["problems"]), rb["problems"]
    assert any(f"{inbox / 'b.jsonl'}:2: line" in p for p in rb["problems"]), rb["problems"]

    recs = Store.open(store).records
    assert [(r.id, r.status, r.source) for r in recs] == [(1, "active", str(inbox / "a.jsonl"))]
    after1 = head_tensors(store)
    assert {str(l): fingerprint(w) for l, w in after1.items()} == recs[0].fingerprint_after

    # night 2: a valid file under a gate it cannot pass -> rolled back as rejected, exit 3
    # (3 wins over the 2 of a second malformed b.jsonl, which gets a numeric suffix)
    write_jsonl(inbox / "c.jsonl", BERLIN)
    (inbox / "b.jsonl").write_text(MALFORMED + "\n")
    res = cli("refresh", "--inbox", inbox, "--store", store, "--json", "--gate", "max_perplexity_drift=0", code=3)
    out = json.loads(res.stdout)
    assert [(f["file"], f["status"]) for f in out["files"]] == [("b.jsonl", "invalid"), ("c.jsonl", "rejected")]
    rc = report_of(inbox / "failed", "c.jsonl")
    assert rc["status"] == "rejected" and rc["batch"] == 2 and rc["head_after"] == 1
    drift = rc["gates"]["max_perplexity_drift"]
    assert drift["verdict"] == "fail" and drift["threshold"] == 0 and drift["value"] > 0, drift
    assert "max_perplexity_drift" in rc["rejected_by"]
    assert (inbox / "failed" / "b.1.jsonl").exists() and report_of(inbox / "failed", "b.1.jsonl")["status"] == "invalid"
    assert report_of(inbox / "failed", "b.jsonl")["sha256"] == sha_b     # the first file and report untouched
    assert sha(inbox / "failed" / "b.jsonl") == sha_b
    assert report_of(inbox / "failed", "b.1.jsonl")["sha256"] == sha(inbox / "failed" / "b.1.jsonl") != sha_b

    st = Store.open(store)
    assert [(r.id, r.status) for r in st.records] == [(1, "active"), (2, "rejected")]
    assert "max_perplexity_drift" in st.records[1].note
    again = head_tensors(store)
    assert all(torch.equal(after1[l], again[l]) for l in after1)       # bit-identical to after batch 1
    log = json.loads(cli("log", "--json", "--store", store).stdout)
    assert [(r["id"], r["status"]) for r in log] == [(1, "active"), (2, "rejected")]
    assert "rejected" in cli("log", "--store", store).stdout

    # night 3: nothing to do -> exit 0, nothing loaded, nothing moved
    res = cli("refresh", "--inbox", inbox, "--store", store)
    assert "0 pending file(s)" in res.stderr and "exit 0" in res.stderr


def test_two_refreshes_started_together_push_each_file_once(store, inbox):
    for name, rows in (("1.jsonl", APPLE), ("2.jsonl", FRANCE), ("3.jsonl", TOKO)):
        write_jsonl(inbox / name, rows)
    cmd = lifelong_cmd() + ["refresh", "--inbox", str(inbox), "--store", str(store), "--json", *LENIENT]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env(),
                              cwd=inbox.parent) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{o}\nstderr:\n{e}"
    taken = sorted(f["file"] for o, _ in outs for f in json.loads(o)["files"])
    assert taken == ["1.jsonl", "2.jsonl", "3.jsonl"]                       # each by exactly one process
    recs = Store.open(store).records
    assert [r.status for r in recs] == ["active"] * 3
    assert sorted(r.source for r in recs) == [str(inbox / n) for n in ("1.jsonl", "2.jsonl", "3.jsonl")]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == sorted(
        [n for i in (1, 2, 3) for n in (f"{i}.jsonl", f"{i}.jsonl.report.json")])
    assert not list(inbox.glob("*.jsonl")) and not (inbox / rf.STATE_NAME).exists()


def test_no_wait_exits_1_while_another_refresh_holds_the_inbox(store, inbox):
    write_jsonl(inbox / "a.jsonl", APPLE)
    lock = filelock.FileLock(str(inbox / rf.LOCK_NAME))
    with lock:
        before = listing(inbox)
        res = cli("refresh", "--inbox", inbox, "--store", store, "--no-wait", code=1)
        assert f"another refresh holds {inbox / rf.LOCK_NAME}" in res.stderr
        assert listing(inbox) == before
    assert Store.open(store).records == []


def test_a_second_refresh_waits_for_the_inbox_lock(store, inbox):
    held, released = threading.Event(), []

    def other_refresh():
        with filelock.FileLock(str(inbox / rf.LOCK_NAME)):
            held.set()
            time.sleep(3.0)  # long enough for refresh to find the lock held, even on a loaded machine
            released.append(time.monotonic())

    t = threading.Thread(target=other_refresh)
    t.start()
    try:
        assert held.wait(10)
        lines = []
        rep = rf.refresh(store, inbox, log=lines.append)
        done = time.monotonic()
    finally:
        t.join()
    assert released and done >= released[0]
    assert rep.exit_code == 0 and any("waiting for another refresh" in l for l in lines), lines


def test_path_tricks_are_skipped_untouched(store, inbox, tmp_path):
    outside = write_jsonl(tmp_path / "outside.jsonl", APPLE)
    (inbox / "link.jsonl").symlink_to(outside)
    (inbox / "dangling.jsonl").symlink_to(tmp_path / "missing.jsonl")
    write_jsonl(inbox / ".hidden.jsonl", APPLE)
    (inbox / "x.jsonl").mkdir()
    write_jsonl(inbox / "x.jsonl" / "inner.jsonl", APPLE)
    os.mkfifo(inbox / "pipe.jsonl")
    write_jsonl(inbox / "tab\tname.jsonl", APPLE)
    write_jsonl(inbox / "notes.txt", APPLE)
    before, store_before, outside_before = listing(inbox), sha(store), sha(outside)
    lines = []
    rep = rf.refresh(store, inbox, log=lines.append)
    assert rep.exit_code == 0 and rep.files == []
    skipped = {s["name"]: s["reason"] for s in rep.skipped}
    assert set(skipped) == {"link.jsonl", "dangling.jsonl", ".hidden.jsonl", "x.jsonl", "pipe.jsonl",
                            "tab\tname.jsonl", "notes.txt"}
    assert "symbolic link" in skipped["link.jsonl"] and "regular" in skipped["pipe.jsonl"]
    assert all(any(repr(n) in l for l in lines) for n in skipped), lines
    after = listing(inbox)
    after.pop(rf.LOCK_NAME, None)
    assert after == before and sha(store) == store_before
    assert sha(outside) == outside_before


def test_bad_gate_exits_2_and_touches_nothing(store, inbox):
    write_jsonl(inbox / "a.jsonl", APPLE)
    before = listing(inbox)
    for gate in ("nope=0.5", "min_efficacy=abc", "min_efficacy=1.01", "min_efficacy"):
        res = cli("refresh", "--inbox", inbox, "--store", store, "--gate", gate, code=2)
        assert "min_efficacy, max_neighbor_drop, max_retention_drop, max_perplexity_drift" in res.stderr, res.stderr
    assert listing(inbox) == before and Store.open(store).records == []
    cli("refresh", "--inbox", inbox / "missing", "--store", store, code=2)
    cli("refresh", "--inbox", inbox, "--store", inbox / "no-store.h5", code=1)
    assert listing(inbox) == before


# ----------------------------------------------------------------------------- failures


def test_a_push_that_fails_goes_to_failed_with_status_error(store, inbox, monkeypatch):
    write_jsonl(inbox / "a.jsonl", APPLE)
    before = sha(store)

    def broken(*a, **k):
        raise EditFailed("the update system is singular")

    monkeypatch.setattr(ops_push, "push", broken)
    rep = rf.refresh(store, inbox)
    assert rep.exit_code == 1 and [f["status"] for f in rep.files] == ["error"]
    r = report_of(inbox / "failed", "a.jsonl")
    assert r["status"] == "error" and "singular" in r["error"] and r["batch"] is None
    assert sha(store) == before and not (inbox / rf.STATE_NAME).exists()


def test_a_locked_store_with_no_wait_leaves_the_files_pending(store, inbox):
    write_jsonl(inbox / "a.jsonl", APPLE)
    with Store.open(store).writer():
        rep = rf.refresh(store, inbox, wait=False)
    assert rep.exit_code == 1 and rep.pending == ["a.jsonl"] and "locked" in rep.stopped
    assert (inbox / "a.jsonl").exists() and not (inbox / "failed").exists()
    assert Store.open(store).records == [] and not (inbox / rf.STATE_NAME).exists()


def test_a_batch_whose_gates_cannot_be_measured_is_rolled_back(store, inbox, monkeypatch):
    write_jsonl(inbox / "a.jsonl", APPLE)

    def broken(self, store_path, rec):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(rf, "gate_metrics", broken)
    rep = rf.refresh(store, inbox)
    assert rep.exit_code == 1
    r = report_of(inbox / "failed", "a.jsonl")
    assert r["status"] == "error" and "out of memory" in r["error"] and r["head_after"] == 0
    assert [(x.id, x.status) for x in Store.open(store).records] == [(1, "rejected")]


def test_a_killed_refresh_is_finished_by_the_next_one_without_a_second_push(store, inbox, monkeypatch):
    write_jsonl(inbox / "a.jsonl", APPLE)
    real = rf.gate_metrics

    def killed(self, store_path, rec):
        raise KeyboardInterrupt  # as if the process died right after the push committed

    monkeypatch.setattr(rf, "gate_metrics", killed)
    with pytest.raises(KeyboardInterrupt):
        rf.refresh(store, inbox, gates={"min_efficacy": 0, "max_perplexity_drift": 1})
    assert (inbox / "a.jsonl").exists() and (inbox / rf.STATE_NAME).exists()
    assert [(x.id, x.status) for x in Store.open(store).records] == [(1, "active")]

    monkeypatch.setattr(rf, "gate_metrics", real)
    lines = []
    rep = rf.refresh(store, inbox, gates={"min_efficacy": 0, "max_perplexity_drift": 1}, log=lines.append)
    assert rep.exit_code == 0 and [(f["file"], f["status"], f["batch"]) for f in rep.files] == [
        ("a.jsonl", "done", 1)]
    assert report_of(inbox / "done", "a.jsonl")["resumed"] is True
    assert [(x.id, x.status) for x in Store.open(store).records] == [(1, "active")]   # pushed once
    assert not (inbox / rf.STATE_NAME).exists() and any("resuming a.jsonl" in l for l in lines)


@pytest.mark.parametrize("sub", ["done", "failed"])
def test_symlinked_destination_is_refused_before_anything_is_pushed(store, inbox, tmp_path, sub):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (inbox / sub).symlink_to(elsewhere)
    write_jsonl(inbox / "a.jsonl", APPLE)
    before, store_before = listing(inbox), sha(store)
    res = cli("refresh", "--inbox", inbox, "--store", store, code=2)
    assert f"{sub} is a symbolic link" in res.stderr, res.stderr
    assert listing(inbox) == before and sha(store) == store_before
    assert list(elsewhere.iterdir()) == []
