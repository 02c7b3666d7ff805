"""The store on disk: one manifest plus immutable object files, one writer at a time.

Layout of a store at PATH (e.g. ``stores/default.h5``)::

    PATH            the manifest, a small HDF5 file
                      root attrs: format="lifelong-store", format_version, lifelong_version, created
                      scalar JSON string datasets: model, policy, base_fingerprint, info
                      records: 1-D variable-length UTF-8 strings, one BatchRecord.to_json() per batch,
                               its facts cut to history.INDEX_FACT_KEYS (full ones: Store.batch_facts)
    PATH.d/         immutable HDF5 object files
                      base.h5            arrays written at create (projectors, second moments, ...)
                      batch_000001.h5    arrays of batch 1 (keys, residuals, delta factors, ...)
                                       and its full fact dicts (`layout` names every array)
    PATH.lock       the writer lock (filelock)

Commit protocol (safe against a kill at any instant): every file is written under a
temporary name in its final folder, fsynced, then ``os.replace``d onto its final name;
the manifest is replaced last and its folder fsynced. So PATH is always either the old
or the new manifest, and an object file no manifest references is simply ignored (the
next writer that needs its name overwrites it). Readers take no lock: they read the
manifest into memory and close it, so they never see a half-written batch.

Scale: the bulky fact fields (paraphrases, neighbors) live in the object files, and the
records are parsed on first use, so with 10^4 batches `Store.open` reads a few tens of
MB and takes well under a second; a commit that only appends a batch reuses the stored
JSON and rewrites the manifest in a fraction of a second (one that changes statuses,
e.g. a rollback, re-serializes every record: about a second at 10^5 facts).

Typical use::

    store = Store.open("stores/default.h5")
    with store.writer() as tx:                      # one writer at a time
        rec.id = tx.next_id()                        # == history.next_id(tx.records)
        tx.add_batch(rec, {"layer4/U": u, "layer4/V": v})
    # committed here; store.records is refreshed
"""
from __future__ import annotations

import errno
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import filelock
import h5py
import numpy as np

from lifelong import __version__
from lifelong.errors import StoreError, StoreExists, StoreLocked
from lifelong.store import atomic, layout, migrations, objects
from lifelong.store.history import STATUSES, BatchRecord, index_facts, next_id, utc_now

# --------------------------------------------------------------------------- snapshot


@dataclass
class _Snapshot:
    """The manifest as read into memory (never a live file handle).

    The records are kept as their stored JSON (`raw`) and parsed on first use, so
    opening a store costs a read, not a parse, whatever the length of its history.
    """

    path: Path
    format_version: int                 # version on disk
    created: str
    lifelong_version: str
    model: dict
    policy_json: str
    base_fingerprint: dict
    info: dict
    raw: list[str] = field(repr=False)  # one BatchRecord JSON per batch, as stored
    migrated_from: int | None = None    # set when migrations ran in memory
    parsed: list[BatchRecord] | None = field(default=None, repr=False)

    @property
    def records(self) -> list[BatchRecord]:
        if self.parsed is None:
            self.parsed = [self._parse(i) for i in range(len(self.raw))]
        return self.parsed

    def last_id(self) -> int:
        """The id of the last record (the highest: ids only grow), 0 if none; parses one record."""
        if not self.raw:
            return 0
        return self.parsed[-1].id if self.parsed is not None else self._parse(len(self.raw) - 1).id

    def _parse(self, i: int) -> BatchRecord:
        try:
            return BatchRecord.from_json(self.raw[i])
        except ValueError as e:
            raise StoreError(f"{self.path}: batch record {i + 1} cannot be read: {e}",
                             hint="restore the store from a backup") from e


def _decode(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _read_manifest(path: Path, *, migrate_all: bool = False, as_stored: bool = False) -> _Snapshot:
    """Read and check the manifest at `path`. StoreError with a next step for every failure.

    An older format is migrated in memory (read-compatible migrations only, unless
    migrate_all); as_stored: not at all, the snapshot holds what is on disk.
    """
    if not path.exists():
        raise StoreError(f"no store at {path}",
                         hint="create one with `lifelong init`, or pass --store / set $LIFELONG_STORE")
    if not path.is_file():
        raise StoreError(f"{path} is not a file", hint="--store must name the store's .h5 manifest")
    try:
        f = h5py.File(path, "r", locking=False)
    except Exception as e:  # h5py raises OSError, sometimes others, for unreadable files
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
        except OSError as e2:
            raise _os_error(e2, f"reading {path}") from e2
        if head != layout.HDF5_SIGNATURE:
            raise StoreError(f"{path} is not an HDF5 file, so not a lifelong store",
                             hint="--store must name a store made by `lifelong init`") from e
        raise StoreError(f"{path} is damaged or truncated: {objects.first_line(e)}",
                         hint="restore it from a backup; a lifelong write never leaves it so") from e
    try:
        with f:
            fmt = f.attrs.get("format")
            if fmt is None or _decode(fmt) != layout.FORMAT:
                raise StoreError(f"{path} is an HDF5 file but not a lifelong store (no format={layout.FORMAT!r})",
                                 hint="--store must name a store made by `lifelong init`")
            version = int(f.attrs["format_version"])
            if version > layout.FORMAT_VERSION:
                raise StoreError(
                    f"{path} has store format version {version}; this lifelong ({__version__}) "
                    f"reads up to version {layout.FORMAT_VERSION}",
                    hint="upgrade lifelong")
            raw = [_decode(s) for s in f["records"][()]]
            m = {
                "path": path,
                "format_version": version,
                "created": _decode(f.attrs.get("created", "")),
                "lifelong_version": _decode(f.attrs.get("lifelong_version", "")),
                "model": json.loads(f["model"][()]),
                "policy_json": _decode(f["policy"][()]),
                "base_fingerprint": json.loads(f["base_fingerprint"][()]),
                "info": json.loads(f["info"][()]),
            }
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise StoreError(f"{path} is damaged or incomplete: {objects.first_line(e)}",
                         hint="restore it from a backup") from e

    if version < layout.FORMAT_VERSION and not as_stored:
        return _migrated(path, m, raw, migrate_all)
    return _Snapshot(raw=raw, **m)


def _migrated(path: Path, m: dict, raw: list[str], migrate_all: bool) -> _Snapshot:
    """Apply the registered migrations from m's version up to FORMAT_VERSION."""
    start = m["format_version"]
    steps = list(range(start, layout.FORMAT_VERSION))
    blocked = [v for v in steps if v not in migrations.MIGRATIONS
               or not (migrate_all or getattr(migrations.MIGRATIONS[v], "read_compatible", False))]
    if blocked:
        if all(v in migrations.MIGRATIONS for v in steps):
            raise StoreError(f"{path} has store format version {start}; this lifelong uses "
                             f"version {layout.FORMAT_VERSION} and must convert it first",
                             hint=f"run `lifelong migrate --store {path}` (back the store up first)")
        raise StoreError(f"{path} has store format version {start}, which this lifelong "
                         f"({__version__}) cannot read or migrate",
                         hint="use the lifelong version that wrote it")
    try:
        m = dict(m, records=[json.loads(s) for s in raw])
        for v in steps:
            m = migrations.MIGRATIONS[v](m)
            m["format_version"] = v + 1
        records = [BatchRecord.from_dict(d) for d in m.pop("records")]
    except StoreError:
        raise                       # the migration's own verdict on the store, with its hint
    except Exception as e:
        raise StoreError(f"{path}: migrating from format version {start} failed: {e!r}",
                         hint="report this as a bug; the store on disk is unchanged") from e
    m["format_version"] = start
    return _Snapshot(raw=[r.to_json() for r in records], parsed=records, migrated_from=start, **m)


def _write_manifest(path: Path, snap: _Snapshot, raw: list[str]) -> None:
    """Atomically replace the manifest at `path` (temp file, fsync, replace, fsync folder)."""
    tmp = atomic.temp_name(path)
    try:
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs["format"] = layout.FORMAT
            f.attrs["format_version"] = layout.FORMAT_VERSION
            f.attrs["lifelong_version"] = __version__
            f.attrs["created"] = snap.created
            f.create_dataset("model", data=json.dumps(snap.model, ensure_ascii=False), dtype=objects.STR)
            f.create_dataset("policy", data=snap.policy_json, dtype=objects.STR)
            f.create_dataset("base_fingerprint", data=json.dumps(snap.base_fingerprint, ensure_ascii=False),
                             dtype=objects.STR)
            f.create_dataset("info", data=json.dumps(snap.info, ensure_ascii=False), dtype=objects.STR)
            arr = np.empty(len(raw), dtype=object)
            arr[:] = raw
            f.create_dataset("records", data=arr, dtype=objects.STR)
        atomic.fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        atomic.unlink_quiet(tmp)
        raise
    atomic.fsync_dir(path.parent)


# --------------------------------------------------------------------------- OS helpers


_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")


def _os_error(e: BaseException, doing: str) -> StoreError:
    """Turn an OS-level failure into a StoreError that says what happened and what to do."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code is None and (m := _ERRNO_IN_TEXT.search(text)):
        code = int(m.group(1))
    if code == errno.ENOSPC or "No space left" in text:
        return StoreError(f"disk full while {doing}; the store is unchanged", hint="free some space and retry")
    if code == errno.EDQUOT:
        return StoreError(f"disk quota exceeded while {doing}; the store is unchanged",
                          hint="free some space and retry")
    if code == errno.EROFS or "Read-only file system" in text:
        return StoreError(f"read-only file system while {doing}; the store is unchanged",
                          hint="put the store on a writable disk (--store / $LIFELONG_STORE)")
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return StoreError(f"permission denied while {doing}; the store is unchanged",
                          hint="check the owner and permissions of the store's folder")
    return StoreError(f"could not finish {doing}: {objects.first_line(e)}; the store is unchanged")


# --------------------------------------------------------------------------- the store


def _from_snapshot(name: str, doc: str) -> property:
    """A read-only Store attribute that reads the current snapshot's field `name`."""
    return property(lambda self: getattr(self._snap, name), doc=doc)


class Store:
    """A snapshot of a store plus the means to change it (`writer`).

    Reading needs no lock: the manifest is read once into memory (`refresh` re-reads it).
    Arrays are read on demand from the immutable object files.
    """

    def __init__(self, path: Path, snap: _Snapshot):
        self.path = path
        self._snap = snap

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, batches={len(self._snap.raw)})"

    # ---- paths
    @property
    def objects_dir(self) -> Path:
        return layout.objects_dir(self.path)

    @property
    def lock_path(self) -> Path:
        return layout.lock_path(self.path)

    def batch_file(self, batch_id: int) -> Path:
        return layout.batch_file(self.path, batch_id)

    # ---- opening and creating
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        """Read the store at `path`. StoreError (with a hint) when it is missing, not HDF5,
        truncated, foreign, newer than this code, or older and needing `lifelong migrate`."""
        p = Path(path)
        return cls(p, _read_manifest(p))

    @classmethod
    def create(cls, path: str | os.PathLike, *, model: dict, policy_json: str, base_fingerprint: dict,
               info: dict, base_arrays: dict[str, np.ndarray]) -> "Store":
        """Create a new store atomically. StoreExists if `path` exists; parent folders are made."""
        p = Path(path)
        if p.exists():
            raise StoreExists(f"a store already exists at {p}; `init` never overwrites one",
                              hint="choose another --store, or delete it (and its .d folder) yourself")
        arrays = objects.check_arrays(base_arrays, "base arrays")
        try:
            snap = _Snapshot(
                path=p, format_version=layout.FORMAT_VERSION, created=utc_now(), lifelong_version=__version__,
                model=json.loads(json.dumps(model)), policy_json=str(policy_json),
                base_fingerprint=json.loads(json.dumps(base_fingerprint)), info=json.loads(json.dumps(info)),
                raw=[])
        except (TypeError, ValueError) as e:
            raise StoreError(f"cannot create {p}: model/fingerprint/info must be JSON data: {e}") from e
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, f"creating the folder {p.parent}") from e
        with _locked(p, wait=True, timeout=None):
            if p.exists():  # another process created it while we waited
                raise StoreExists(f"a store already exists at {p}; `init` never overwrites one",
                                  hint="choose another --store, or delete it (and its .d folder) yourself")
            objdir = layout.objects_dir(p)
            try:
                objdir.mkdir(exist_ok=True)
                _clean_stale(p, batches_too=True)  # no manifest: nothing in .d is referenced
                objects.write_arrays(objdir / layout.BASE_FILE, arrays)
                atomic.fsync_dir(objdir)
                _write_manifest(p, snap, [])
            except OSError as e:
                atomic.unlink_quiet(objdir / layout.BASE_FILE)
                raise _os_error(e, f"creating the store {p}") from e
        return cls.open(p)

    def refresh(self) -> None:
        """Re-read the manifest (another process may have committed)."""
        self._snap = _read_manifest(self.path)

    # ---- the snapshot
    format_version = _from_snapshot("format_version", "The format version on disk (FORMAT_VERSION unless migrated in memory).")
    created = _from_snapshot("created", "When init created the store (UTC, ISO 8601).")
    lifelong_version = _from_snapshot("lifelong_version", "The lifelong version that last wrote the manifest.")
    model = _from_snapshot("model", "The base model's identity: source (name, kind, path, sha256), architecture, layers.")
    policy_json = _from_snapshot("policy_json", "The policy init stored, as JSON.")
    base_fingerprint = _from_snapshot("base_fingerprint", "Layer -> sha256 of the base weights of each edited matrix.")
    info = _from_snapshot("info", "What init measured and sampled (contexts, prefixes, held-out text, null space).")

    @property
    def records(self) -> list[BatchRecord]:
        """Every batch record in id order (a new list; the records themselves are shared).

        Parsed on first use and cached; their facts hold INDEX_FACT_KEYS (see batch_facts).
        """
        return list(self._snap.records)

    def record(self, batch_id: int) -> BatchRecord:
        """One batch record. StoreError if there is no such batch."""
        self._check_batch(batch_id)
        snap = self._snap  # ids are 1..last, so record N sits at index N - 1
        return snap.parsed[batch_id - 1] if snap.parsed is not None else snap._parse(batch_id - 1)

    # ---- arrays
    def base_arrays(self, names: list[str] | None = None, optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Arrays written at create (all, or those named, plus those of `optional` it has)."""
        return objects.read_arrays(self.objects_dir / layout.BASE_FILE, names, f"store {self.path}, base arrays", optional)

    def batch_arrays(self, batch_id: int, names: list[str] | None = None,
                     optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Arrays of one batch (all, or those named, plus those of `optional` it has).
        StoreError if the batch or file is missing, or a named array is."""
        self._check_batch(batch_id)
        return objects.read_arrays(self.batch_file(batch_id), names, f"store {self.path}, batch {batch_id}", optional)

    def _check_batch(self, batch_id: int) -> None:
        last = self._snap.last_id()  # ids are 1..last: never reused, records never removed
        if isinstance(batch_id, bool) or not isinstance(batch_id, int) or not 1 <= batch_id <= last:
            ids = f"1..{last}" if last else "none yet"
            raise StoreError(f"store {self.path} has no batch {batch_id}", hint=f"batch ids: {ids}")

    def batch_facts(self, batch_id: int) -> list[dict]:
        """The full fact dicts of a batch as pushed (the records hold INDEX_FACT_KEYS only)."""
        self._check_batch(batch_id)
        file = self.batch_file(batch_id)
        raw = objects.read_arrays(file, [layout.FACTS], f"store {self.path}, batch {batch_id} facts")[layout.FACTS]
        try:
            return json.loads(raw[()])
        except ValueError as e:
            raise StoreError(f"store {self.path}, batch {batch_id}: facts in {file} are damaged: {e}") from e

    def size_bytes(self) -> int:
        """Bytes on disk: the manifest plus the object files it references."""
        last = self._snap.last_id()
        files = [self.path, self.objects_dir / layout.BASE_FILE] + [self.batch_file(i) for i in range(1, last + 1)]
        total = 0
        for f in files:
            try:
                total += f.stat().st_size
            except OSError:
                pass
        return total

    # ---- writing
    @contextmanager
    def writer(self, wait: bool = True, timeout: float | None = None) -> Iterator["Transaction"]:
        """Hold the writer lock and yield a Transaction on a fresh read of the manifest.

        Commits on normal exit (this Store's snapshot is then refreshed); on an exception
        the object files written are removed and the manifest is left untouched.
        wait=False raises StoreLocked at once if another writer holds the lock; with
        wait=True, `timeout` seconds (None: forever) before StoreLocked.
        """
        with _locked(self.path, wait=wait, timeout=timeout):
            snap = _read_manifest(self.path)
            if snap.migrated_from is not None:
                raise StoreError(f"{self.path} has store format version {snap.migrated_from}; "
                                 f"it must be migrated before it can be written",
                                 hint=f"run `lifelong migrate --store {self.path}`")
            _clean_stale(self.path, batches_too=False)
            self._snap = snap  # reads during the transaction see what the lock holder sees
            tx = Transaction(self, snap)
            try:
                yield tx
            except BaseException:
                tx._discard()
                raise
            try:
                new = tx._commit()
            except BaseException as e:
                tx._discard()
                if isinstance(e, OSError):
                    raise _os_error(e, f"committing to {self.path}") from e
                raise
            if new is not None:
                self._snap = new
            else:
                self._snap = snap

    def migrate(self) -> list[int]:
        """Rewrite the store at FORMAT_VERSION (`lifelong migrate`); returns the versions migrated from."""
        with _locked(self.path, wait=True, timeout=None):
            snap = _read_manifest(self.path, migrate_all=True)
            if snap.migrated_from is None:
                self._snap = snap
                return []
            start = snap.migrated_from
            steps = list(range(start, layout.FORMAT_VERSION))
            snap.info = dict(snap.info)
            snap.info.setdefault("migrations", []).append(
                {"from": start, "to": layout.FORMAT_VERSION, "at": utc_now(), "by": __version__})
            snap.format_version, snap.migrated_from = layout.FORMAT_VERSION, None
            try:
                _write_manifest(self.path, snap, snap.raw)
            except OSError as e:
                raise _os_error(e, f"migrating {self.path}") from e
            self._snap = snap
            return steps


class Transaction:
    """A writer's working copy. Build it with `add_batch`, `set_records`, `update_info`;
    `Store.writer` commits it (or discards it on an exception).

    `records` is parsed from the manifest read under the lock on first use; a
    transaction that only adds batches never parses the history and commits by
    appending to the stored JSON.
    """

    def __init__(self, store: Store, snap: _Snapshot):
        self._store = store
        self._snap = snap
        self._records: list[BatchRecord] | None = None  # parsed working copy, on first use
        self._added: list[BatchRecord] = []
        self._written: list[Path] = []
        self._info = dict(snap.info)
        self._info_changed = False

    @property
    def records(self) -> list[BatchRecord]:
        """The working records in id order (those stored plus those added)."""
        if self._records is None:
            self._records = list(self._snap.records) + self._added
        return self._records

    @records.setter
    def records(self, records: list[BatchRecord]) -> None:
        self.set_records(records)

    def next_id(self) -> int:
        """The id the next add_batch must use."""
        if self._records is not None:
            return next_id(self._records)
        return (self._added[-1].id if self._added else self._snap.last_id()) + 1

    def add_batch(self, record: BatchRecord, arrays: dict[str, np.ndarray]) -> None:
        """Write the batch's object file now (atomically) and append its record.

        record.id must equal next_id(records). Arrays are checked first (no NaN/inf).
        The full fact dicts go into the object file; the manifest keeps INDEX_FACT_KEYS.
        """
        if not isinstance(record, BatchRecord):
            raise StoreError(f"add_batch wants a BatchRecord, not {type(record).__name__}")
        want = self.next_id()
        if record.id != want:
            raise StoreError(f"batch id {record.id} is not the next id ({want}); ids are never reused")
        if record.status not in STATUSES:
            raise StoreError(f"batch {record.id}: unknown status {record.status!r}")
        try:
            record.to_json()
            facts_json = json.dumps(record.facts, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise StoreError(f"batch {record.id}: the record is not JSON data: {e}") from e
        checked = objects.check_arrays(arrays, f"batch {record.id}")
        final = self._store.batch_file(record.id)
        try:
            objects.write_arrays(final, checked, facts_json)
        except OSError as e:
            raise _os_error(e, f"writing {final}") from e
        self._written.append(final)
        self._added.append(record)
        if self._records is not None:
            self._records.append(record)

    def set_records(self, records: list[BatchRecord]) -> None:
        """Replace the working records (e.g. with history.rolled_back(...)).

        The ids must be exactly the current ones in the same order: records can change
        status or fields, never appear or disappear here.
        """
        new = list(records)
        if [r.id for r in new] != [r.id for r in self.records]:
            raise StoreError("set_records must keep the same batch ids in the same order "
                             "(add batches with add_batch; records are never removed)")
        for r in new:
            if not isinstance(r, BatchRecord) or r.status not in STATUSES:
                raise StoreError(f"set_records: batch {getattr(r, 'id', r)!r} is not a valid BatchRecord")
        self._records = new

    def update_info(self, **kv) -> None:
        """Merge keys into the store's free-form `info` dict (JSON data only)."""
        try:
            kv = json.loads(json.dumps(kv))
        except (TypeError, ValueError) as e:
            raise StoreError(f"update_info: values must be JSON data: {e}") from e
        self._info.update(kv)
        self._info_changed = True

    # ---- driven by Store.writer
    def _commit(self) -> _Snapshot | None:
        """Write the manifest if anything changed; return the new snapshot (None: no change)."""
        old = self._snap
        added_ids = {r.id for r in self._added}
        if self._records is None:
            # Only appends: the stored JSON is reused as it is.
            records = None
            raw = old.raw + [_indexed(r).to_json() for r in self._added]
        else:
            expect = list(range(1, old.last_id() + 1 + len(self._added)))
            if [r.id for r in self._records] != expect:
                raise StoreError("the transaction's records were changed directly; use add_batch / "
                                 "set_records (nothing was committed)")
            records = [_indexed(r) if r.id in added_ids else r for r in self._records]
            raw = [r.to_json() for r in records]
        if not self._added and not self._info_changed and raw == old.raw:
            return None
        snap = _Snapshot(
            path=old.path, format_version=layout.FORMAT_VERSION, created=old.created, lifelong_version=__version__,
            model=old.model, policy_json=old.policy_json, base_fingerprint=old.base_fingerprint,
            info=self._info, raw=raw, parsed=records)
        if self._written:
            atomic.fsync_dir(self._store.objects_dir)
        _write_manifest(self._store.path, snap, raw)
        self._written = []  # now referenced: never remove them
        return snap

    def _discard(self) -> None:
        for p in self._written:
            atomic.unlink_quiet(p)
        self._written = []


def _indexed(r: BatchRecord) -> BatchRecord:
    """`r` with its facts cut to INDEX_FACT_KEYS (r itself when they already are)."""
    slim = index_facts(r.facts)
    return r if slim == r.facts else replace(r, facts=slim)


# --------------------------------------------------------------------------- locking


@contextmanager
def _locked(path: Path, *, wait: bool, timeout: float | None) -> Iterator[None]:
    lp = layout.lock_path(path)
    lock = filelock.FileLock(str(lp))
    t = (-1 if timeout is None else max(0.0, float(timeout))) if wait else 0
    try:
        lock.acquire(timeout=t)
    except filelock.Timeout:
        waited = "" if not wait else f" (waited {timeout:g} s)" if timeout is not None else ""
        raise StoreLocked(f"store {path} is being written by another process; lock file {lp} is held{waited}",
                          hint="wait for the other lifelong command to finish, then retry") from None
    except OSError as e:
        raise _os_error(e, f"taking the lock {lp}") from e
    try:
        yield
    finally:
        lock.release()


def _clean_stale(path: Path, *, batches_too: bool) -> None:
    """Remove temp files left by killed writers (only lock holders make them, so under the
    lock every one is stale); with batches_too (create: no manifest yet) also old batch files."""
    prefix = f".{path.name}.tmp-"
    candidates = []
    try:
        candidates += [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        pass
    objdir = layout.objects_dir(path)
    try:
        for p in objdir.iterdir():
            if (p.name.startswith(".") and ".h5.tmp-" in p.name) or (
                    batches_too and re.fullmatch(r"batch_\d{6,}\.h5", p.name)):
                candidates.append(p)
    except OSError:
        pass
    for p in candidates:
        atomic.unlink_quiet(p)
