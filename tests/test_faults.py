"""Fault injection (DESIGN §5): kills, a read-only or full disk, damaged and foreign stores.

* `lifelong rollback` and `lifelong refresh` run as real processes (one OpenMP thread) and
  get SIGKILL at random moments: during the start, once the lock is held, inside the
  commit (the manifest's temp file is on disk), right after it, and while a refresh
  measures or moves its file. Afterwards the store must open and its state (the
  `lifelong log --json` rows, the head, the fingerprints of the head weights computed from
  the store alone, and for refresh the inbox listing) must be exactly the state before
  or after the operation; for refresh also the intermediates it documents as recoverable
  (its batch committed, the file still pending; the file moved, its report not yet; each
  with `DIR/.lifelong-refresh.state.json` beside it). The next run must then reach exactly
  the "after" state, pushing the file once. "After" is measured once by running the
  operation to completion on a copy.
* The same for a refresh whose batch fails a gate, killed also while its gates are
  measured, inside the automatic rollback's commit and while the file moves to failed/:
  the batch may be left active or already rejected with the file pending, and the next
  run must end with it rejected (never active) and the file in failed/ with its report.
* A read-only file system (EROFS when the lock, an object file or the manifest is
  written, or at the rename) and a full disk (ENOSPC while the commit writes or syncs the
  manifest) give a StoreError that says so, exit 1 through the CLI, and leave the store
  byte-identical with no temp file behind.
* A manifest cut to half and a foreign HDF5 file: every command exits 1 with a clear
  message and nothing changes.

The microsecond-wide moments a random kill rarely hits (a refresh between writing a temp
file and renaming it) are hit on purpose in-process. The default suite kills rollback
and refresh twice each and a rejecting refresh three times; `-m slow` runs 30 rollback, 25
refresh and 27 rejecting-refresh kills. Each kill test prints a one-line tally (run with
-s). Set LIFELONG_FAULT_SEED to replay a run.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pytest

from conftest import write_policy
from lifelong import api
from lifelong.store import history
from lifelong.ops import refresh as rf
from lifelong.store import atomic
from lifelong.errors import StoreError
from lifelong.policy import policy_from_json
from lifelong.model.session import expected_fingerprints, head_weights
from lifelong.store.store import Store
from lifelong.deltas import fingerprint
from helpers import cli, copy_store, sha, write_jsonl

BATCHES = [
    [{"subject": "Apple", "prompt": "{} makes the", "target": "piano"}],
    [{"subject": "Berlin", "prompt": "{} is in", "target": "Brazil"}],
    [{"subject": "Toko Yasuda", "prompt": "{} plays the", "target": "guitar"}],
]
FRANCE = [{"subject": "France", "prompt": "The capital of {} is", "target": "Paris",
           "neighbors": [{"prompt": "The capital of Italy is", "target": "Rome"}]}]
# every gate at its most permissive: a finished refresh always ends with the batch active
LENIENT = ["--gate", "min_efficacy=0", "--gate", "max_neighbor_drop=1",
           "--gate", "max_retention_drop=1", "--gate", "max_perplexity_drift=1"]
# no perplexity drift allowed: FRANCE's edit raises it, so a finished refresh rejects the batch
STRICT = LENIENT[:-1] + ["max_perplexity_drift=0"]
INBOX_FILE = "a.jsonl"

LIFELONG = Path(sys.executable).with_name("lifelong")
SEED = int(os.environ.get("LIFELONG_FAULT_SEED") or random.randrange(2**32))
POLL = 0.0005   # seconds between looks at the file system while a process runs


# ----------------------------------------------------------------------------- helpers








def objects_dir(store: Path) -> Path:
    return store.with_name(store.name + ".d")



def tree(d: Path, skip=()) -> dict[str, str]:
    """Every file under d (recursively) -> sha256; folders -> "dir"; names in `skip` left out."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.name in skip:
            continue
        out[str(p.relative_to(d))] = "dir" if p.is_dir() else sha(p)
    return out


def debris(*dirs: Path) -> list[str]:
    """Temp files killed writers left (store manifest/object temps, refresh state/report temps)."""
    return sorted(str(p) for d in dirs if d.is_dir() for p in d.rglob("*") if ".tmp-" in p.name)


def store_state(store: Path) -> dict:
    """The store as a user sees it: `log --json` rows, the head, and the fingerprints of the
    head weights computed from the store alone (which must be those recorded for the head)."""
    st = Store.open(store)                                   # StoreError if it does not open
    rows = json.loads(cli("log", "--json", "--store", store).stdout)
    recs = st.records
    weights = head_weights(st, recs, policy_from_json(st.policy_json))
    fps = {str(l): fingerprint(w) for l, w in weights.items()}
    assert fps == expected_fingerprints(st, recs), f"{store}: head weights disagree with the record"
    return {"log": [(r["id"], r["status"], r["sha256"], r["n_facts"]) for r in rows],
            "head": history.head(recs), "weights": fps}


def inbox_state(inbox: Path) -> dict:
    """Pending fact files and what done/ and failed/ hold (dotfiles and the lock left out)."""
    def names(d: Path, pending: bool = False) -> list[str]:
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and p.is_file()
                      and (not pending or p.name.endswith(".jsonl")))
    return {"pending": names(inbox, pending=True), "done": names(inbox / "done"),
            "failed": names(inbox / "failed")}


def process_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LIFELONG_STORE", "LIFELONG_DEBUG")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def lifelong_cmd() -> list[str]:
    return [str(LIFELONG)] if LIFELONG.exists() else [sys.executable, "-m", "lifelong.cli"]


# ----------------------------------------------------------------------------- a watched process

# A probe tells, from the file system alone, whether a process has reached a moment:
# probe(store, inbox) -> bool. Every probe is polled while a process runs.
def _lock_held(store: Path, inbox: Path | None) -> bool:
    return store.with_name(store.name + ".lock").exists()


def _manifest_temp(store: Path, inbox: Path | None) -> bool:
    prefix = f".{store.name}.tmp-"
    return any(n.startswith(prefix) for n in os.listdir(store.parent))


def _state_file(store: Path, inbox: Path | None) -> bool:
    return inbox is not None and (inbox / rf.STATE_NAME).exists()


def _done_dir(store: Path, inbox: Path | None) -> bool:
    return inbox is not None and (inbox / "done").exists()


def _failed_dir(store: Path, inbox: Path | None) -> bool:
    return inbox is not None and (inbox / "failed").exists()


PROBES = {"lock": _lock_held, "commit": _manifest_temp, "state": _state_file, "done_dir": _done_dir,
          "failed_dir": _failed_dir}


@dataclass
class Watched:
    """A `lifelong` subprocess; `marks` holds when (s after start) each probe first held,
    "replaced" and "replaced2" when the manifest's inode changed (a commit's rename) the
    first and second time, and "commit2" when a manifest temp file appeared after the first
    (a refresh's rollback of a rejected batch committing)."""

    proc: subprocess.Popen
    store: Path
    inbox: Path | None
    t0: float
    ino: int                      # the manifest's inode when last looked at
    stderr_file: Path
    marks: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, store: Path, args: list[str], inbox: Path | None = None) -> "Watched":
        err = store.parent / f"proc-{time.monotonic_ns()}.stderr"
        ino0 = os.stat(store).st_ino
        with open(err, "wb") as fh:
            t0 = time.monotonic()
            proc = subprocess.Popen(lifelong_cmd() + args + ["--store", str(store)], stdout=subprocess.DEVNULL,
                                    stderr=fh, env=process_env(), cwd=store.parent)
        return cls(proc, store, inbox, t0, ino0, err)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def look(self) -> None:
        """Record every probe that holds now (the first time it does)."""
        t = self.elapsed()
        for name, probe in PROBES.items():
            if name not in self.marks:
                try:
                    if probe(self.store, self.inbox):
                        self.marks[name] = t
                except OSError:
                    pass
        if "replaced" in self.marks and "commit2" not in self.marks and _manifest_temp(self.store, self.inbox):
            self.marks["commit2"] = t
        try:
            ino = os.stat(self.store).st_ino
        except OSError:
            return
        if ino != self.ino:
            self.ino = ino
            self.marks.setdefault("replaced" if "replaced" not in self.marks else "replaced2", t)

    def wait_for(self, mark: str | None, timeout: float = 300) -> bool:
        """Poll until `mark` is reached (None: the start); False if the process exited first."""
        deadline = time.monotonic() + timeout
        while True:
            self.look()
            if mark is None or mark in self.marks:
                return True
            if self.proc.poll() is not None:
                self.look()
                return mark in self.marks
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"{mark!r} never reached in {timeout} s:\n{self.stderr()}")
            time.sleep(POLL)

    def run_out(self, timeout: float = 300) -> float:
        """Let the process finish, recording marks; returns its duration."""
        while self.proc.poll() is None:
            self.look()
            if self.elapsed() > timeout:
                self.proc.kill()
                pytest.fail(f"process ran past {timeout} s:\n{self.stderr()}")
            time.sleep(POLL)
        total = self.elapsed()
        self.look()
        return total

    def kill_after(self, delay: float) -> tuple[int, float]:
        """SIGKILL after `delay` s (polling meanwhile); (exit code, when, s after start)."""
        end = time.monotonic() + delay
        while time.monotonic() < end and self.proc.poll() is None:
            self.look()
            time.sleep(min(POLL, max(0.0, end - time.monotonic())))
        at = self.elapsed()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=60)
        self.look()
        return rc, at

    def stderr(self) -> str:
        try:
            return self.stderr_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@dataclass
class Calibration:
    """One full run of a command: its duration and when each mark was reached."""

    total: float
    marks: dict[str, float]


# Where a kill's random delay starts counting (a mark, None: the process start), and the
# span it is drawn from: "total" (the whole run), "rest" (from the mark to the end), a mark
# (from the first mark to that one, in the calibration run, plus 20 %), or seconds.
KILLS = {
    "early":     (None, 0.3),             # before or while Python imports torch
    "anytime":   (None, "total"),         # anywhere in the run
    "locked":    ("lock", "rest"),        # the store's writer lock is (or was) held
    "commit":    ("commit", 0.002),       # the manifest's temp file is on disk: inside the commit itself
    "replaced":  ("replaced", "rest"),    # right at the end: after the manifest's rename, before the exit
    "state":     ("state", "rest"),       # refresh: the state file is written; the push under way or done
    "pushing":   ("state", "commit"),     # refresh: the push (model load, edit), up to its commit
    "measuring": ("replaced", "done_dir"),  # refresh: the batch committed, the gates being measured
    "moving":    ("done_dir", 0.005),     # refresh: moving the file and its report to done/
    # a refresh whose batch fails a gate
    "gating":    ("replaced", "commit2"),  # the batch committed, its gates measured, up to the rollback's commit
    "rejecting": ("commit2", 0.002),      # inside the commit of the rollback that marks the batch rejected
    "rejected":  ("replaced2", "rest"),   # the batch rejected: moving the file to failed/, exiting
    "failing":   ("failed_dir", 0.005),   # moving the file and its report to failed/
}
ROLLBACK_KILLS = ("early", "anytime", "locked", "commit", "replaced")
REFRESH_KILLS = ("early", "anytime", "state", "pushing", "commit", "measuring", "moving", "replaced")
REJECT_KILLS = ("early", "anytime", "state", "pushing", "commit", "gating", "rejecting", "rejected", "failing")


def _delay(kind: str, cal: Calibration, rng: random.Random) -> tuple[str | None, float]:
    mark, span = KILLS[kind]
    if span == "total":
        span = cal.total
    elif span == "rest":
        span = max(cal.total - cal.marks.get(mark, 0.0), 0.01)
    elif isinstance(span, str):
        span = max(1.2 * (cal.marks[span] - cal.marks[mark]), 0.005)
    return mark, rng.uniform(0, span)


def _kill_plan(kinds: tuple[str, ...], n: int, rng: random.Random, must: tuple[str, ...] = ()) -> list[str]:
    """n kill kinds: `must` first, then every kind in turn from a random offset."""
    off = rng.randrange(len(kinds))
    plan = list(must) + [kinds[(off + i) % len(kinds)] for i in range(n)]
    return plan[:n]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_llama_dir) -> Path:
    """An `init`ed tiny-Llama store (alignment off, as in test_refresh); tests must not write to it."""
    d = tmp_path_factory.mktemp("faults-pristine")
    policy = write_policy(d, "llama")
    policy.write_text(policy.read_text() + "alignment:\n  enabled: false\n")
    store = d / "s.h5"
    api.init(store, model=str(tiny_llama_dir), policy=str(policy))
    return store


@pytest.fixture(scope="module")
def three(pristine, tmp_path_factory) -> Path:
    """The store with batches 1, 2, 3 pushed; tests must not write to it."""
    d = tmp_path_factory.mktemp("faults-three")
    store = copy_store(pristine, d)
    for i, rows in enumerate(BATCHES, 1):
        assert api.push(store, write_jsonl(d / f"b{i}.jsonl", rows)).batch_id == i
    return store


@pytest.fixture(scope="module")
def rollback_ref(three, tmp_path_factory) -> dict:
    """"before", "after" per target R (rollback run to completion on a copy), and a timed
    real `lifelong rollback --to 0`."""
    d = tmp_path_factory.mktemp("faults-rollback-ref")
    before = store_state(three)
    assert before["head"] == 3 and [r[1] for r in before["log"]] == ["active"] * 3
    after = {}
    for to in range(3):
        s = copy_store(three, d / f"to{to}")
        cli("rollback", "--to", to, "--store", s)
        after[to] = store_state(s)
        assert after[to]["head"] == to and after[to] != before
    s = copy_store(three, d / "timed")
    w = Watched.start(s, ["rollback", "--to", "0", "--no-wait"])
    total = w.run_out()
    assert w.proc.returncode == 0, w.stderr()
    assert store_state(s) == after[0]                      # a real process gives the same "after"
    return {"before": before, "after": after, "cal": Calibration(total, dict(w.marks))}


def _refresh_run(pristine: Path, d: Path, gates: list[str], code: int) -> tuple[dict, dict, Calibration]:
    """"before" and "after" of a real `lifelong refresh` process run to completion (exit
    `code`) on a copy of `pristine` with an inbox holding FRANCE, and its timing."""
    store = copy_store(pristine, d / "store")
    inbox = d / "inbox"
    inbox.mkdir()
    write_jsonl(inbox / INBOX_FILE, FRANCE)
    before = {"store": store_state(store), "inbox": inbox_state(inbox)}
    w = Watched.start(store, ["refresh", "--inbox", str(inbox), *gates], inbox=inbox)
    total = w.run_out()
    assert w.proc.returncode == code, w.stderr()
    after = {"store": store_state(store), "inbox": inbox_state(inbox)}
    assert not (inbox / rf.STATE_NAME).exists() and debris(inbox, d / "store") == []
    return before, after, Calibration(total, dict(w.marks))


def _moved(after: dict, folder: str) -> dict:
    """"after" with the file in `folder`/ but its report not yet beside it (a move cut short)."""
    return {"store": after["store"], "inbox": {**after["inbox"], folder: [INBOX_FILE]}}


@pytest.fixture(scope="module")
def refresh_ref(pristine, tmp_path_factory) -> dict:
    """A refresh whose batch passes its gates: "before", "after", and the documented
    intermediates a kill may leave (each with the state file beside), which the next run
    finishes: "pushed" (the batch committed, the file still pending) and "moved" (the file
    in done/, its report not yet)."""
    d = tmp_path_factory.mktemp("faults-refresh-ref")
    before, after, cal = _refresh_run(pristine, d, LENIENT, 0)
    assert after["store"]["head"] == 1
    assert after["store"]["log"] == [(1, "active", sha(d / "inbox" / "done" / INBOX_FILE), len(FRANCE))]
    assert after["inbox"] == {"pending": [], "done": [INBOX_FILE, INBOX_FILE + ".report.json"], "failed": []}
    mids = {"pushed": {"store": after["store"], "inbox": before["inbox"]}, "moved": _moved(after, "done")}
    return {"before": before, "after": after, "mids": mids, "cal": cal, "gates": LENIENT, "status": "done",
            "folder": "done", "code": 0}


@pytest.fixture(scope="module")
def reject_ref(pristine, refresh_ref, tmp_path_factory) -> dict:
    """A refresh whose batch fails a gate (STRICT): "after" has the batch rejected, the base
    weights back and the file in failed/. The intermediates: "pushed" (the batch committed
    and still active: the passing refresh's "after" store, the file pending), "rejected"
    (the batch rolled back, the file pending) and "moved" (the file in failed/, no report yet)."""
    d = tmp_path_factory.mktemp("faults-reject-ref")
    before, after, cal = _refresh_run(pristine, d, STRICT, 3)
    assert after["store"]["head"] == 0 and after["store"]["weights"] == before["store"]["weights"]
    assert after["store"]["log"] == [(1, "rejected", sha(d / "inbox" / "failed" / INBOX_FILE), len(FRANCE))]
    assert after["inbox"] == {"pending": [], "done": [], "failed": [INBOX_FILE, INBOX_FILE + ".report.json"]}
    assert {"commit2", "replaced2", "failed_dir"} <= set(cal.marks), cal
    pushed = refresh_ref["after"]["store"]
    assert pushed["log"] == [(1, "active", *after["store"]["log"][0][2:])]
    mids = {"pushed": {"store": pushed, "inbox": before["inbox"]},
            "rejected": {"store": after["store"], "inbox": before["inbox"]},
            "moved": _moved(after, "failed")}
    return {"before": before, "after": after, "mids": mids, "cal": cal, "gates": STRICT, "status": "rejected",
            "folder": "failed", "code": 3}


# ----------------------------------------------------------------------------- rollback kills


def _rollback_kills(three: Path, ref: dict, tmp_path: Path, n: int, must=()) -> Counter:
    rng = random.Random(SEED)
    cal: Calibration = ref["cal"]
    tally = Counter()
    for trial, kind in enumerate(_kill_plan(ROLLBACK_KILLS, n, rng, must)):
        to = rng.randrange(3)
        mark, delay = _delay(kind, cal, rng)
        store = copy_store(three, tmp_path / f"t{trial}")
        w = Watched.start(store, ["rollback", "--to", str(to), "--no-wait"])
        reached = w.wait_for(mark)
        rc, at = w.kill_after(delay) if reached else (w.proc.wait(), w.elapsed())
        left = debris(store.parent, objects_dir(store))
        where = (f"seed {SEED}, trial {trial}: rollback --to {to}, kill {kind!r} {delay:.4f} s after "
                 f"{mark or 'start'} (t={at:.3f} s, rc={rc}, marks {w.marks}, left {left}; "
                 f"calibration {cal})\n{w.stderr()}")
        assert rc in (0, -signal.SIGKILL), where             # finished, or killed: nothing else
        try:
            state = store_state(store)
        except StoreError as e:
            pytest.fail(f"the store does not open after the kill: {e}\n{where}")
        if state == ref["before"]:
            assert rc != 0, "a finished rollback left the store as before\n" + where
            outcome = "before"
        else:
            assert state == ref["after"][to], f"neither before nor after:\n{state}\n{where}"
            outcome = "after"
        tally[outcome] += 1
        tally["in_commit"] += any(Path(p).name.startswith(f".{store.name}.tmp-") for p in left)
        tally["finished"] += rc == 0
        # the same rollback again completes, gives "after", and sweeps what the kill left
        cli("rollback", "--to", to, "--store", store, "--no-wait")
        assert store_state(store) == ref["after"][to], where
        assert debris(store.parent, objects_dir(store)) == [], where
        tally["kills"] += 1
        tally[f"kind:{kind}"] += 1
    return tally


def _print_tally(what: str, tally: Counter, cal: Calibration, t0: float, extra: str = "") -> None:
    kinds = ", ".join(f"{k[5:]} {v}" for k, v in sorted(tally.items()) if k.startswith("kind:"))
    print(f"\n[faults] {what}: {tally['kills']} kills: {tally['before']} before, {tally['after']} after, "
          f"{tally['recovered']} recovered, 0 corrupt; {tally['in_commit']} left a manifest temp, "
          f"{tally['finished']} finished before the kill{extra}; kinds: {kinds}; "
          f"one run {cal.total:.2f} s (marks {', '.join(f'{k} {v:.2f}' for k, v in cal.marks.items())}); "
          f"{time.monotonic() - t0:.1f} s; seed {SEED}")


def test_rollback_killed_at_random_moments_leaves_before_or_after(three, rollback_ref, tmp_path):
    t0 = time.monotonic()
    tally = _rollback_kills(three, rollback_ref, tmp_path, 2, must=("commit",))
    _print_tally("rollback", tally, rollback_ref["cal"], t0)
    assert tally["kills"] == 2


@pytest.mark.slow
def test_rollback_killed_at_random_moments_leaves_before_or_after_many(three, rollback_ref, tmp_path):
    t0 = time.monotonic()
    tally = _rollback_kills(three, rollback_ref, tmp_path, 30)
    _print_tally("rollback", tally, rollback_ref["cal"], t0)
    assert tally["kills"] == 30 and tally["before"] > 0 and tally["after"] > 0


# ----------------------------------------------------------------------------- refresh kills


def _refresh_kills(pristine: Path, ref: dict, tmp_path: Path, n: int, kinds: tuple[str, ...],
                   must=()) -> Counter:
    """n refreshes (with ref's gates) killed at random moments of `kinds`; each time the
    state must be "before", "after" or one of ref's documented intermediates, and the next
    run must reach exactly "after": the file in ref's folder with its report, pushed once,
    a rejected batch never left active."""
    rng = random.Random(SEED + 1)
    cal: Calibration = ref["cal"]
    tally = Counter()
    for trial, kind in enumerate(_kill_plan(kinds, n, rng, must)):
        mark, delay = _delay(kind, cal, rng)
        store = copy_store(pristine, tmp_path / f"t{trial}" / "store")
        inbox = tmp_path / f"t{trial}" / "inbox"
        inbox.mkdir()
        write_jsonl(inbox / INBOX_FILE, FRANCE)
        w = Watched.start(store, ["refresh", "--inbox", str(inbox), *ref["gates"]], inbox=inbox)
        reached = w.wait_for(mark)
        rc, at = w.kill_after(delay) if reached else (w.proc.wait(), w.elapsed())
        left = debris(store.parent, objects_dir(store), inbox)
        crumb = (inbox / rf.STATE_NAME).exists()
        where = (f"seed {SEED}, trial {trial}: refresh {' '.join(ref['gates'])}, kill {kind!r} {delay:.4f} s "
                 f"after {mark or 'start'} (t={at:.3f} s, rc={rc}, marks {w.marks}, state file {crumb}, "
                 f"left {left}; calibration {cal})\n{w.stderr()}")
        assert rc in (ref["code"], -signal.SIGKILL), where
        try:
            state = {"store": store_state(store), "inbox": inbox_state(inbox)}
        except StoreError as e:
            pytest.fail(f"the store does not open after the kill: {e}\n{where}")
        if state == ref["before"]:
            assert rc != ref["code"], "a finished refresh left the store as before\n" + where
            outcome = "before"
        elif state == ref["after"]:
            outcome = "after"
        else:
            outcome = next((k for k, mid in ref["mids"].items() if state == mid), None)
            assert outcome, f"neither before, after nor a documented intermediate:\n{state}\n{where}"
            assert crumb, f"{outcome}: no {rf.STATE_NAME} to finish it\n{where}"
        tally[outcome if outcome in ("before", "after") else "recovered"] += 1
        tally[f"mid:{outcome}"] += outcome not in ("before", "after")
        tally["in_commit"] += any(Path(p).name.startswith(f".{store.name}.tmp-") for p in left)
        tally["finished"] += rc == ref["code"]
        tally["crumbs"] += crumb

        # the next run finishes the job: exactly "after", the file moved with its report, pushed once
        again_code = 0 if outcome in ("after", "moved") else ref["code"]
        res = cli("refresh", "--inbox", inbox, "--store", store, "--json", *ref["gates"], code=again_code)
        again = {"store": store_state(store), "inbox": inbox_state(inbox)}
        assert again == ref["after"], f"after the second run:\n{again}\n{res.stderr}\n{where}"
        files = [(f["file"], f["status"], f["batch"], bool(f.get("resumed")))
                 for f in json.loads(res.stdout)["files"]]
        if outcome in ("after", "moved"):
            assert files == [], where
        else:
            assert files == [(INBOX_FILE, ref["status"], 1, outcome != "before")], where
        report = json.loads((inbox / ref["folder"] / (INBOX_FILE + rf.REPORT_SUFFIX)).read_text())
        assert report["status"] == ref["status"] and report["batch"] == 1, where
        assert not (inbox / rf.STATE_NAME).exists(), where
        assert debris(store.parent, objects_dir(store)) == [], where
        tally["inbox_debris"] += bool(debris(inbox))
        tally["kills"] += 1
        tally[f"kind:{kind}"] += 1
    return tally


def _print_refresh_tally(what: str, tally: Counter, ref: dict, t0: float) -> None:
    mids = ", ".join(f"{k[4:]} {v}" for k, v in sorted(tally.items()) if k.startswith("mid:") and v)
    _print_tally(what, tally, ref["cal"], t0, f" ({mids or 'none'}), {tally['crumbs']} left a state file, "
                                             f"{tally['inbox_debris']} left inbox temp files")


def test_refresh_killed_at_random_moments_is_finished_by_the_next_run(pristine, refresh_ref, tmp_path):
    t0 = time.monotonic()
    tally = _refresh_kills(pristine, refresh_ref, tmp_path, 2, REFRESH_KILLS, must=("measuring",))
    _print_refresh_tally("refresh", tally, refresh_ref, t0)
    assert tally["kills"] == 2


@pytest.mark.slow
def test_refresh_killed_at_random_moments_is_finished_by_the_next_run_many(pristine, refresh_ref, tmp_path):
    t0 = time.monotonic()
    tally = _refresh_kills(pristine, refresh_ref, tmp_path, 25, REFRESH_KILLS)
    _print_refresh_tally("refresh", tally, refresh_ref, t0)
    assert tally["kills"] == 25 and tally["before"] > 0 and tally["recovered"] + tally["after"] > 0


def test_rejecting_refresh_killed_at_random_moments_is_finished_by_the_next_run(pristine, reject_ref, tmp_path):
    """The batch fails a gate: a kill in the push, the gates' measurement or the automatic
    rollback leaves before, the batch active or rejected with the file pending, or after; the
    next run always ends with the batch rejected and the file in failed/ with its report."""
    t0 = time.monotonic()
    tally = _refresh_kills(pristine, reject_ref, tmp_path, 3, REJECT_KILLS, must=("gating", "rejecting"))
    _print_refresh_tally("rejecting refresh", tally, reject_ref, t0)
    assert tally["kills"] == 3


@pytest.mark.slow
def test_rejecting_refresh_killed_at_random_moments_is_finished_by_the_next_run_many(pristine, reject_ref,
                                                                                     tmp_path):
    t0 = time.monotonic()
    tally = _refresh_kills(pristine, reject_ref, tmp_path, 27, REJECT_KILLS)
    _print_refresh_tally("rejecting refresh", tally, reject_ref, t0)
    assert tally["kills"] == 27 and tally["before"] > 0 and tally["mid:pushed"] + tally["mid:rejected"] > 0


class _Killed(BaseException):
    """Stands for SIGKILL inside an in-process run: no `except Exception` catches it."""


# bugs in lifelong/ops/refresh.py these moments expose (strict: the test says so once they are fixed)
@pytest.mark.parametrize("which, moment", [
    ("refresh_ref", "writing_the_state_file"),
    ("refresh_ref", "before_the_file_moves"),
    ("refresh_ref", "between_the_file_and_its_report"),
    ("reject_ref", "before_the_file_moves"),
    ("reject_ref", "between_the_file_and_its_report"),
])
def test_refresh_killed_at_a_precise_moment_is_finished_by_the_next_run(pristine, request, tmp_path,
                                                                         monkeypatch, which, moment):
    """Moments a random SIGKILL rarely hits (microseconds wide), hit on purpose in-process:
    the state file under its temp name; the report under its temp name, the file about to
    move to done/ (failed/ once its batch is rejected); the file moved, its report about to
    be renamed beside it."""
    ref = request.getfixturevalue(which)
    store = copy_store(pristine, tmp_path / "store")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_jsonl(inbox / INBOX_FILE, FRANCE)
    real_rename, real_replace = os.rename, os.replace

    def rename(src, dst, *a, **k):
        is_report = str(dst).endswith(rf.REPORT_SUFFIX)
        if (moment == "before_the_file_moves" and not is_report) or (
                moment == "between_the_file_and_its_report" and is_report):
            raise _Killed
        return real_rename(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        if moment == "writing_the_state_file" and Path(dst).name == rf.STATE_NAME:
            raise _Killed
        return real_replace(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename)
        m.setattr(os, "replace", replace)
        m.setattr(os, "getpid", lambda: 4_000_000)   # a killed process: its temp names are not ours
        with pytest.raises(_Killed):
            cli("refresh", "--inbox", inbox, "--store", store, *ref["gates"])
    if moment == "writing_the_state_file":
        assert store_state(store) == ref["before"]["store"] and not (inbox / rf.STATE_NAME).exists()
    else:
        assert store_state(store) == ref["after"]["store"] and (inbox / rf.STATE_NAME).exists()

    code = ref["code"] if moment == "before_the_file_moves" else 0   # a moved file is only finished
    res = cli("refresh", "--inbox", inbox, "--store", store, "--json", *ref["gates"], code=code)
    assert {"store": store_state(store), "inbox": inbox_state(inbox)} == ref["after"], res.stderr
    report = json.loads((inbox / ref["folder"] / (INBOX_FILE + rf.REPORT_SUFFIX)).read_text())
    assert report["status"] == ref["status"] and report["batch"] == 1
    assert not (inbox / rf.STATE_NAME).exists()
    assert debris(inbox, store.parent, objects_dir(store)) == []


# ----------------------------------------------------------------------------- read-only and full disks


def _h5py_error(name, code: int, what: str) -> OSError:
    """An OSError as h5py raises it: errno only inside the text."""
    return OSError(f"Unable to synchronously {what} (unable to open file: name = '{name}', errno = {code}, "
                   f"error message = '{os.strerror(code)}', flags = 13, o_flags = 242)")


def _inject(monkeypatch, fault: str, store: Path) -> None:
    """Make the file system fail as `fault` says, for the writes of `store` only."""
    manifest_tmp = f".{store.name}.tmp-"
    real_open, real_replace, real_file, real_fsync = os.open, os.replace, h5py.File, atomic.fsync_path

    if fault == "erofs_lock":            # the lock file cannot be created
        lock = str(store.with_name(store.name + ".lock"))

        def fake_open(path, flags, *a, **k):
            if os.fspath(path) == lock:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), lock)
            return real_open(path, flags, *a, **k)
        monkeypatch.setattr(os, "open", fake_open)
    elif fault == "erofs_create":        # no file can be created for writing (h5py's own error)
        def fake_file(name, mode="r", *a, **k):
            if mode != "r":
                raise _h5py_error(name, errno.EROFS, "create file")
            return real_file(name, mode, *a, **k)
        monkeypatch.setattr(h5py, "File", fake_file)
    elif fault == "erofs_rename":        # files are written, the renames fail
        def fake_replace(src, dst, *a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(dst))
        monkeypatch.setattr(os, "replace", fake_replace)
    elif fault == "enospc_write":        # the manifest's temp file is created, then the disk is full
        def fake_file(name, mode="r", *a, **k):
            if mode != "r" and Path(name).name.startswith(manifest_tmp):
                real_file(name, mode, *a, **k).close()
                raise _h5py_error(name, errno.ENOSPC, "write data")
            return real_file(name, mode, *a, **k)
        monkeypatch.setattr(h5py, "File", fake_file)
    elif fault == "enospc_fsync":        # the manifest's temp file is written; fsync reports ENOSPC
        def fake_fsync(p):
            if Path(p).name.startswith(manifest_tmp):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(p)
        monkeypatch.setattr(atomic, "fsync_path", fake_fsync)
    else:
        raise ValueError(fault)


FAULTS = ("erofs_lock", "erofs_create", "erofs_rename", "enospc_write", "enospc_fsync")
FAULT_TEXT = {"erofs": "read-only file system while", "enospc": "disk full while"}


@pytest.mark.parametrize("op", ["push", "rollback"])
@pytest.mark.parametrize("fault", FAULTS)
def test_read_only_or_full_disk_gives_a_clear_store_error_and_changes_nothing(three, tmp_path, monkeypatch,
                                                                             fault, op):
    store = copy_store(three, tmp_path / "store")
    facts = write_jsonl(tmp_path / "b4.jsonl", FRANCE)
    lock = store.name + ".lock"
    before = tree(store.parent, skip={lock})
    expect = FAULT_TEXT[fault.split("_")[0]]

    def attempt():
        return api.push(store, facts) if op == "push" else api.rollback(store, 1)

    with monkeypatch.context() as m:
        _inject(m, fault, store)
        with pytest.raises(StoreError) as exc:
            attempt()
        res = cli(op, *([facts] if op == "push" else ["--to", "1"]), "--store", store, code=1)
    msg = str(exc.value)
    assert expect in msg and "the store is unchanged" in msg and str(store) in msg, msg
    assert exc.value.hint, msg
    err = res.stderr[res.stderr.find("error: "):]                  # push logs its progress first
    assert "error: " in res.stderr and expect in err and "the store is unchanged" in err and "hint:" in err, \
        res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert tree(store.parent, skip={lock}) == before         # byte-identical, no temp file left
    # the disk is fine again: the same command works
    if op == "push":
        assert api.push(store, facts).batch_id == 4
    else:
        assert api.rollback(store, 1)["head"] == 1


# ----------------------------------------------------------------------------- damaged and foreign stores


def _damage(store: Path, how: str) -> str:
    """Damage the store at `store`; returns the text the error must contain."""
    if how == "truncated":
        data = store.read_bytes()
        store.write_bytes(data[: len(data) // 2])
        return f"{store} is damaged or truncated"
    if how == "foreign":
        store.unlink()
        with h5py.File(store, "w") as f:
            f.create_dataset("weights", data=list(range(10)))
            f.attrs["format"] = "someone-else"
        return f"{store} is an HDF5 file but not a lifelong store"
    raise ValueError(how)


COMMANDS = {
    "log": ["log"], "status": ["status"], "show": ["show", "1"], "push": ["push", "FACTS"],
    "rollback": ["rollback", "--to", "1"], "refresh": ["refresh", "--inbox", "INBOX"],
}


@pytest.mark.parametrize("how", ["truncated", "foreign"])
def test_every_command_on_a_damaged_or_foreign_store_exits_1_and_changes_nothing(three, tmp_path, how):
    store = copy_store(three, tmp_path / "store")
    expect = _damage(store, how)
    facts = write_jsonl(tmp_path / "facts.jsonl", FRANCE)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_jsonl(inbox / INBOX_FILE, FRANCE)
    before, inbox_before = tree(store.parent), tree(inbox)
    for name, args in COMMANDS.items():
        args = [{"FACTS": facts, "INBOX": inbox}.get(a, a) for a in args]
        for as_json in ([], ["--json"]):
            res = cli(*args, "--store", store, *as_json, code=1)
            assert res.stderr.startswith("error: ") and expect in res.stderr and "hint:" in res.stderr, (
                name, res.stderr)
            assert "Traceback" not in res.stderr and res.stdout == "", (name, res.stdout)
            assert tree(store.parent) == before, name          # not even a lock file
            assert tree(inbox) == inbox_before, name


def test_a_damaged_batch_file_stops_push_and_rollback_and_changes_nothing(three, tmp_path):
    store = copy_store(three, tmp_path / "store")
    obj = objects_dir(store) / "batch_000002.h5"
    obj.write_bytes(obj.read_bytes()[: obj.stat().st_size // 2])
    facts = write_jsonl(tmp_path / "facts.jsonl", FRANCE)
    lock = store.name + ".lock"
    before = tree(store.parent, skip={lock})
    for args in (["push", facts], ["rollback", "--to", "2"]):
        res = cli(*args, "--store", store, code=1)
        assert f"object file {obj} is damaged" in res.stderr and "hint:" in res.stderr, res.stderr
        assert tree(store.parent, skip={lock}) == before
    assert [r["status"] for r in json.loads(cli("log", "--json", "--store", store).stdout)] == ["active"] * 3
