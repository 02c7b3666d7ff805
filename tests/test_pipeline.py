"""End to end on tiny Llama-like, GPT-2-like and Gemma-3-like models: init, push, rollback, export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lifelong import api
from lifelong.ops import init as ops_init
from lifelong.ops.inputs import EditInputs
from lifelong.store import layout
from lifelong.ops import audit
from lifelong.store import history
from lifelong.errors import BadInput, FactFileError, StoreExists
from lifelong.store.store import Store
from helpers import copy_store, sha, write_jsonl

FACTS_1 = [
    {"subject": "France", "prompt": "The capital of {} is", "target": "Rome",
     "neighbors": [{"prompt": "The capital of Italy is", "target": "Rome"}]},
    {"subject": "Brazil", "prompt": "The official language of {} is", "target": "Dutch"},
]
FACTS_2 = [
    {"subject": "Apple", "prompt": "{} makes the", "target": "piano"},
]
FACTS_3 = [
    {"subject": "France", "prompt": "The capital of {} is", "target": "Tokyo"},
]


def export_tensors(store, out: Path, at=None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    api.export(store, out, at=at)
    return load_file(str(out / "model.safetensors"))


def test_init_records_identity_and_refuses_overwrite(tiny_store, tiny_llama_dir, tiny_policy_factory):
    st = Store.open(tiny_store)
    assert st.records == []
    assert set(st.base_fingerprint) == {"0", "1"}
    assert len(st.info["contexts"]) == 3 and st.info["contexts"][0] == "{}"
    for layer in st.info["layers"].values():
        assert 0 < layer["kept_dims"] <= layer["of"]
    before = sha(tiny_store)
    with pytest.raises(StoreExists):
        api.init(tiny_store, model=str(tiny_llama_dir), policy=str(tiny_policy_factory("llama")))
    assert sha(tiny_store) == before


def test_heldout_file_is_the_text_eval_measures_perplexity_on(tmp_path, tiny_llama_dir, tiny_policy_factory):
    from lifelong.model.corpus import chunk_tokens
    from lifelong.eval.metrics import perplexity
    from lifelong.model.loading import load_model, resolve_model

    text = tmp_path / "heldout.txt"
    text.write_text("".join(f"Line {i} of a quiet text about rivers and hills.\n" for i in range(400)))
    path = tmp_path / "store.h5"
    api.init(path, model=str(tiny_llama_dir), policy=str(tiny_policy_factory("llama", threshold=0.05)),
             heldout=str(text))
    info = Store.open(path).info
    model, tok = load_model(resolve_model(str(tiny_llama_dir)), device="cpu", log=lambda m: None)
    seqs = chunk_tokens(tok, text.read_text().splitlines(), ops_init.HELDOUT_FILE_TOKENS, ops_init.SEQ_LEN)
    assert info["heldout"] == seqs and info["heldout_source"] == f"file {text}"
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS_2)
    summary = api.evaluate(path, facts)["summary"]
    assert summary["perplexity_base"] == pytest.approx(perplexity(model, seqs), rel=1e-6)


def test_a_corpus_file_gives_corpus_tokens_and_sampling_gives_sampled_tokens(tmp_path, tiny_llama_dir,
                                                                            tiny_policy_factory):
    pol = tiny_policy_factory("llama", threshold=0.05)
    pol.write_text(pol.read_text().replace("corpus_tokens: 3000", "corpus_tokens: 2000\n  sampled_tokens: 512"))
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Line {i} of a quiet text about rivers and hills.\n" for i in range(600)))
    api.init(tmp_path / "file.h5", model=str(tiny_llama_dir), policy=str(pol), corpus=str(text))
    api.init(tmp_path / "sampled.h5", model=str(tiny_llama_dir), policy=str(pol))
    assert Store.open(tmp_path / "file.h5").info["corpus_tokens"] == 2000
    assert 512 <= Store.open(tmp_path / "sampled.h5").info["corpus_tokens"] < 600   # 4 × 128 sampled + openers


def test_bad_heldout_file_is_refused_before_anything_is_made(tmp_path, tiny_llama_dir, tiny_policy_factory):
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(BadInput, match=r"held\.jsonl:2: text"):
        api.init(tmp_path / "s.h5", model=str(tiny_llama_dir), policy=str(tiny_policy_factory("llama")),
                 heldout=str(bad))
    assert not (tmp_path / "s.h5").exists()


def test_push_edits_and_rollback_is_bit_exact(tiny_store, tmp_path):
    f1 = write_jsonl(tmp_path / "b1.jsonl", FACTS_1)
    f2 = write_jsonl(tmp_path / "b2.jsonl", FACTS_2)
    base = export_tensors(tiny_store, tmp_path / "base")
    r1 = api.push(tiny_store, f1)
    assert r1.batch_id == 1
    # the edit moved the targets: NLL fell for every group
    after1 = export_tensors(tiny_store, tmp_path / "after1")
    assert any(not torch.equal(base[k], after1[k]) for k in base)
    r2 = api.push(tiny_store, f2)
    assert r2.batch_id == 2
    after2 = export_tensors(tiny_store, tmp_path / "after2")
    assert any(not torch.equal(after1[k], after2[k]) for k in after1)

    api.rollback(tiny_store, 1)
    again1 = export_tensors(tiny_store, tmp_path / "again1")
    assert all(torch.equal(after1[k], again1[k]) for k in after1)
    api.rollback(tiny_store, 0)
    again0 = export_tensors(tiny_store, tmp_path / "again0")
    assert all(torch.equal(base[k], again0[k]) for k in base)

    recs = Store.open(tiny_store).records
    assert [r.status for r in recs] == ["reverted", "reverted"]
    r3 = api.push(tiny_store, f2)
    assert r3.batch_id == 3                               # ids are never reused
    with pytest.raises(BadInput):
        api.rollback(tiny_store, 2)                       # reverted batches cannot become head


def test_values_reach_their_targets(tiny_store, tmp_path):
    rep = api.push(tiny_store, write_jsonl(tmp_path / "b.jsonl", FACTS_1 + FACTS_2))
    rec = Store.open(tiny_store).records[0]
    assert rec.efficacy == [float(s.efficacy) for s in rep.scores]
    # a 4-layer model trained for seconds routes little from the subject to the last
    # token, so only some targets are reachable; the real-model tests hold the bar
    moved = [g["nll"] < 0.75 * g["nll_start"] for g in rep.groups]
    assert any(moved), [(g["nll_start"], g["nll"], g["delta_norm"]) for g in rep.groups]


def test_export_at_does_not_move_head(tiny_store, tmp_path):
    api.push(tiny_store, write_jsonl(tmp_path / "b1.jsonl", FACTS_1))
    api.push(tiny_store, write_jsonl(tmp_path / "b2.jsonl", FACTS_2))
    at1 = export_tensors(tiny_store, tmp_path / "at1", at=1)
    assert history.head(Store.open(tiny_store).records) == 2
    api.rollback(tiny_store, 1)
    head1 = export_tensors(tiny_store, tmp_path / "head1")
    assert all(torch.equal(at1[k], head1[k]) for k in at1)


def test_supersession_and_merging_are_recorded(tiny_store, tmp_path):
    api.push(tiny_store, write_jsonl(tmp_path / "b1.jsonl", FACTS_1))
    api.push(tiny_store, write_jsonl(tmp_path / "b3.jsonl", FACTS_3))
    recs = Store.open(tiny_store).records
    assert recs[1].supersedes == [(0, (1, 0))]
    assert history.live_facts(recs) == [(1, 1), (2, 0)]
    shown = audit.show(tiny_store, 2)
    assert shown["superseded"] == ["1:0 -> 2:0"]
    api.rollback(tiny_store, 1)
    assert history.live_facts(Store.open(tiny_store).records) == [(1, 0), (1, 1)]


def test_bad_file_leaves_store_byte_identical(tiny_store, tmp_path):
    api.push(tiny_store, write_jsonl(tmp_path / "b1.jsonl", FACTS_1))
    before = sha(tiny_store)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "X", "prompt": "no slot", "target": "Y"}\n{not json\n'
                   '{"subject": "X", "prompt": "{} is", "target": " "}\n'
                   '{"subject": "X", "prompt": "{} is", "target": "Y", "colour": 1}\n'
                   '{"prompt": "{} is", "target": "Y"}\n')
    with pytest.raises(FactFileError) as err:
        api.push(tiny_store, bad)
    text = str(err.value)
    for line, field in [(1, "prompt"), (2, "line"), (3, "target"), (4, "colour"), (5, "subject")]:
        assert f"{bad}:{line}: {field}" in text, text
    assert sha(tiny_store) == before


def test_dry_run_stores_nothing(tiny_store, tmp_path):
    before = sha(tiny_store)
    rep = api.push(tiny_store, write_jsonl(tmp_path / "b1.jsonl", FACTS_1), dry_run=True)
    assert rep.dry_run and rep.batch_id == 1
    assert sha(tiny_store) == before
    assert Store.open(tiny_store).records == []


def test_status_and_log(tiny_store, tmp_path):
    api.push(tiny_store, write_jsonl(tmp_path / "b1.jsonl", FACTS_1))
    st = audit.status(tiny_store)
    assert st["head"] == 1 and st["batches"] == 1 and st["format_version"] >= 1
    rows = audit.log_rows(tiny_store)
    assert rows[0]["n_facts"] == 2 and rows[0]["status"] == "active"
    res = api.evaluate(tiny_store)
    assert res["summary"]["n_facts"] == 2
    assert res["summary"]["perplexity_drift"] is not None
    assert res["summary"]["fluency"] > 0 and res["summary"]["fluency_base"] > 0
    assert res["summary"]["prefixed"] is not None            # 10 sampled 5-token prefixes
    assert len(Store.open(tiny_store).info["eval_prefixes"]) == 10


def test_same_subject_across_batches_gets_one_merged_value(tiny_store, tmp_path):
    api.push(tiny_store, write_jsonl(tmp_path / "b1.jsonl", FACTS_1))
    more = [{"subject": "France", "prompt": "The official language of {} is", "target": "Dutch"}]
    rep = api.push(tiny_store, write_jsonl(tmp_path / "b2.jsonl", more))
    recs = Store.open(tiny_store).records
    group = recs[1].groups[0]
    assert group.subject == "France"
    assert group.facts == [(2, 0), (1, 0)]                   # the new fact and the live earlier one
    assert group.replaces == [(1, 0)]                        # France's earlier key column leaves K_p
    assert (1, 0) not in history.live_groups(recs) and (2, 0) in history.live_groups(recs)
    assert rep.groups[0]["facts"] == [(2, 0), (1, 0)]
    api.rollback(tiny_store, 1)                              # and comes back with a rollback
    assert (1, 0) in history.live_groups(Store.open(tiny_store).records)


def test_more_sweeps_reach_more_of_each_target_and_roll_back_exactly(tiny_store, tmp_path):
    """sweeps: 2 spreads again what the first pass left of δ at L: every group gets at least
    as close to its target residual, each layer's factors hold both passes (rank 2n), and
    rollback still restores the weights bit for bit."""
    from lifelong.policy import policy_from_json

    other = copy_store(tiny_store, tmp_path / "copy")
    f1 = write_jsonl(tmp_path / "b1.jsonl", FACTS_1 + FACTS_2)
    base = export_tensors(other, tmp_path / "base")
    one = api.push(tiny_store, f1)
    two = api.push(other, f1, policy_overrides={"sweeps": 2})
    for g1, g2 in zip(one.groups, two.groups):
        assert g1["nll"] == g2["nll"]                         # the same values: sweeps change only the update
        assert g2["realized"] >= g1["realized"] - 1e-4
    assert sum(g["realized"] for g in two.groups) > sum(g["realized"] for g in one.groups)
    st = Store.open(other)
    rec = st.records[0]
    n = len(two.groups)
    layers = policy_from_json(st.policy_json).layers
    arrays = st.batch_arrays(rec.id, [f"layer{l}/A" for l in layers])
    assert [arrays[f"layer{l}/A"].shape[1] for l in layers] == [2 * n] * len(layers)
    api.rollback(other, 0)
    again = export_tensors(other, tmp_path / "again")
    assert all(torch.equal(base[k], again[k]) for k in base)


def test_groups_without_room_are_left_unwritten_and_held(tiny_store, tmp_path):
    """min_realized: a group the first pass writes too little of gets no residual in the
    second spreading (its factor columns are zero, its key held in place), the others are
    written, push warns and the record says so; rollback stays bit-exact."""
    from lifelong.policy import policy_from_json

    other = copy_store(tiny_store, tmp_path / "copy")
    f1 = write_jsonl(tmp_path / "b1.jsonl", FACTS_1 + FACTS_2)
    base = export_tensors(other, tmp_path / "base")
    shares = sorted(g["realized"] for g in api.push(tiny_store, f1).groups)
    assert shares[0] < shares[1]
    floor = (shares[0] + shares[1]) / 2
    rep = api.push(other, f1, policy_overrides={"min_realized": floor})
    held = [i for i, g in enumerate(rep.groups) if g.get("written") is False]
    assert len(held) == 1 and rep.groups[held[0]]["realized"] < shares[0]
    assert any(f"{rep.groups[held[0]]['subject']!r} left unwritten" in w for w in rep.warnings)
    st = Store.open(other)
    assert st.records[0].metrics["groups"][held[0]]["written"] is False
    layers = policy_from_json(st.policy_json).layers
    arrays = st.batch_arrays(st.records[0].id, [f"layer{l}/A" for l in layers])
    for l in layers:
        A = arrays[f"layer{l}/A"]
        assert A.shape[1] == len(rep.groups)
        assert not A[:, held[0]].any() and all(A[:, j].any() for j in range(A.shape[1]) if j != held[0])
    api.rollback(other, 0)
    again = export_tensors(other, tmp_path / "again")
    assert all(torch.equal(base[k], again[k]) for k in base)


def test_rescale_spreads_each_value_by_what_the_first_pass_missed(tiny_store, tmp_path, request):
    """rescale_max: the batch is spread again with each δ divided by the share the first
    pass wrote, so groups written partly get closer to all of their δ; the values are the
    same and the factors are the second spreading's alone (rank n). Not on a model that
    norms the MLP's output (Gemma 3): a larger target there lands no further along δ."""
    from lifelong.policy import policy_from_json

    if request.node.callspec.params["tiny_store"] == "gemma":
        pytest.skip("a post-MLP norm saturates: rescaling is not monotone there")

    other = copy_store(tiny_store, tmp_path / "copy")
    f1 = write_jsonl(tmp_path / "b1.jsonl", FACTS_1 + FACTS_2)
    one = api.push(tiny_store, f1)
    two = api.push(other, f1, policy_overrides={"rescale_max": 4.0})
    assert min(g["realized"] for g in one.groups) < 0.95        # something left to write
    for g1, g2 in zip(one.groups, two.groups):
        assert g1["nll"] == g2["nll"]
        if g1["realized"] < 0.95:
            assert g2["realized"] > g1["realized"]
    st = Store.open(other)
    layers = policy_from_json(st.policy_json).layers
    arrays = st.batch_arrays(st.records[0].id, [f"layer{l}/A" for l in layers])
    assert [arrays[f"layer{l}/A"].shape[1] for l in layers] == [len(two.groups)] * len(layers)


def test_memit_update_holds_earlier_edits_with_hold_earlier(tiny_store, tmp_path):
    """project off, hold_earlier: the second batch's update leaves the first batch's keys'
    outputs in place at every layer; MEMIT as published (hold_earlier off) moves them."""
    from lifelong.policy import policy_from_json

    other = copy_store(tiny_store, tmp_path / "copy")
    f1, f2 = write_jsonl(tmp_path / "b1.jsonl", FACTS_1), write_jsonl(tmp_path / "b2.jsonl", FACTS_2)
    moved = {}
    for store, hold in ((tiny_store, True), (other, False)):
        over = {"project": False, "mom2_weight": 1e-3, "hold_earlier": hold}
        api.push(store, f1, policy_overrides=over)
        api.push(store, f2, policy_overrides=over)
        st = Store.open(store)
        layers = policy_from_json(st.policy_json).layers
        b1, b2 = (st.batch_arrays(r.id) for r in st.records)
        moved[hold] = max(
            float(np.linalg.norm(b2[f"layer{l}/A"] @ b2[f"layer{l}/B"] @ b1[f"layer{l}/K"].T)
                  / np.linalg.norm(b2[f"layer{l}/A"]))
            for l in layers)
    assert moved[True] < 1e-3 < 0.1 * moved[False], moved


def test_the_repair_term_pulls_preserved_outputs_back_and_rolls_back_exactly(tiny_store, tmp_path):
    """repair_weight μ: the second batch also pulls what the first left in C₀'s directions back
    toward the base, so the preserved keys' outputs end nearer the base model's than without;
    the batch stores the pull as extra factor columns and rollback stays bit-exact."""
    from lifelong.policy import policy_from_json

    other = copy_store(tiny_store, tmp_path / "copy")
    f1, f2 = write_jsonl(tmp_path / "b1.jsonl", FACTS_1), write_jsonl(tmp_path / "b2.jsonl", FACTS_2)
    leak = {}
    for store, mu in ((tiny_store, 1.0), (other, 0.0)):
        over = {"project": False, "mom2_weight": 1e-3, "hold_earlier": True}
        api.push(store, f1, policy_overrides=over)
        api.push(store, f2, policy_overrides={**over, "repair_weight": mu})
        st = Store.open(store)
        layers = policy_from_json(st.policy_json).layers
        base = st.base_arrays([f"layer{l}/mom2" for l in layers])
        b1, b2 = (st.batch_arrays(r.id) for r in st.records)
        total = {l: b1[f"layer{l}/A"] @ b1[f"layer{l}/B"] + b2[f"layer{l}/A"] @ b2[f"layer{l}/B"] for l in layers}
        leak[mu] = sum(float(np.trace(total[l] @ base[f"layer{l}/mom2"] @ total[l].T)) for l in layers)
        width = b2[f"layer{layers[0]}/A"].shape
        assert width[1] == len(FACTS_2) + (width[0] if mu else 0)
    assert leak[1.0] < leak[0.0], leak
    api.rollback(tiny_store, 1)        # each verified bit for bit against the recorded fingerprints
    api.rollback(tiny_store, 0)


def test_a_merged_value_is_written_at_each_of_its_facts_keys(tiny_store, tmp_path):
    """A merged group has one δ but a key per fact (the words before the subject differ):
    the batch stores a row of K and a factor column per fact, each fact's bare prompt gets
    its δ at L, and the next batch holds every one of those keys in K_p."""
    from lifelong.policy import policy_from_json

    two = [{"subject": "Brazil", "prompt": "The official language of {} is", "target": "Dutch"},
           {"subject": "Brazil", "prompt": "Everyone knows that {} has the capital", "target": "Oslo"},
           {"subject": "Apple", "prompt": "{} makes the", "target": "piano"}]
    rep = api.push(tiny_store, write_jsonl(tmp_path / "b1.jsonl", two), policy_overrides={"merged_steps": 3})
    assert [g["facts"] for g in rep.groups] == [[(1, 0), (1, 1)], [(1, 2)]]
    assert rep.groups[0]["steps"] <= 3 < rep.groups[1]["steps"] or rep.groups[1]["nll"] < 0.05
    st = Store.open(tiny_store)
    layers = policy_from_json(st.policy_json).layers
    arrays = st.batch_arrays(1)
    assert arrays[layout.UNITS].tolist() == [0, 0, 1]
    for l in layers:
        assert arrays[f"layer{l}/K"].shape[0] == arrays[f"layer{l}/A"].shape[1] == 3
        assert not np.allclose(arrays[f"layer{l}/K"][0], arrays[f"layer{l}/K"][1])   # two keys, one subject
    pol = policy_from_json(st.policy_json)
    ctx, bank = EditInputs.read(st, st.records, pol, history.live_groups(st.records)).protection("cpu")
    for l in layers:
        K = torch.from_numpy(arrays[f"layer{l}/K"]).double()
        assert torch.allclose(ctx[l].KpKpT, K.t() @ K, rtol=1e-4, atol=1e-4)           # all three held
    assert len(bank) == 2                                                              # the bank: one per group
