"""The edit history as pure data: batch ids, head, statuses, merged groups, supersession.

Nothing here touches files, h5py, numpy or torch, so every rule is tested with
tiny inline records (tests/test_history.py). The store (lifelong/store/store.py)
persists a list of `BatchRecord`; the verbs (push, rollback, log) call these
functions to decide what is live.

Vocabulary
- A *batch* is one pushed fact file, identified by an id that is never reused.
- A batch is `active` (applied), `reverted` (undone by a rollback) or
  `rejected` (undone automatically because a refresh gate failed).
- The *head* is the highest active id; 0 is the base model.
- A *fact* is addressed by `FactRef = (batch_id, index in that batch)`.
- A *group* is the set of facts optimized together into one value (one key
  column, one residual-bank entry); `GroupRef = (batch_id, group index)`.
  A group may carry live facts of the same subject from earlier batches and
  *replace* the earlier groups of that subject (DESIGN §4.2).
- A new fact with the same (subject, relation) as a live earlier fact
  *supersedes* it (DESIGN §3): the old fact is no longer live.

Liveness is always derived from the active batches only, so rolling back the
batch that superseded a fact (or replaced a group) makes the old one live again.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from lifelong.errors import BadInput
from lifelong.facts import fact_key

FactRef = tuple[int, int]   # (batch_id, fact index in that batch)
GroupRef = tuple[int, int]  # (batch_id, group index in that batch)

ACTIVE, REVERTED, REJECTED = "active", "reverted", "rejected"
STATUSES = (ACTIVE, REVERTED, REJECTED)


# --------------------------------------------------------------------------- records


@dataclass
class GroupRecord:
    """One group of a batch: facts optimized together into one value."""

    subject: str
    # Every fact of this group's one value: this batch's new facts AND the carried
    # live earlier facts of the same subject.
    facts: list[FactRef]
    # Earlier groups (same subject) whose key column / bank entry this group replaces.
    replaces: list[GroupRef] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready (json writes the ref tuples as arrays)."""
        return {"subject": self.subject, "facts": self.facts, "replaces": self.replaces}

    @classmethod
    def from_dict(cls, d: dict) -> "GroupRecord":
        return cls(
            subject=d["subject"],
            facts=[(a, b) for a, b in d["facts"]],
            replaces=[(a, b) for a, b in d.get("replaces", ())],
        )


@dataclass
class BatchRecord:
    """Everything the history knows about one pushed batch (arrays live in the store)."""

    id: int
    created: str                  # ISO-8601 UTC
    source: str                   # path of the fact file as given
    sha256: str                   # of the fact file bytes
    status: str                   # "active" | "reverted" | "rejected"
    facts: list[dict]             # each a Fact.to_dict()
    groups: list[GroupRecord]
    # (index of the new fact in this batch, the older fact it replaces)
    supersedes: list[tuple[int, FactRef]] = field(default_factory=list)
    efficacy: list[float] = field(default_factory=list)   # per fact, strict, at push time
    metrics: dict = field(default_factory=dict)           # free-form numbers
    timings: dict = field(default_factory=dict)           # seconds per phase
    fingerprint_after: dict = field(default_factory=dict)  # layer name -> sha256 after this batch
    policy_digest: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict (shares this record's lists; json writes tuples as arrays)."""
        return {
            "id": self.id,
            "created": self.created,
            "source": self.source,
            "sha256": self.sha256,
            "status": self.status,
            "facts": self.facts,
            "groups": [{"subject": g.subject, "facts": g.facts, "replaces": g.replaces} for g in self.groups],
            "supersedes": self.supersedes,
            "efficacy": self.efficacy,
            "metrics": self.metrics,
            "timings": self.timings,
            "fingerprint_after": self.fingerprint_after,
            "policy_digest": self.policy_digest,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BatchRecord":
        """Inverse of `to_dict`; refs come back as tuples. ValueError on a malformed dict."""
        unknown = set(d) - _RECORD_FIELDS
        if unknown:
            raise ValueError(f"batch record has unknown field(s): {sorted(unknown)}")
        try:
            rec = cls(
                id=int(d["id"]),
                created=d["created"],
                source=d["source"],
                sha256=d["sha256"],
                status=d["status"],
                facts=list(d["facts"]),
                groups=[GroupRecord.from_dict(g) for g in d["groups"]],
                supersedes=[(i, (a, b)) for i, (a, b) in d.get("supersedes", ())],
                efficacy=list(d.get("efficacy", ())),
                metrics=dict(d.get("metrics", {})),
                timings=dict(d.get("timings", {})),
                fingerprint_after=dict(d.get("fingerprint_after", {})),
                policy_digest=d.get("policy_digest", ""),
                note=d.get("note", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed batch record: {e!r}") from None
        if rec.status not in STATUSES:
            raise ValueError(f"batch {rec.id}: unknown status {rec.status!r}")
        return rec

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str | bytes) -> "BatchRecord":
        return cls.from_dict(json.loads(s))


_RECORD_FIELDS = {
    "id", "created", "source", "sha256", "status", "facts", "groups", "supersedes",
    "efficacy", "metrics", "timings", "fingerprint_after", "policy_digest", "note",
}


# The fact fields the history needs (supersession, grouping, retention eval, the log).
# The store keeps these in the manifest and the full fact dicts beside the batch's arrays.
INDEX_FACT_KEYS = ("subject", "relation", "prompt", "target", "target_true")


def index_facts(facts: list[dict]) -> list[dict]:
    """The facts cut down to INDEX_FACT_KEYS (what the manifest holds)."""
    return [{k: f[k] for k in INDEX_FACT_KEYS if k in f} for f in facts]


def utc_now() -> str:
    """The current time as ISO-8601 UTC with seconds, e.g. "2025-01-31T02:00:00Z"."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ref_str(ref: FactRef) -> str:
    """`(3, 1)` -> "3:1", the form `lifelong log` prints."""
    return f"{ref[0]}:{ref[1]}"


# --------------------------------------------------------------------------- ids and head


def next_id(records: list[BatchRecord]) -> int:
    """The id of the next batch: max id + 1 over ALL records (ids are never reused); 1 for none."""
    return max((r.id for r in records), default=0) + 1


def head(records: list[BatchRecord]) -> int:
    """The highest active batch id; 0 (the base model) if none is active."""
    return max((r.id for r in records if r.status == ACTIVE), default=0)


def active(records: list[BatchRecord]) -> list[BatchRecord]:
    """The active batches in id order."""
    return sorted((r for r in records if r.status == ACTIVE), key=lambda r: r.id)


def rolled_back(records: list[BatchRecord], to: int, *, status: str = REVERTED) -> list[BatchRecord]:
    """A new list where every active batch with id > `to` gets `status` ("reverted", or
    "rejected" when a refresh gate undoes a batch). Inputs are not mutated.

    `to` must be 0 (the base model) or the id of an active batch; rolling back to the
    current head returns equal records. BadInput otherwise, naming the valid choices.
    """
    if status not in (REVERTED, REJECTED):
        raise BadInput(f"rollback status must be 'reverted' or 'rejected', not {status!r}")
    act = active(records)
    valid = [0] + [r.id for r in act]
    if isinstance(to, bool) or not isinstance(to, int) or to not in valid:
        choices = ", ".join(map(str, valid)) if len(valid) <= 20 else (
            ", ".join(map(str, valid[:10])) + ", ..., " + ", ".join(map(str, valid[-5:])))
        known = {r.id: r.status for r in records}
        why = f"batch {to} is {known[to]}" if to in known else f"there is no batch {to}"
        raise BadInput(
            f"cannot roll back to {to}: {why}",
            hint=f"choose 0 (the base model) or an active batch: {choices}",
        )
    return [replace(r, status=status) if (r.status == ACTIVE and r.id > to) else r for r in records]


# --------------------------------------------------------------------------- liveness


def live_groups(records: list[BatchRecord]) -> list[GroupRef]:
    """Groups of active batches not replaced by a group of a later active batch.

    In id order, then group order. These are the key columns of the protection set
    and the entries of the residual bank.
    """
    act = active(records)
    replaced: set[GroupRef] = set()
    for r in act:
        for g in r.groups:
            replaced.update(ref for ref in g.replaces if ref[0] < r.id)
    return [(r.id, j) for r in act for j in range(len(r.groups)) if (r.id, j) not in replaced]


def superseded_by(records: list[BatchRecord]) -> dict[FactRef, FactRef]:
    """Old fact -> the newer fact that supersedes it, over active batches only."""
    out: dict[FactRef, FactRef] = {}
    for r in active(records):
        for i, old in r.supersedes:
            if old[0] < r.id:
                out[old] = (r.id, i)
    return out


def live_facts(records: list[BatchRecord]) -> list[FactRef]:
    """Facts of active batches not superseded by a later active batch, in id order."""
    dead = superseded_by(records)
    return [(r.id, i) for r in active(records) for i in range(len(r.facts)) if (r.id, i) not in dead]


# --------------------------------------------------------------------------- planning a push


@dataclass
class GroupPlan:
    """How one group of a new batch is formed (see `plan_groups`)."""

    subject: str
    new: list[int]                         # indices into the batch's new facts
    carried: list[FactRef]                 # live earlier facts optimized with them
    replaces: list[GroupRef]               # earlier groups this group's value replaces
    supersedes: list[tuple[int, FactRef]]  # (new fact index, older live fact)

    def to_record(self, batch_id: int) -> GroupRecord:
        """The `GroupRecord` stored once the batch gets `batch_id`."""
        return GroupRecord(
            subject=self.subject,
            facts=[(batch_id, i) for i in self.new] + list(self.carried),
            replaces=list(self.replaces),
        )


def plan_groups(new_facts: list[dict], records: list[BatchRecord], merge: bool) -> list[GroupPlan]:
    """Group a batch's new facts against the live history (DESIGN §3, §4.2).

    Supersession (always): a new fact whose (subject, relation) equals that of a live
    earlier fact supersedes it.
    merge=True: one group per subject (first-appearance order); it carries the live
    earlier facts of that subject that this batch does not supersede, and replaces
    every live group of that subject.
    merge=False: one group per new fact, nothing carried. It replaces only the live
    groups all of whose facts this batch supersedes (a dead key must not stay in the
    protection set); a partly superseded merged group stays.

    BadInput if two new facts share (subject, relation): the batch would contradict itself.
    """
    seen: dict[tuple[str, str], int] = {}
    for i, f in enumerate(new_facts):
        k = fact_key(f)
        if k in seen:
            raise BadInput(
                f"facts {seen[k]} and {i} of the batch both set relation {k[1]!r} of {k[0]!r}",
                hint="keep one of them; a batch may not contradict itself",
            )
        seen[k] = i

    by_id = {r.id: r for r in records}
    live = live_facts(records)
    live_by_key: dict[tuple[str, str], list[FactRef]] = {}
    live_by_subject: dict[str, list[FactRef]] = {}
    for ref in live:
        k = fact_key(by_id[ref[0]].facts[ref[1]])
        live_by_key.setdefault(k, []).append(ref)
        live_by_subject.setdefault(k[0], []).append(ref)

    sup: list[list[tuple[int, FactRef]]] = [
        [(i, old) for old in live_by_key.get(fact_key(f), ())] for i, f in enumerate(new_facts)
    ]
    superseded_now = {old for s in sup for _, old in s}

    lg = live_groups(records)
    groups_by_subject: dict[str, list[GroupRef]] = {}
    for gref in lg:
        groups_by_subject.setdefault(by_id[gref[0]].groups[gref[1]].subject, []).append(gref)

    if merge:
        order: dict[str, list[int]] = {}
        for i, f in enumerate(new_facts):
            order.setdefault(f["subject"], []).append(i)
        return [
            GroupPlan(
                subject=subj,
                new=idx,
                carried=[r for r in live_by_subject.get(subj, ()) if r not in superseded_now],
                replaces=list(groups_by_subject.get(subj, ())),
                supersedes=[s for i in idx for s in sup[i]],
            )
            for subj, idx in order.items()
        ]

    live_set = set(live)
    taken: set[GroupRef] = set()
    plans = []
    for i, f in enumerate(new_facts):
        olds = {old for _, old in sup[i]}
        replaces = []
        for gref in groups_by_subject.get(f["subject"], ()) if olds else ():
            members = [r for r in by_id[gref[0]].groups[gref[1]].facts if r in live_set]
            if (gref not in taken and members and all(m in superseded_now for m in members)
                    and any(m in olds for m in members)):
                replaces.append(gref)
                taken.add(gref)
        plans.append(GroupPlan(subject=f["subject"], new=[i], carried=[], replaces=replaces,
                               supersedes=list(sup[i])))
    return plans


# --------------------------------------------------------------------------- the log


def describe(records: list[BatchRecord]) -> list[dict]:
    """One row per batch (id order) for `lifelong log`. Linear in the number of records.

    Keys: id, created, source, sha256, n_facts, n_groups, merged (groups with > 1 fact),
    efficacy (mean, None if not measured), status, superseded ("old -> new" strings
    involving this batch: what it superseded, and which of its facts an active later
    batch superseded).
    """
    involved: dict[int, list[str]] = {}
    for r in records:
        for i, old in r.supersedes:
            s = f"{ref_str(old)} -> {ref_str((r.id, i))}"
            involved.setdefault(r.id, []).append(s)
            if r.status == ACTIVE and old[0] != r.id:
                involved.setdefault(old[0], []).append(s)
    rows = []
    for r in sorted(records, key=lambda r: r.id):
        rows.append({
            "id": r.id,
            "created": r.created,
            "source": r.source,
            "sha256": r.sha256,
            "n_facts": len(r.facts),
            "n_groups": len(r.groups),
            "merged": sum(1 for g in r.groups if len(g.facts) > 1),
            "efficacy": statistics.fmean(r.efficacy) if r.efficacy else None,
            "status": r.status,
            "superseded": involved.get(r.id, []),
        })
    return rows
