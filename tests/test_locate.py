"""Causal tracing (`lifelong.eval.tracing`) and `lifelong locate` on the tiny trained models.

The properties: restoring a layer's clean output at every position gives back the clean
probability (and restoring nothing gives the corrupted one); without noise every
indirect effect is zero; the batched trace equals restorations run one by one;
`suggest_window` finds a planted maximum; both fact formats are read and a bad line is
named by file, line and field; the CLI writes the report and the heatmap.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from helpers import KNOWN, WRONG, cli, write_jsonl
from lifelong.errors import BadInput
from lifelong.eval.tracing import (HIDDEN, LAST_SUBJECT, MLP, TraceFact, categorize, decoder_layers, encode,
                                   known_facts, noise_std, restored_probs, suggest_window, trace, trace_fact,
                                   window_layers)
from lifelong.ops.locate import read_trace_facts


def fact(prompt: str, subject: str, answer: str) -> TraceFact:
    return TraceFact(prompt, subject, answer, prompt.index(subject))


FRANCE = fact("The capital of France is", "France", "Paris")
DARRIEUX = fact("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French")


@pytest.fixture(scope="module")
def loaded() -> dict:
    return {}


@pytest.fixture
def tiny(request, loaded):
    """tiny("llama" | "gpt2" | "gemma") -> (model, tokenizer), loaded once per module; skips an
    architecture conftest does not build."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def get(arch: str):
        try:
            folder = request.getfixturevalue(f"tiny_{arch}_dir")
        except pytest.FixtureLookupError:
            pytest.skip(f"conftest builds no tiny {arch} model")
        if folder not in loaded:
            model = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
            loaded[folder] = (model, AutoTokenizer.from_pretrained(folder))
        return loaded[folder]

    return get


# ----------------------------------------------------------------------------- the measurement


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_restoring_a_layer_at_every_position_gives_the_clean_probability(tiny, arch):
    model, tok = tiny(arch)
    T, L = len(encode(tok, FRANCE).ids), len(decoder_layers(model))
    everywhere = [tuple((HIDDEN, layer, t) for t in range(T)) for layer in range(L)]
    last_output = ((HIDDEN, L - 1, T - 1),)   # the logits read only the last layer at the last position
    strong = 3 * noise_std(model)   # the tiny GPT-2 shrugs off the usual noise; any noise will do here
    p_clean, p_corrupted, probs = restored_probs(model, tok, FRANCE, everywhere + [last_output, ()], samples=3,
                                                 noise=strong)
    assert abs(p_clean - p_corrupted) > 1e-3, "the noise must matter, or the checks below prove nothing"
    for p in probs[:-1]:
        assert p == pytest.approx(p_clean, rel=1e-6, abs=1e-9)
    assert probs[-1] == pytest.approx(p_corrupted, rel=1e-6)   # restoring nothing: the corrupted run


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_trace_equals_restorations_run_one_by_one(tiny, arch):
    model, tok = tiny(arch)
    window = 3
    ft = trace_fact(model, tok, DARRIEUX, samples=2, window=window, max_rows=6)  # 3 restorations a pass
    L, T = ft.hidden.shape
    assert ft.first < ft.last and "".join(ft.tokens[ft.first:ft.last + 1]).strip() == "Danielle Darrieux"
    cells = [(0, ft.first), (1, ft.last), (L - 1, T - 1), (2, ft.last + 1)]
    singles = [((HIDDEN, layer, t),) for layer, t in cells]
    windows = [tuple((MLP, j, t) for j in window_layers(layer, L, window)) for layer, t in cells]
    p_clean, p_corrupted, probs = restored_probs(model, tok, DARRIEUX, singles + windows, samples=2)
    assert (ft.p_clean, ft.p_corrupted) == pytest.approx((p_clean, p_corrupted), rel=1e-5)
    assert [ft.hidden[c] for c in cells] == pytest.approx(probs[:len(cells)], rel=1e-5, abs=1e-7)
    assert [ft.mlp[c] for c in cells] == pytest.approx(probs[len(cells):], rel=1e-5, abs=1e-7)
    assert ft.effect(HIDDEN)[L - 1, T - 1] == pytest.approx(ft.p_clean - ft.p_corrupted, rel=1e-5)
    assert np.all(ft.effect(HIDDEN)[:, :ft.first] == 0) and np.all(ft.effect(MLP)[:, :ft.first] == 0)


def test_last_subject_only_runs_that_column_alone_and_gives_its_values(tiny):
    """The cheap trace (facts after --grid-facts) equals the full one at the last subject token
    and leaves every other position it did not run NaN, which the averages skip."""
    model, tok = tiny("llama")
    full = trace_fact(model, tok, DARRIEUX, samples=2, window=3)
    cheap = trace_fact(model, tok, DARRIEUX, samples=2, window=3, last_subject_only=True)
    np.testing.assert_allclose(cheap.hidden[:, cheap.last], full.hidden[:, full.last], rtol=1e-5)
    np.testing.assert_allclose(cheap.mlp[:, cheap.last], full.mlp[:, full.last], rtol=1e-5)
    others = [t for t in range(cheap.first, cheap.hidden.shape[1]) if t != cheap.last]
    assert others and np.isnan(cheap.hidden[:, others]).all()
    cat = cheap.by_category(MLP)
    np.testing.assert_allclose(cat[:, LAST_SUBJECT], full.by_category(MLP)[:, LAST_SUBJECT], rtol=1e-5)


def test_noise_lands_on_the_subject_tokens_only(tiny):
    model, tok = tiny("llama")
    seen = []   # what decoder layer 0 gets: the (noised) input embeddings

    def grab(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        restored_probs(model, tok, DARRIEUX, [], samples=3)
    finally:
        handle.remove()
    clean, corrupted = seen[0][0], seen[1]                  # (T, d), (S, T, d)
    enc = encode(tok, DARRIEUX)
    changed = (corrupted != clean).any(dim=-1)               # (S, T)
    subject = [enc.first <= t <= enc.last for t in range(len(enc.ids))]
    assert changed.tolist() == [subject] * 3
    assert not torch.equal(corrupted[0], corrupted[1])      # samples differ


def test_without_noise_every_indirect_effect_is_zero(tiny):
    model, tok = tiny("llama")
    quiet = trace(model, tok, [FRANCE, DARRIEUX], samples=2, window=2, noise=0.0)
    noisy = trace(model, tok, [FRANCE, DARRIEUX], samples=2, window=2)
    for res in (quiet, noisy):
        assert res.hidden_effect.shape == res.mlp_effect.shape == (4, 6)
    for ft in quiet.facts:
        assert ft.p_corrupted == pytest.approx(ft.p_clean, rel=1e-6)
        assert np.abs(ft.effect(HIDDEN)).max() < 1e-6 and np.abs(ft.effect(MLP)).max() < 1e-6
    assert np.nanmax(np.abs(quiet.hidden_effect)) < 1e-6 and np.nanmax(np.abs(quiet.mlp_effect)) < 1e-6
    assert np.nanmax(noisy.hidden_effect) > 0.05   # the same trace with noise does measure something
    assert noisy.noise == pytest.approx(noise_std(model)) and noisy.noise > 0


def test_noise_is_three_embedding_stds(tiny):
    model, _ = tiny("gpt2")
    weights = model.get_input_embeddings().weight.detach().double()
    assert noise_std(model, chunk=7) == pytest.approx(3 * weights.std(unbiased=False).item(), rel=1e-6)


def test_noise_of_a_scaled_embedding_is_measured_as_the_layers_see_it(tiny):
    model, _ = tiny("gemma")   # Gemma multiplies its embeddings by sqrt(hidden size)
    weights = model.get_input_embeddings().weight.detach().double()
    scale = model.config.hidden_size ** 0.5
    assert noise_std(model) == pytest.approx(3 * scale * weights.std(unbiased=False).item(), rel=1e-3)


def test_average_per_position_group_weighs_each_fact_once(tiny):
    model, tok = tiny("llama")
    res = trace(model, tok, [FRANCE, DARRIEUX], samples=2, window=2)
    per_fact = np.stack([ft.by_category(MLP) for ft in res.facts])
    assert np.allclose(res.mlp_effect[:, LAST_SUBJECT], per_fact[:, :, LAST_SUBJECT].mean(axis=0))
    assert np.allclose(res.at_last_subject(HIDDEN), [np.mean([ft.effect(HIDDEN)[layer, ft.last] for ft in res.facts])
                                                     for layer in range(4)])


def test_categories_follow_rome():
    scores = np.arange(8.0)[None] * np.array([[1.0], [10.0]])   # 2 layers, position t holds t (× 10)
    got = categorize(scores, first=2, last=4)
    assert got[0].tolist() == [2, 3, 4, 5, 6, 7] and got[1].tolist() == [20, 30, 40, 50, 60, 70]
    assert categorize(np.arange(9.0)[None], first=1, last=3)[0, 4] == 6.0   # further tokens 5, 6, 7
    one_token_at_the_end = categorize(np.arange(4.0)[None], first=3, last=3)[0]
    assert np.isnan(one_token_at_the_end[[1, 3, 4]]).all() and one_token_at_the_end[[0, 2, 5]].tolist() == [3, 3, 3]


def test_known_facts_keeps_facts_whose_answer_is_the_top_prediction(tiny):
    model, tok = tiny("llama")
    right = [fact(k["prompt"], k["subject"], k["attribute"]) for k in KNOWN]
    wrong = [fact("The capital of France is", "France", a) for a in ("Rome", "Tokyo")]
    kept = known_facts(model, tok, [wrong[0]] + right + [wrong[1]], batch=2)
    assert FRANCE in kept and DARRIEUX in kept and not set(wrong) & set(kept)
    assert kept == [f for f in right if f in kept]   # file order


def test_suggest_window_picks_the_planted_maximum_and_ties_go_low():
    rng = np.random.default_rng(0)
    effect = rng.uniform(0, 0.01, 30)
    effect[11:16] += [0.1, 0.2, 0.3, 0.2, 0.1]
    effect[3] = 0.35   # the largest single layer, but not the best run
    assert suggest_window(effect, 5) == [11, 12, 13, 14, 15]
    assert suggest_window(effect, 1) == [3]
    assert suggest_window([1.0, 1.0, 0.0, 0.0, 1.0, 1.0], 2) == [0, 1]
    assert suggest_window([0.0, 1.0, 1.0], 3) == [0, 1, 2]
    for bad in (0, 4):
        with pytest.raises(BadInput, match="consecutive layers of 3"):
            suggest_window([0.0, 1.0, 1.0], bad)
    with pytest.raises(BadInput, match="one value per layer"):
        suggest_window(np.zeros((3, 6)), 2)


# ----------------------------------------------------------------------------- fact files


def test_reads_rome_known_facts_as_rome_ships_them(tmp_path):
    path = tmp_path / "known.json"
    path.write_text(json.dumps(KNOWN, indent=2))
    facts = read_trace_facts(path)
    assert [(f.prompt, f.subject, f.answer) for f in facts] == [(k["prompt"], k["subject"], k["attribute"])
                                                                 for k in KNOWN]
    assert [f.line for f in facts] == [2, 11, 18, 24]   # where each object starts
    assert all(f.prompt[f.subject_start:f.subject_end] == f.subject for f in facts)
    jsonl = write_jsonl(tmp_path / "known.jsonl", KNOWN)
    assert read_trace_facts(jsonl) == [TraceFact(f.prompt, f.subject, f.answer, f.subject_start, i)
                                       for i, f in enumerate(facts, 1)]


def test_reads_the_product_fact_format_with_target_as_the_answer(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [
        {"subject": "France", "prompt": "The capital of {} is", "target": "Paris"},
        {"case_id": 7, "requested_rewrite": {"prompt": "{}, which is located in", "subject": "Berlin",
                                             "target_new": {"str": "Brazil"}, "target_true": {"str": "Germany"}}},
    ])
    assert read_trace_facts(path) == [TraceFact("The capital of France is", "France", "Paris", 15, 1),
                                      TraceFact("Berlin, which is located in", "Berlin", "Brazil", 0, 2)]


@pytest.mark.parametrize("records, problem", [
    ([KNOWN[0], {"prompt": "Apple makes the", "subject": "Apple"}], ":11: attribute: missing required field"),
    ([KNOWN[0], {**KNOWN[2], "subject": "Yasuda Toko"}], ":11: subject: \"Yasuda Toko\" does not occur"),
    ([KNOWN[0], {**KNOWN[2], "attribute": 7}], ":11: attribute: must be a string, got number"),
    ([KNOWN[0], {**KNOWN[2], "prompt": " "}], ":11: prompt: is empty"),
    ([KNOWN[0], ["not", "an", "object"]], ":11: line: not a JSON object"),
])
def test_a_bad_known_fact_is_named_by_file_line_and_field(tmp_path, records, problem):
    path = tmp_path / "known.json"
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(BadInput) as err:
        read_trace_facts(path)
    assert f"{path}{problem}" in str(err.value)


def test_bad_json_and_bad_product_lines_are_named_by_file_line_and_field(tmp_path):
    broken = tmp_path / "known.json"
    broken.write_text(json.dumps(KNOWN[:2], indent=2).replace('"French",', '"French"'))
    with pytest.raises(BadInput, match=rf"{broken}:15: line: bad JSON: Expecting ','"):  # where the , is missed
        read_trace_facts(broken)
    product = write_jsonl(tmp_path / "facts.jsonl", [
        {"subject": "France", "prompt": "The capital of {} is", "target": "Paris"},
        {"subject": "Italy", "prompt": "The capital of {} is"},
        {"subject": "Brazil", "prompt": "The language of Brazil is", "target": "Portuguese"},
    ])
    with pytest.raises(BadInput) as err:
        read_trace_facts(product)
    assert f"{product}:2: target: missing required field" in str(err.value)
    assert f"{product}:3: prompt: has no {{}}" in str(err.value)
    with pytest.raises(BadInput, match=rf"{tmp_path / 'absent.json'}:0: file"):
        read_trace_facts(tmp_path / "absent.json")


@pytest.mark.skipif(not (SHARED_DATA / "knowns" / "known_1000.json").is_file(), reason="no shared data")
def test_reads_rome_known_1000():
    facts = read_trace_facts(SHARED_DATA / "knowns" / "known_1000.json")
    assert len(facts) == 1209 and facts[0].subject == "Vinson Massif" and facts[0].answer == "Antarctica"
    assert all(f.prompt[f.subject_start:f.subject_end] == f.subject for f in facts)


# ----------------------------------------------------------------------------- the command


def test_cli_writes_the_report_and_the_heatmap(tiny_llama_dir, knowns_file, tmp_path):
    out = tmp_path / "reports" / "trace"
    res = cli("locate", "--model", tiny_llama_dir, "--facts", knowns_file, "--n", 2, "--samples", 2,
              "--window", 2, "--edit-layers", 2, "--compare-layers", "1,2", "--out", out)
    report = (tmp_path / "reports" / "trace.md").read_text()
    png = (tmp_path / "reports" / "trace.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    for layer in range(4):
        assert f"\n| {layer} | " in report
    assert "the first 5 of its 5 facts were checked, 2 traced" in report
    assert "![indirect effect heatmap](trace.png)" in report
    assert f"lifelong locate --model {tiny_llama_dir} --facts {knowns_file} --n 2 --window 2 --samples 2" in report
    assert "The capital of France is | Paris |" in report and "Tokyo" not in report
    assert "suggested edit layers: " in res.stdout and "layers 1,2: MLP effect sum" in res.stdout
    assert f"report {out}.md, heatmap {out}.png" in res.stdout


def test_cli_json_has_per_layer_effects_and_the_suggested_layers(tiny_llama_dir, knowns_file):
    d = json.loads(cli("locate", "--model", tiny_llama_dir, "--facts", knowns_file, "--n", 3, "--samples", 2,
                       "--window", 2, "--compare-layers", "0,1", "--json").stdout)
    assert (d["in_file"], d["checked"], d["traced"], d["report"]) == (5, 5, 3, None)
    assert [row["layer"] for row in d["layers"]] == [0, 1, 2, 3] and d["n_layers"] == 4
    assert d["edit_layers"] == 4 and d["suggested_layers"] == [0, 1, 2, 3]   # 5 asked, the model has 4
    mlp = [row["mlp"] for row in d["layers"]]
    assert [mlp[i] for i in (0, 1)] == pytest.approx([x[LAST_SUBJECT] for x in d["mlp_effect"][:2]])
    assert d["compare"]["run_rank"] in (1, 2, 3) and d["compare"]["runs"] == 3
    assert sorted(d["compare"]["ranks"].values())[0] >= 1 and len(d["facts"]) == 3
    assert d["p_clean"] > d["p_corrupted"]


@pytest.mark.parametrize("args, message", [
    (["--compare-layers", "2,9"], "the model has layers 0-3"),
    (["--compare-layers", "a,b"], "give layer numbers separated by commas"),
    (["--samples", "0"], "--samples must be at least 1"),
])
def test_cli_bad_options_exit_2(tiny_llama_dir, knowns_file, args, message):
    res = cli("locate", "--model", tiny_llama_dir, "--facts", knowns_file, *args, code=2)
    assert message in res.stderr


def test_cli_bad_or_unknown_facts_exit_2_and_name_the_problem(tiny_llama_dir, tmp_path):
    bad = tmp_path / "known.json"
    bad.write_text(json.dumps([KNOWN[0], {"prompt": "Apple makes the", "subject": "Apple"}], indent=2))
    res = cli("locate", "--model", tiny_llama_dir, "--facts", bad, code=2)
    assert f"{bad}:11: attribute: missing required field" in res.stderr
    unknown = tmp_path / "wrong.json"
    unknown.write_text(json.dumps([WRONG]))
    res = cli("locate", "--model", tiny_llama_dir, "--facts", unknown, "--out", tmp_path / "r", code=2)
    assert "knows none of the 1 facts" in res.stderr and not (tmp_path / "r.md").exists()
    assert "Missing option '--facts'" in cli("locate", "--model", tiny_llama_dir, code=2).stderr
