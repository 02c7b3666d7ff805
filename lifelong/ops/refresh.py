"""`lifelong refresh`: the scheduled job that pushes an inbox of fact files through the gates.

One run, under the inbox lock ``DIR/.lifelong-refresh.lock``:

1. finish a file a killed earlier run left half done (see *Crash safety*);
2. take the pending ``*.jsonl`` files directly in DIR, in name order (regular files with
   printable names only; symlinks, dotfiles, folders and odd names are skipped, untouched);
3. per file: validate it (`load_facts`); push it (`ops.push`); measure the model before
   the push (at the batch's parent, bit-identical to the head before it) and after it —
   strict efficacy of the batch, neighbors unchanged vs the base model, retention of the
   earlier live facts, perplexity drift on the store's held-out text vs the base model;
   check the policy gates (`policy.Gates`, overridable per run); on a failed gate roll the
   store back to the parent with the batch marked ``rejected`` (fingerprints verified);
4. move the file to ``DIR/done/`` or ``DIR/failed/`` (a numeric suffix, never an
   overwrite) with ``NAME.report.json`` beside it.

Files leave DIR before the lock is released, so two runs started together push each
file exactly once. Exit codes (DESIGN §2): 3 if a gate rejected a batch, else 2 if a file
was invalid, else 1 if a push failed otherwise (or the run stopped), else 0.

Crash safety: before a push, ``DIR/.lifelong-refresh.state.json`` names the file, its
sha256 and the first batch id it could get; it is removed once the file is moved. A run
that finds it looks the batch up in the store: not there -> the push never committed and
the file is simply pending; there and still the head -> the gates are checked now, as
if the run had not been interrupted; already rejected -> the file goes to ``failed/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import filelock
from pydantic import ValidationError

from lifelong import __version__
from lifelong.store import history
from lifelong.ops import quiet
from lifelong.errors import BadInput, FactFileError, LifelongError, StoreLocked
from lifelong.eval.budget import edit_budget
from lifelong.facts import load_facts
from lifelong.policy import Gates, policy_from_json
from lifelong.store.atomic import fsync_dir
from lifelong.store.store import Store

LOCK_NAME = ".lifelong-refresh.lock"
STATE_NAME = ".lifelong-refresh.state.json"
DONE, FAILED = "done", "failed"
# per-file statuses written in the reports
OK, REJECTED, INVALID, ERROR = "done", "rejected", "invalid", "error"
SUFFIX = ".jsonl"
REPORT_SUFFIX = ".report.json"


class InboxLocked(LifelongError):
    """Another refresh holds the inbox lock (`--no-wait`)."""


class RefreshError(LifelongError):
    """The refresh could not go on (inbox unusable, store changed under it, ...)."""


# ----------------------------------------------------------------------------- gates


def parse_gates(items) -> dict[str, float]:
    """`["min_efficacy=0.8", ...]` (the CLI's --gate values) -> {"min_efficacy": 0.8}.

    BadInput (exit 2) for a missing '=', an unknown name, a non-number or a value outside
    [0, 1]; the message lists the valid names.
    """
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep:
            raise BadInput(f"--gate {item!r}: expected NAME=VALUE", hint=_gate_hint())
        out[name.strip()] = value.strip()
    return check_gates(out)


def check_gates(overrides: dict | None) -> dict[str, float]:
    """Validate gate overrides (names as in policy.Gates, numbers in [0, 1]); BadInput otherwise."""
    if not overrides:
        return {}
    names = list(Gates.model_fields)
    out: dict[str, float] = {}
    for name, value in overrides.items():
        if name not in names:
            raise BadInput(f"unknown gate {name!r}", hint=_gate_hint())
        try:
            if isinstance(value, bool):
                raise ValueError
            out[name] = float(value)
        except (TypeError, ValueError):
            raise BadInput(f"gate {name}: {value!r} is not a number", hint=_gate_hint()) from None
    try:
        Gates(**out)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise BadInput(f"bad gate value: {bad}", hint=_gate_hint()) from None
    return out


def _gate_hint() -> str:
    return "use --gate NAME=VALUE with a fraction 0-1; valid names: " + ", ".join(Gates.model_fields)


def verdicts(gates: Gates, metrics: dict) -> dict[str, dict]:
    """Each gate with its threshold, measured value and verdict ("pass", "fail", or "n/a"
    when nothing was measured, e.g. a batch without neighbors, which passes).

    metrics: {"before": {...}, "after": {...}} as measured by a refresh.
    """
    after = metrics["after"]
    nu = after.get("neighbors_unchanged")
    values = {
        "min_efficacy": after.get("efficacy"),
        "max_neighbor_drop": None if nu is None else 1.0 - nu,
        "max_retention_drop": after.get("retention_drop"),
        "max_perplexity_drift": after.get("perplexity_drift"),
    }
    out = {}
    for name in Gates.model_fields:
        threshold, value = getattr(gates, name), values[name]
        if value is None:
            verdict = "n/a"
        elif name.startswith("min_"):
            verdict = "pass" if value >= threshold else "fail"
        else:
            verdict = "pass" if value <= threshold else "fail"
        out[name] = {"threshold": threshold, "value": value, "verdict": verdict}
    return out


def exit_code(statuses, stopped: bool = False) -> int:
    """DESIGN §2 for a whole run: 3 any rejected, else 2 any invalid, else 1 any error
    (or the run stopped early), else 0."""
    statuses = set(statuses)
    if REJECTED in statuses:
        return 3
    if INVALID in statuses:
        return 2
    if ERROR in statuses or stopped:
        return 1
    return 0


# ----------------------------------------------------------------------------- report


@dataclass
class RefreshReport:
    """What one run did: a report per file taken, the skipped entries, what is left."""

    inbox: str
    store: str
    started: str
    gates: dict                      # effective thresholds, name -> value
    overrides: dict                  # the --gate values of this run
    files: list[dict] = field(default_factory=list)     # the NAME.report.json contents
    skipped: list[dict] = field(default_factory=list)   # {"name", "reason"}
    pending: list[str] = field(default_factory=list)    # left in the inbox when the run stopped
    stopped: str | None = None                          # why the run stopped early
    head_before: int | None = None
    head_after: int | None = None
    finished: str | None = None
    seconds: float | None = None

    @property
    def exit_code(self) -> int:
        return exit_code([f["status"] for f in self.files], stopped=self.stopped is not None)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (OK, REJECTED, INVALID, ERROR)}
        for f in self.files:
            out[f["status"]] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        s = (f"refresh {self.inbox}: {len(self.files)} file(s): {c[OK]} done, {c[REJECTED]} rejected, "
             f"{c[INVALID]} invalid, {c[ERROR]} error; {len(self.skipped)} skipped; "
             f"head {self.head_before} -> {self.head_after}")
        if self.stopped:
            s += f"; stopped: {self.stopped} ({len(self.pending)} left pending)"
        return s + f"; exit {self.exit_code}"

    def to_dict(self) -> dict:
        return {
            "inbox": self.inbox, "store": self.store, "started": self.started, "finished": self.finished,
            "seconds": self.seconds, "gates": self.gates, "overrides": self.overrides,
            "head_before": self.head_before, "head_after": self.head_after, "counts": self.counts(),
            "exit_code": self.exit_code, "stopped": self.stopped, "pending": self.pending,
            "skipped": self.skipped, "files": self.files,
        }


class _Stop(Exception):
    """Stop the run: leave the remaining files pending."""


# ----------------------------------------------------------------------------- the run


def refresh(store_path, inbox, gates: dict | None = None, wait: bool = True, log=quiet) -> RefreshReport:
    """Push every pending fact file of `inbox` through the policy gates (module docstring).

    gates: overrides of the store policy's gates for this run ({"min_efficacy": 0.8}).
    wait=False: InboxLocked at once if another refresh holds the inbox lock, and a store
    held by another writer stops the run with the files left pending.
    Returns a RefreshReport; its `exit_code` is the command's.
    """
    overrides = check_gates(gates)                              # bad usage: nothing touched
    inbox = Path(os.path.abspath(inbox))                        # batch sources name the file unambiguously
    if not inbox.is_dir():
        raise BadInput(f"inbox {inbox} is not a folder", hint="give --inbox an existing folder")
    for sub in (DONE, FAILED):  # files and reports must stay inside the inbox
        dest = inbox / sub
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise BadInput(f"{dest} is a symbolic link or not a folder; refresh moves files only into "
                           f"real folders inside the inbox", hint=f"replace {dest} with a folder")
    Store.open(store_path)                                      # a missing store: exit 1, inbox untouched
    t0 = time.perf_counter()
    lock_path = inbox / LOCK_NAME
    lock = filelock.FileLock(str(lock_path))
    try:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if not wait:
                raise InboxLocked(f"another refresh holds {lock_path}",
                                  hint="it will take the pending files; run again later, or without --no-wait "
                                       "to wait for it") from None
            log(f"waiting for another refresh ({lock_path} is held)")
            lock.acquire()
    except OSError as e:
        raise RefreshError(f"cannot take the inbox lock {lock_path}: {e.strerror or e}") from e
    try:
        store = Store.open(store_path)                          # re-read under the lock
        policy = policy_from_json(store.policy_json)
        effective = policy.gates.model_copy(update=overrides)
        report = RefreshReport(inbox=str(inbox), store=str(store_path), started=history.utc_now(),
                               gates=effective.model_dump(), overrides=overrides,
                               head_before=history.head(store.records))
        run = _Run(Path(store_path), inbox, effective, overrides, wait, log, report)
        log(f"refresh {inbox}: store {store_path}, head {report.head_before}; gates "
            + ", ".join(f"{k}={v:g}" for k, v in report.gates.items()))
        names: list[str] = []
        try:
            run.resume(store)
            run.clean_debris()
            names = run.scan()
            for name in names:
                run.process(name)
        except _Stop as e:
            report.stopped = str(e)
            report.pending = [n for n in names if os.path.lexists(inbox / n)] or run.scan(quiet=True)
            log(f"stopping: {e}")
        finally:
            run.close()
        report.head_after = history.head(Store.open(store_path).records)
        report.finished = history.utc_now()
        report.seconds = round(time.perf_counter() - t0, 3)
        log(report.summary())
        return report
    finally:
        lock.release()


class _Run:
    """The state of one run under the inbox lock."""

    def __init__(self, store_path: Path, inbox: Path, gates: Gates, overrides: dict, wait: bool, log,
                 report: RefreshReport):
        self.store_path, self.inbox, self.gates, self.overrides = store_path, inbox, gates, overrides
        self.wait, self.log, self.report = wait, log, report
        self.meter = None   # an eval.meter.Meter, once a file needs measuring
        self.halt: str | None = None       # set when the store needs a human: stop after this file

    def close(self) -> None:
        self.meter = None

    # ---- finding the files

    def scan(self, quiet: bool = False) -> list[str]:
        """Names of the pending files, in name order; logs and records every skipped entry
        (quiet: neither)."""
        try:
            entries = sorted(os.scandir(self.inbox), key=lambda e: e.name)
        except OSError as e:
            raise RefreshError(f"cannot list the inbox {self.inbox}: {e.strerror or e}") from e
        names = []
        for entry in entries:
            if entry.name in (DONE, FAILED, LOCK_NAME, STATE_NAME):
                continue
            reason = _skip_reason(entry)
            if reason and quiet:
                continue
            if reason:
                self.report.skipped.append({"name": entry.name, "reason": reason})
                self.log(f"skipped {entry.name!r}: {reason}")
            else:
                names.append(entry.name)
        if not quiet:
            self.log(f"{len(names)} pending file(s)" + (f": {', '.join(names)}" if names else ""))
        return names

    # ---- one file

    def process(self, name: str, resume: history.BatchRecord | None = None) -> None:
        """Validate, push, gate and move one file (resume: its batch is already pushed)."""
        path = self.inbox / name
        t_all = time.perf_counter()
        rep = {"file": name, "status": None, "sha256": None, "batch": None, "store": str(self.store_path),
               "started": history.utc_now(), "lifelong_version": __version__, "gates": {}, "metrics": {},
               "timings": {}, "warnings": []}
        timings = rep["timings"]
        try:
            st = os.lstat(path)
        except OSError as e:
            self.log(f"{name}: gone before it could be read ({e.strerror}); skipped")
            self.report.skipped.append({"name": name, "reason": f"vanished: {e.strerror}"})
            return
        if not stat.S_ISREG(st.st_mode):
            self.report.skipped.append({"name": name, "reason": "no longer a regular file"})
            return

        t = time.perf_counter()
        try:
            ff = load_facts(path)
        except FactFileError as e:
            rep.update(status=INVALID, sha256=_sha256(path), problems=e.problems)
            timings["validate"] = round(time.perf_counter() - t, 3)
            self.log(f"{name}: invalid, {len(e.problems)} problem(s)")
            for problem in e.problems[:5]:
                self.log(f"  {problem}")
            return self.finish(rep, t_all)
        timings["validate"] = round(time.perf_counter() - t, 3)
        rep.update(sha256=ff.sha256, n_facts=len(ff.facts))

        if resume is None:
            rec = self.push(path, rep, timings)
            if rec is None:
                return self.finish(rep, t_all)
        else:
            rec = resume
            rep["resumed"] = True
            rep["warnings"].append(f"batch {rec.id} was pushed by an interrupted refresh; checked now")
        rep["batch"] = rec.id
        if rec.sha256 != ff.sha256:
            rep["warnings"].append(f"the file changed while it was pushed: batch {rec.id} holds sha256 "
                                   f"{rec.sha256}, the file now has {ff.sha256}")
            rep["sha256_pushed"] = rec.sha256

        t = time.perf_counter()
        try:
            if self.meter is None:
                from lifelong.eval.meter import Meter  # torch: only once a file is measured

                self.meter = Meter(self.log)
            rep["metrics"], rep["head_before"] = gate_metrics(self.meter, self.store_path, rec)
            rep["gates"] = verdicts(self.gates, rep["metrics"])
            after = rep["metrics"]["after"]
            now = (after["live_facts"], after["perplexity_drift"]) if after["perplexity_drift"] is not None else None
            rep["budget"] = edit_budget(Store.open(self.store_path).records, self.gates.max_perplexity_drift,
                                        now=now, measured_by=f"refresh gates after batch {rec.id}" if now else None)
        except Exception as e:  # noqa: BLE001 - an unchecked batch must not stay live
            timings["measure"] = round(time.perf_counter() - t, 3)
            rep.update(status=ERROR, error=f"could not check the gates: {_describe(e)}")
            if not isinstance(e, LifelongError):
                rep["traceback"] = traceback.format_exc(limit=8)
            self.log(f"{name}: batch {rec.id} could not be checked: {_describe(e)}; rolling it back")
            self.reject(rec.id, rep, f"refresh could not check the gates: {_describe(e)}")
            return self.finish(rep, t_all)
        timings["measure"] = round(time.perf_counter() - t, 3)

        failed = [k for k, v in rep["gates"].items() if v["verdict"] == "fail"]
        self.log(f"{name}: batch {rec.id}: " + ", ".join(
            f"{k} {_fmt(v['value'])} ({v['verdict']})" for k, v in rep["gates"].items()))
        if not failed:
            rep["status"] = OK
            return self.finish(rep, t_all)
        why = "; ".join(f"{k}: {_fmt(rep['gates'][k]['value'])} vs {rep['gates'][k]['threshold']:g}"
                        for k in failed)
        t = time.perf_counter()
        if self.reject(rec.id, rep, f"rejected by refresh gate(s): {why}"):
            rep["status"] = REJECTED
            rep["rejected_by"] = failed
        timings["rollback"] = round(time.perf_counter() - t, 3)
        self.finish(rep, t_all)

    def push(self, path: Path, rep: dict, timings: dict) -> history.BatchRecord | None:
        """push the file (state file first); the new record, or None with rep's status set."""
        t = time.perf_counter()
        from lifelong.ops.push import push  # torch and transformers: only once a file needs a push

        store = Store.open(self.store_path)
        try:
            self.write_state({"file": path.name, "source": str(path), "sha256": rep["sha256"],
                              "first_id": history.next_id(store.records), "started": history.utc_now(),
                              "pid": os.getpid()})
        except OSError as e:
            raise _Stop(f"cannot write {self.inbox / STATE_NAME}: {e.strerror or e}") from e
        try:
            pr = push(self.store_path, path, log=self.log, wait=self.wait)
        except StoreLocked as e:
            self.clear_state()
            raise _Stop(f"the store is locked by another writer ({e.message})") from None
        except FactFileError as e:
            self.clear_state()
            rep.update(status=INVALID, problems=e.problems)
        except BadInput as e:
            self.clear_state()
            rep.update(status=INVALID, problems=[f"{path}: {e}"])
        except Exception as e:  # noqa: BLE001 - push is atomic: the store is unchanged
            self.clear_state()
            rep.update(status=ERROR, error=f"push failed: {_describe(e)}")
            if not isinstance(e, LifelongError):
                rep["traceback"] = traceback.format_exc(limit=8)
        timings["push"] = round(time.perf_counter() - t, 3)
        if rep["status"] is not None:
            self.log(f"{path.name}: {rep['status']}: {rep.get('error') or '; '.join(rep.get('problems', []))[:500]}")
            return None
        rep["warnings"].extend(pr.warnings)
        rep["push_timings"] = pr.timings
        return Store.open(self.store_path).record(pr.batch_id)

    def reject(self, batch_id: int, rep: dict, note: str) -> bool:
        """Roll batch_id back (status rejected); False (rep: status error) if that failed."""
        try:
            rep["head_after"] = reject(self.store_path, batch_id, note)
            self.log(f"{rep['file']}: batch {batch_id} rejected; head is {rep['head_after']} again")
            return True
        except Exception as e:  # noqa: BLE001
            rep.update(status=ERROR, error=(rep.get("error", "") + "; " if rep.get("error") else "")
                       + f"rolling batch {batch_id} back failed: {_describe(e)}")
            self.log(f"{rep['file']}: ROLLING BACK BATCH {batch_id} FAILED: {_describe(e)}; "
                     f"check the store by hand (lifelong log / rollback)")
            self.halt = f"batch {batch_id} could not be rolled back"
            return False

    def finish(self, rep: dict, t_all: float) -> None:
        """Write NAME.report.json and move the file to done/ or failed/; clear the state file."""
        name = rep["file"]
        folder = self.inbox / (DONE if rep["status"] == OK else FAILED)
        if "head_after" not in rep and rep.get("batch") is not None and rep["status"] == OK:
            rep["head_after"] = rep["batch"]
        rep["finished"] = history.utc_now()
        rep["timings"]["total"] = round(time.perf_counter() - t_all, 3)
        try:
            folder.mkdir(exist_ok=True)
            dest = _free_name(folder, name)
            rep["moved_to"] = str(Path(folder.name) / dest)
            report_path = folder / (dest + REPORT_SUFFIX)
            tmp = folder / f".{dest}{REPORT_SUFFIX}.tmp-{os.getpid()}"
            # the next run finishes a move a kill interrupts: it needs to know where to
            self.write_state({**self.read_state(), "file": name, "dest_folder": folder.name, "dest": dest,
                              "report_tmp": tmp.name})
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(rep, fh, indent=2, ensure_ascii=False, default=str)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(self.inbox / name, folder / dest)
            os.rename(tmp, report_path)
            fsync_dir(folder)
            fsync_dir(self.inbox)
        except OSError as e:
            self.report.files.append(rep)
            raise _Stop(f"cannot move {name} to {folder}: {e.strerror or e}") from e
        self.clear_state()
        self.report.files.append(rep)
        self.log(f"{name}: {rep['status']} -> {rep['moved_to']}")
        if self.halt:
            raise _Stop(self.halt)

    # ---- crash recovery

    def write_state(self, state: dict) -> None:
        p = self.inbox / STATE_NAME
        tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)

    def read_state(self) -> dict:
        try:
            state = json.loads((self.inbox / STATE_NAME).read_text(encoding="utf-8"))
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def clean_debris(self) -> None:
        """Temp files of killed runs (this run holds the inbox lock, so none is live)."""
        patterns = [(self.inbox, STATE_NAME + ".tmp-*")] + [
            (self.inbox / d, f".*{REPORT_SUFFIX}.tmp-*") for d in (DONE, FAILED)]
        for folder, pattern in patterns:
            for p in folder.glob(pattern) if folder.is_dir() else []:
                try:
                    p.unlink()
                    self.log(f"removed {p.name}, left by an interrupted refresh")
                except OSError:
                    pass

    def finish_interrupted_move(self, state: dict) -> bool:
        """Complete a move to done/ or failed/ that a kill cut; True if it was one."""
        if "dest" not in state:
            return False
        name, folder = state["file"], self.inbox / state["dest_folder"]
        moved, report = folder / state["dest"], folder / (state["dest"] + REPORT_SUFFIX)
        tmp = folder / state["report_tmp"]
        if (self.inbox / name).exists() or not moved.exists():
            return False  # the file never moved: the normal recovery applies
        if not report.exists():
            if tmp.exists():
                os.rename(tmp, report)
            else:
                report.write_text(json.dumps({"file": name, "status": OK if folder.name == DONE else ERROR,
                                              "recovered": True, "batch": state.get("batch")}, indent=2) + "\n")
            fsync_dir(folder)
        self.log(f"finished moving {name} to {folder.name}/ after an interrupted refresh")
        self.clear_state()
        return True

    def clear_state(self) -> None:
        try:
            os.unlink(self.inbox / STATE_NAME)
        except FileNotFoundError:
            pass

    def resume(self, store: Store) -> None:
        """Finish the file a killed run was pushing, if any (module docstring)."""
        p = self.inbox / STATE_NAME
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
            if self.finish_interrupted_move(state):
                return
            if "source" not in state:  # a file that was never pushed: it is simply still pending
                self.clear_state()
                return
            name, source, sha, first = state["file"], state["source"], state["sha256"], int(state["first_id"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"ignoring an unreadable {p}: {e}")
            self.clear_state()
            return
        rec = next((r for r in store.records if r.id >= first and r.source == source and r.sha256 == sha), None)
        path = self.inbox / name
        if rec is None:
            self.log(f"an interrupted refresh did not commit {name}; it is still pending")
            self.clear_state()
            return
        if not (path.is_file() and not path.is_symlink()):
            self.log(f"an interrupted refresh had already moved {name} (batch {rec.id})")
            self.clear_state()
            return
        self.log(f"resuming {name}: batch {rec.id} was pushed by an interrupted refresh ({rec.status})")
        if rec.status == history.ACTIVE and history.head(store.records) == rec.id:
            self.process(name, resume=rec)
            return
        t_all = time.perf_counter()
        rep = {"file": name, "status": REJECTED if rec.status == history.REJECTED else ERROR,
               "sha256": sha, "batch": rec.id, "store": str(self.store_path), "started": history.utc_now(),
               "lifelong_version": __version__, "gates": {}, "metrics": {}, "timings": {}, "resumed": True,
               "warnings": [f"recovered after an interrupted refresh; batch {rec.id} is {rec.status}"
                            + (f" ({rec.note})" if rec.note else "")]}
        if rep["status"] == ERROR:
            rep["error"] = (f"batch {rec.id} was pushed by an interrupted refresh but is now {rec.status}"
                            f"{'' if rec.status != history.ACTIVE else ' and no longer the head'}; "
                            f"its gates were never checked: check it by hand")
        self.finish(rep, t_all)


def reject(store_path, batch_id: int, note: str = "") -> int:
    """Roll the store back to the batch before `batch_id`, marking it "rejected".

    Refuses (RefreshError) unless `batch_id` is the head: a later batch is someone else's
    work. The weights at the new head are checked against the recorded fingerprints
    inside the writer transaction (`ops.rollback.commit_verified`). Returns the new head.
    """
    from lifelong.ops.rollback import commit_verified  # torch: only when a batch is rejected

    store = Store.open(store_path)
    with store.writer(wait=True) as tx:
        recs = tx.records
        head = history.head(recs)
        if head != batch_id:
            raise RefreshError(f"batch {batch_id} is not the head of {store_path} (head is {head}): "
                               f"another writer changed the store during the refresh",
                               hint=f"inspect `lifelong log`; roll back by hand if batch {batch_id} must go")
        parent = max((r.id for r in history.active(recs) if r.id < batch_id), default=0)
        new = history.rolled_back(recs, parent, status=history.REJECTED)
        if note:
            new = [replace(r, note=note) if r.id == batch_id else r for r in new]
        commit_verified(store, tx, new, f"rejecting batch {batch_id}")
    return parent


# ----------------------------------------------------------------------------- measuring


def gate_metrics(meter, store_path, rec: history.BatchRecord) -> tuple[dict, int]:
    """What the gates judge: {"before": ..., "after": ...} around batch `rec` (which must be the
    head), measured by `meter` (an eval.meter.Meter), and the batch's parent."""
    store = Store.open(store_path)
    records = store.records
    head = history.head(records)
    if head != rec.id:
        raise RefreshError(f"batch {rec.id} is no longer the head (head is {head}): "
                           f"another writer changed the store during the refresh")
    parent = max((r.id for r in history.active(records) if r.id < rec.id), default=0)
    before_recs = history.rolled_back(records, parent)   # a copy: the store is not touched
    live_before = history.live_facts(before_recs)
    live_after = history.live_facts(records)
    kept = [ref for ref in live_after if ref[0] != rec.id]  # earlier facts still live
    hb, ppl_b = meter.facts_at(store, before_recs, live_before)
    ha, ppl_a = meter.facts_at(store, records, live_after)
    n = len(kept)
    kept_before = sum(hb[r] for r in kept)
    kept_after = sum(ha[r] for r in kept)

    def frac(hits, refs):
        return sum(hits[r] for r in refs) / len(refs) if refs else None

    def drift(p):
        return p / meter.ppl_base - 1 if p is not None and meter.ppl_base else None

    m = rec.metrics
    before = {"head": parent, "live_facts": len(live_before), "retention": frac(hb, live_before),
              "retention_kept": kept_before / n if n else None,
              "perplexity": ppl_b, "perplexity_base": meter.ppl_base, "perplexity_drift": drift(ppl_b)}
    after = {"head": rec.id, "n_facts": len(rec.facts), "live_facts": len(live_after), "efficacy": m.get("efficacy"),
             "paraphrase": m.get("paraphrase"), "neighbors_unchanged": m.get("neighbors_unchanged"),
             "neighbors_true": m.get("neighbors_true"),
             "earlier_facts": n, "superseded": len(live_before) - n,
             "retention": kept_after / n if n else None,
             "retention_drop": (kept_before - kept_after) / n if n else None,
             "retention_all": frac(ha, live_after),
             "perplexity": ppl_a, "perplexity_base": meter.ppl_base, "perplexity_drift": drift(ppl_a)}
    return {"before": before, "after": after}, parent


# ----------------------------------------------------------------------------- helpers


def _skip_reason(entry: os.DirEntry) -> str | None:
    """Why an inbox entry is not a pending fact file (None: it is one)."""
    name = entry.name
    if not name.isprintable() or "/" in name or "\\" in name:
        return "the name has non-printable characters or a path separator"
    if name.startswith("."):
        return "a dotfile (write files under a dot name, then rename them into place)"
    if not name.endswith(SUFFIX):
        return f"not a *{SUFFIX} file"
    try:
        if entry.is_symlink():
            return "a symbolic link"
        if not entry.is_file(follow_symlinks=False):
            return "not a regular file"
    except OSError as e:
        return f"cannot stat it: {e.strerror}"
    return None


def _free_name(folder: Path, name: str) -> str:
    """`name`, or NAME-STEM.1.jsonl, .2, ... : the first that neither it nor its report exists under."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    cand, i = name, 0
    while os.path.lexists(folder / cand) or os.path.lexists(folder / (cand + REPORT_SUFFIX)):
        i += 1
        cand = f"{stem}.{i}{SUFFIX}"
    return cand


def _sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _describe(e: BaseException) -> str:
    msg = e.message if isinstance(e, LifelongError) else str(e)
    return msg if isinstance(e, LifelongError) else f"{type(e).__name__}: {msg}"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"
