"""The edit budget: drift measured at each push, the store's slope, the edits left before the gate."""
from __future__ import annotations

import json

import pytest

from conftest import write_policy
from helpers import cli, write_jsonl
from lifelong import api
from lifelong.eval.budget import describe, drift_points, edit_budget
from lifelong.store import history
from lifelong.store.history import BatchRecord
from lifelong.store.store import Store


def record(i: int, live: int, drift: float | None, status: str = history.ACTIVE) -> BatchRecord:
    metrics = {"live_facts": live} | ({"perplexity_drift": drift} if drift is not None else {})
    return BatchRecord(id=i, created="2026-12-06T00:00:00Z", source="f", sha256="0", status=status,
                       facts=[{"subject": f"s{i}-{j}", "prompt": "{} is", "target": "x"} for j in range(10)],
                       groups=[], supersedes=[], efficacy=[1.0] * 10, metrics=metrics,
                       fingerprint_after={}, policy_digest="0")


def test_slope_through_the_origin_and_edits_left():
    recs = [record(1, 10, 0.01), record(2, 20, 0.02), record(3, 30, 0.03)]
    b = edit_budget(recs, max_drift=0.05)
    assert b["drift"] == 0.03 and b["live_facts"] == 30 and b["measured_by"] == "push of batch 3"
    assert b["slope_per_100"] == pytest.approx(0.1) and b["points"] == 3
    assert b["edits_left"] == 20                              # (0.05 - 0.03) / 0.001 per edit
    assert "about 20 more edits" in describe(b)


def test_rolled_back_batches_leave_the_fit_and_a_new_measurement_replaces_the_head():
    recs = [record(1, 10, 0.01), record(2, 20, 0.10, status=history.REVERTED)]
    assert drift_points(recs) == [(10, 0.01)]
    b = edit_budget(recs, max_drift=0.05, now=(10, 0.02), measured_by="eval")
    assert (b["drift"], b["measured_by"], b["edits_left"]) == (0.02, "eval", 15)


def test_no_measurement_and_no_growth_say_so():
    assert edit_budget([], 0.05)["drift"] is None
    assert "no drift measured yet" in describe(edit_budget([record(1, 10, None)], 0.05))
    flat = edit_budget([record(1, 10, -0.001)], 0.05)
    assert flat["edits_left"] is None and "no limit in sight" in describe(flat)
    over = edit_budget([record(1, 10, 0.08)], 0.05)
    assert over["edits_left"] == 0


FACTS = [[{"subject": "France", "prompt": "The capital of {} is", "target": "Rome",
           "neighbors": [{"prompt": "The capital of Italy is", "target": "Rome"}]}],
         [{"subject": "Apple", "prompt": "{} makes the", "target": "piano"}]]


def test_budget_shows_in_push_status_eval_and_refresh(tmp_path, tiny_llama_dir):
    store = tmp_path / "s.h5"
    api.init(store, model=str(tiny_llama_dir), policy=str(write_policy(tmp_path, "llama")))
    rep = api.push(store, write_jsonl(tmp_path / "a.jsonl", FACTS[0]))
    assert rep.summary["perplexity_drift"] is not None and rep.budget["measured_by"] == "push of batch 1"
    assert "neighbors_unchanged_sure" in rep.to_dict()["facts"][0]
    rec = Store.open(store).record(1)
    assert rec.metrics["live_facts"] == 1 and rec.metrics["perplexity_drift"] == rep.summary["perplexity_drift"]

    status = json.loads(cli("status", "--store", str(store), "--json").stdout)
    assert status["budget"]["drift"] == rep.summary["perplexity_drift"]
    assert "budget" in cli("status", "--store", str(store)).stdout

    summary = api.evaluate(store, prefixes=0)["summary"]
    assert summary["budget"]["measured_by"] == "eval" and summary["budget"]["live_facts"] == 1
    assert summary["budget"]["drift"] == pytest.approx(summary["perplexity_drift"])

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_jsonl(inbox / "b.jsonl", FACTS[1])
    report = api.refresh(store, inbox, gates={"min_efficacy": 0, "max_perplexity_drift": 1, "max_neighbor_drop": 1})
    (done,) = report.files
    assert done["budget"]["live_facts"] == 2 and done["budget"]["max_drift"] == 1
    assert done["budget"]["measured_by"] == "refresh gates after batch 2"


def test_compounding_drift_takes_the_steeper_recent_slope():
    """Drift that compounds: the recent slope (from 200 to 300 live facts) is steeper than the
    line through the origin, and the budget counts with it."""
    recs = [record(1, 100, 0.01), record(2, 200, 0.03), record(3, 300, 0.06)]
    b = edit_budget(recs, max_drift=0.10)
    assert b["slope_per_100"] == pytest.approx(3.0 / 100)       # (0.06 - 0.03) per 100 edits; the origin line gives 1.8 %
    assert b["edits_left"] == 133                               # (0.10 - 0.06) / 0.0003 per edit
