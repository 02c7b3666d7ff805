"""The quality benchmark's data handling (no model): batches the product accepts."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import their shared data module, as when run
spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def test_one_value_per_subject_and_relation_keeps_the_last_asked_for():
    rows = [{"subject": "EU", "prompt": "In {}, they understand", "target": t} for t in ("Swedish", "Finnish")]
    rows.append({"subject": "EU", "prompt": "{} is located in", "target": "Africa", "relation": "P30"})
    rows.append({"subject": "EU", "prompt": "{} lies in", "target": "Asia", "relation": "P30"})
    kept, dropped = quality.keep_last_per_relation(rows)
    assert dropped == 2
    assert [r["target"] for r in kept] == ["Finnish", "Asia"]


@pytest.mark.skipif(not quality.SAME.exists(), reason="needs ../shared/data")
def test_benchmark_batches_pass_validation(tmp_path):
    from lifelong.facts import load_facts

    batches, _ = quality.same_subject_batches(200, 50)
    sup, cases = quality.supersession_batches()
    assert len(cases) == 5 and all(c["third"]["target"] != c["first"]["target"] for c in cases)
    for i, b in enumerate(batches + sup + quality.counterfact_batches(100, 50)):
        load_facts(quality.write_batch(tmp_path / f"b{i}.jsonl", b))  # raises on any invalid line


def test_the_report_says_where_the_method_does_not_beat_an_ablation():
    def run(*rows):
        return {"batches": [{"edits": e, "efficacy": eff, "retention_batch1": ret, "perplexity_drift": 0.01}
                            for e, eff, ret in rows]}

    rs = {"shipped": run((50, 0.9, 0.9), (100, 0.8, 0.7)),
          "full": run((50, 0.95, 0.8), (100, 0.9, 0.9), (150, 0.5, 0.5)),   # better at the 100 edits both reached
          "no_merge": run((50, 0.85, 0.95))}                               # stopped early: compared at 50
    full, no_merge = quality.against_ablations(rs, "shipped")
    assert "at 100 edits" in full and "does NOT beat" in full
    assert "at 50 edits" in no_merge and "beats it on efficacy" in no_merge and "retention" not in no_merge.split("(")[0]
    assert quality.against_ablations(rs, "projected") == []


def test_variants_that_come_to_the_same_policy_run_once():
    runs = [("counterfact", v) for v in ("shipped", "no_align", "no_merge", "full")]
    alias = quality.shared_runs(runs)
    shipped_aligns = "full" in alias  # whichever switch the shipped policy already has set
    assert alias.get(("counterfact", "no_align")) == ("counterfact", "shipped") or shipped_aligns
    assert ("counterfact", "no_merge") not in alias and ("counterfact", "shipped") not in alias
    assert quality.shared_runs([("same_subject", "no_align"), ("counterfact", "no_align")]) == {}


def test_a_variant_with_the_reference_policy_is_said_to_be_it_not_compared():
    run = {"batches": [{"edits": 50, "efficacy": 0.9, "retention_batch1": 0.9, "perplexity_drift": 0.01}]}
    (line,) = quality.against_ablations({"shipped": run, "no_align": run}, "shipped", {"no_align"})
    assert "the same policy as shipped" in line and "NOT" not in line


def test_quick_reads_report_the_slope_per_100_edits():
    import quality_quick

    assert quality_quick.slope([1, 2, 3], [0.02, 0.05, 0.08]) == pytest.approx(0.03)
    rows = [{"edits": e, "efficacy": 1.0, "drift_wikitext": d, "neighbors_unchanged": n}
            for e, d, n in ((100, 0.02, 0.9), (200, 0.05, 0.85), (300, 0.08, 0.8))]
    table = quality_quick.slope_table({"long": {"rows": rows, "base": "b"},
                                       "short": {"rows": rows[:2], "base": "b"}})
    assert "| long | b | 100, 200, 300 | +3.0% | -5.0% |" in table
    assert not any(line.startswith("| short") for line in table)


def test_the_long_horizon_run_resumes_where_a_kill_left_it(tiny_llama_dir, tiny_policy_factory, tmp_path):
    """Rows after every batch, evaluations every --every batches on a sample that keeps batch 1;
    started again it measures what a kill left unmeasured and goes on from the store's last batch."""
    import json

    import long_horizon

    out, work = tmp_path / "lh.md", tmp_path / "work"
    args = ["tiny", "--size", "2", "--every", "2", "--sample", "3", "--model", str(tiny_llama_dir),
            "--policy", str(tiny_policy_factory("llama")), "--work", str(work), "--out", str(out)]
    long_horizon.main(args + ["--batches", "2"])
    rows = json.loads(out.with_suffix(".json").read_text())["tiny"]["rows"]
    assert [r["edits"] for r in rows] == [2, 4] and "efficacy" not in rows[0] and "efficacy" in rows[1]
    assert "| tiny |" in out.read_text() and out.with_suffix(".png").exists()
    data = json.loads(out.with_suffix(".json").read_text())
    data["tiny"]["rows"].pop()                            # killed after batch 2 landed, before its row was saved
    out.with_suffix(".json").write_text(json.dumps(data))
    long_horizon.main(args + ["--batches", "3"])
    rows = json.loads(out.with_suffix(".json").read_text())["tiny"]["rows"]
    assert [r["edits"] for r in rows] == [2, 4, 6]
    assert rows[1]["push_seconds"] is None and "efficacy" in rows[1] and "efficacy" in rows[2]
    assert long_horizon.landed(work / "tiny.h5") == 3
    with pytest.raises(SystemExit, match="holds 3 batches of another run"):
        long_horizon.main(args + ["--batches", "4", "--push", '{"stop_patience": 2}'])


def test_the_long_horizon_sample_keeps_batch_one_and_draws_the_same_rest():
    import long_horizon

    pick = long_horizon.sampler(5)
    origin = [1, 1, 2, 2, 2, 3, 3, 3, 3]
    idx = pick(None, origin)
    assert idx[:2] == [0, 1] and len(idx) == 5 and idx == pick(None, origin)
