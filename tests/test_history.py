"""History rules on tiny inline records: ids, head, rollback, groups, supersession, the log."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.errors import BadInput
from lifelong.store.history import (
    BatchRecord,
    GroupPlan,
    GroupRecord,
    active,
    describe,
    head,
    live_facts,
    live_groups,
    next_id,
    plan_groups,
    rolled_back,
    superseded_by,
)


def F(subject: str, relation: str = "P1", target: str = " x") -> dict:
    return {"subject": subject, "relation": relation, "prompt": "{} rel " + relation, "target": target}


def push(records: list[BatchRecord], facts: list[dict], merge: bool = True) -> list[BatchRecord]:
    """What `lifelong push` does to the history: plan, number, append."""
    plans = plan_groups(facts, records, merge)
    bid = next_id(records)
    rec = BatchRecord(
        id=bid, created="2025-01-01T00:00:00Z", source=f"b{bid}.jsonl", sha256="0" * 64, status="active",
        facts=facts, groups=[p.to_record(bid) for p in plans],
        supersedes=[s for p in plans for s in p.supersedes], efficacy=[1.0] * len(facts))
    return records + [rec]


def test_history_imports_no_heavy_modules():
    """`lifelong log` must start fast: the history needs neither numpy, h5py nor torch."""
    code = ("import sys, lifelong.store.history; "
            "print(sorted({'numpy', 'h5py', 'torch'} & set(sys.modules)))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "[]"


def test_ids_head_active_on_empty_history():
    assert next_id([]) == 1
    assert head([]) == 0
    assert active([]) == []
    assert live_groups([]) == [] and live_facts([]) == [] and superseded_by([]) == {}


def test_rollback_then_push_gets_a_fresh_id():
    recs = push(push(push([], [F("a")]), [F("b")]), [F("c")])
    assert [r.id for r in recs] == [1, 2, 3] and head(recs) == 3
    recs = rolled_back(recs, 1)
    assert [r.status for r in recs] == ["active", "reverted", "reverted"]
    assert head(recs) == 1 and [r.id for r in active(recs)] == [1]
    recs = push(recs, [F("d")])
    assert recs[-1].id == 4 and head(recs) == 4  # ids are never reused
    assert [r.id for r in active(recs)] == [1, 4]


def test_rolled_back_does_not_mutate_and_head_is_a_no_op():
    recs = push(push([], [F("a")]), [F("b")])
    before = copy.deepcopy(recs)
    out = rolled_back(recs, 0)
    assert recs == before
    assert [r.status for r in out] == ["reverted", "reverted"]
    assert rolled_back(recs, 2) == recs
    assert [r.status for r in rolled_back(recs, 1, status="rejected")] == ["active", "rejected"]


@pytest.mark.parametrize("to", [3, -1, 7, "1", True, 2.0])
def test_rolled_back_refuses_bad_targets(to):
    recs = rolled_back(push(push(push([], [F("a")]), [F("b")]), [F("c")]), 1)  # 2, 3 reverted
    recs = push(recs, [F("d")])  # 4 active
    with pytest.raises(BadInput) as e:
        rolled_back(recs, to)
    assert "0, 1, 4" in str(e.value)  # names the valid choices


def test_rolled_back_message_says_why():
    recs = rolled_back(push(push([], [F("a")]), [F("b")]), 1)
    with pytest.raises(BadInput, match="batch 2 is reverted"):
        rolled_back(recs, 2)
    with pytest.raises(BadInput, match="there is no batch 9"):
        rolled_back(recs, 9)
    with pytest.raises(BadInput):
        rolled_back(recs, 1, status="active")


def test_supersession_and_reactivation_after_rollback():
    recs = push([], [F("a", "P1", " old"), F("a", "P2")])
    recs = push(recs, [F("a", "P1", " new")])
    assert recs[1].supersedes == [(0, (1, 0))]
    assert superseded_by(recs) == {(1, 0): (2, 0)}
    assert live_facts(recs) == [(1, 1), (2, 0)]
    back = rolled_back(recs, 1)
    assert superseded_by(back) == {}
    assert live_facts(back) == [(1, 0), (1, 1)]  # the old fact is live again


def test_merged_groups_replace_and_come_back_after_rollback():
    recs = push([], [F("a", "P1"), F("b", "P1"), F("a", "P2")], merge=True)
    assert [(g.subject, g.facts) for g in recs[0].groups] == [("a", [(1, 0), (1, 2)]), ("b", [(1, 1)])]
    assert live_groups(recs) == [(1, 0), (1, 1)]
    recs = push(recs, [F("a", "P3")], merge=True)
    g = recs[1].groups[0]
    assert g.facts == [(2, 0), (1, 0), (1, 2)] and g.replaces == [(1, 0)]
    assert live_groups(recs) == [(1, 1), (2, 0)]
    assert live_groups(rolled_back(recs, 1)) == [(1, 0), (1, 1)]
    assert live_groups(rolled_back(recs, 0)) == []


def test_plan_groups_merge_on():
    recs = push([], [F("a", "P1"), F("a", "P2"), F("b", "P1")], merge=False)  # groups 0,1 about a
    plans = plan_groups([F("c"), F("a", "P1"), F("c", "P2"), F("a", "P9")], recs, merge=True)
    assert plans == [
        GroupPlan(subject="c", new=[0, 2], carried=[], replaces=[], supersedes=[]),
        GroupPlan(subject="a", new=[1, 3], carried=[(1, 1)], replaces=[(1, 0), (1, 1)],
                  supersedes=[(1, (1, 0))]),
    ]
    assert plans[1].to_record(2) == GroupRecord("a", [(2, 1), (2, 3), (1, 1)], [(1, 0), (1, 1)])


def test_plan_groups_merge_off():
    recs = push([], [F("a", "P1"), F("a", "P2")], merge=True)   # one merged group
    recs = push(recs, [F("b", "P1")], merge=False)
    plans = plan_groups([F("a", "P1"), F("b", "P1"), F("a", "P3")], recs, merge=False)
    assert [p.new for p in plans] == [[0], [1], [2]]
    assert all(p.carried == [] for p in plans)
    assert [p.supersedes for p in plans] == [[(0, (1, 0))], [(1, (2, 0))], []]
    # b's old group is wholly superseded, so it leaves; a's merged group keeps a live fact.
    assert [p.replaces for p in plans] == [[], [(2, 0)], []]


def test_plan_groups_relation_defaults_to_prompt():
    old = {"subject": "a", "prompt": "{} lives in", "target": " x"}
    recs = push([], [old])
    plans = plan_groups([dict(old, target=" y")], recs, merge=True)
    assert plans[0].supersedes == [(0, (1, 0))]


def test_plan_groups_refuses_a_self_contradicting_batch():
    with pytest.raises(BadInput, match="both set relation"):
        plan_groups([F("a", "P1", " x"), F("a", "P1", " y")], [], merge=True)


def test_json_round_trip_restores_tuples():
    recs = push([], [F("a"), F("a", "P2")])
    recs = push(recs, [F("a")])
    r = recs[1]
    r.metrics, r.timings, r.fingerprint_after = {"ppl": 1.5}, {"keys": 0.25}, {"l4": "ab" * 32}
    r.note, r.policy_digest = "naïve ✓", "d" * 64
    back = BatchRecord.from_json(r.to_json())
    assert back == r
    assert isinstance(back.supersedes[0], tuple) and isinstance(back.supersedes[0][1], tuple)
    assert all(isinstance(f, tuple) for g in back.groups for f in g.facts + g.replaces)


def test_from_json_refuses_malformed_records():
    good = push([], [F("a")])[0]
    with pytest.raises(ValueError, match="unknown field"):
        BatchRecord.from_json(good.to_json()[:-1] + ',"bogus":1}')
    with pytest.raises(ValueError, match="status"):
        BatchRecord.from_json(good.to_json().replace('"active"', '"weird"'))
    with pytest.raises(ValueError):
        BatchRecord.from_json('{"id": 1}')


def test_describe_rows():
    recs = push([], [F("a", "P1"), F("a", "P2"), F("b")])
    recs = push(recs, [F("a", "P1")])
    recs[1].efficacy = [0.5]
    rows = describe(recs)
    assert rows[0] == {
        "id": 1, "created": "2025-01-01T00:00:00Z", "source": "b1.jsonl", "sha256": "0" * 64,
        "n_facts": 3, "n_groups": 2, "merged": 1, "efficacy": 1.0, "status": "active",
        "superseded": ["1:0 -> 2:0"],
    }
    assert rows[1]["superseded"] == ["1:0 -> 2:0"] and rows[1]["efficacy"] == 0.5
    rows = describe(rolled_back(recs, 1))
    assert rows[0]["superseded"] == []  # a reverted batch supersedes nothing any more
    assert rows[1]["superseded"] == ["1:0 -> 2:0"] and rows[1]["status"] == "reverted"


def test_describe_and_liveness_scale_linearly():
    recs = []
    for b in range(1, 10_001):
        facts = [F(f"s{b % 500}", "P1"), F(f"t{b}", "P1")]
        g = [GroupRecord(f["subject"], [(b, i)]) for i, f in enumerate(facts)]
        sup = [(0, (b - 500, 0))] if b > 500 else []
        if b > 500:
            g[0].replaces = [(b - 500, 0)]
        recs.append(BatchRecord(b, "t", "f", "0", "active", facts, g, sup, [1.0, 0.0]))
    rows = describe(recs)  # would take minutes if quadratic
    assert len(rows) == 10_000 and rows[-1]["efficacy"] == 0.5
    assert len(live_facts(recs)) == 10_000 + 500
    assert len(live_groups(recs)) == 10_000 + 500
    assert len(plan_groups([F("s7", "P1")], recs, merge=True)[0].supersedes) == 1


# --------------------------------------------------------------------------- property

subjects = st.sampled_from(["a", "b", "c"])
relations = st.sampled_from(["P1", "P2"])
batch = st.lists(st.tuples(subjects, relations), min_size=1, max_size=4, unique=True)
step = st.one_of(st.tuples(st.just("push"), batch, st.booleans()), st.tuples(st.just("back"), st.integers(0, 9)))


@settings(max_examples=60, deadline=None)
@given(st.lists(step, max_size=10))
def test_rollback_restores_the_state_right_after_that_batch(steps):
    """Live facts and groups after `rollback --to N` equal those right after N was pushed."""
    recs: list[BatchRecord] = []
    state_after = {0: ([], [])}
    for kind, arg, *rest in steps:
        if kind == "push":
            recs = push(recs, [F(s, r) for s, r in arg], merge=rest[0])
            state_after[recs[-1].id] = (live_facts(recs), live_groups(recs))
            # each (subject, relation) is live at most once
            keys = [(recs[b - 1].facts[i]["subject"], recs[b - 1].facts[i]["relation"]) for b, i in live_facts(recs)]
            assert len(keys) == len(set(keys))
        else:
            choices = [0] + [r.id for r in active(recs)]
            to = choices[arg % len(choices)]
            recs = rolled_back(recs, to)
            assert head(recs) == to
            assert (live_facts(recs), live_groups(recs)) == state_after[to]
