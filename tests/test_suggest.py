"""`lifelong policy suggest`: the carry-over rules on small matrices, and the command on the
tiny trained models (the written file is a policy `init` takes unchanged)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import cli, write_jsonl
from lifelong import api
from lifelong.edit import calibration
from lifelong.edit.calibration import REFERENCE, Reference
from lifelong.errors import BadInput
from lifelong.model.loading import load_model, resolve_model
from lifelong.ops.suggest import mlp_output_template
from lifelong.policy import load_policy


def test_bulk_share_leaves_out_the_massive_channels_only():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 64, generator=g)
    assert calibration.bulk_share(h) == (pytest.approx(1.0), 0)
    h[:, 5] += 300.0                                      # one massive channel, as in Gemma's stream
    share, n = calibration.bulk_share(h)
    assert n == 1
    expect = (h[:, torch.arange(64) != 5].norm(dim=1) / h.norm(dim=1)).median()
    assert share == pytest.approx(float(expect)) and share < 0.05


def test_mahalanobis_is_k_cinv_k():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    C = A @ A.T + 0.5 * torch.eye(8, dtype=torch.float64)
    K = torch.randn(5, 8, generator=g, dtype=torch.float64)
    want = torch.einsum("nd,de,ne->n", K, torch.linalg.inv(C), K)
    assert torch.allclose(calibration.mahalanobis(K, C), want, rtol=1e-9)


def test_a_lone_key_is_written_with_the_share_m_over_m_plus_lambda():
    """Why λ is set against kᵀC₀⁻¹k: the ridge solve writes a lone key with m/(m+λ)."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    C = A @ A.T / 6 + 0.1 * torch.eye(6, dtype=torch.float64)
    k = torch.randn(6, 1, generator=g, dtype=torch.float64)
    lam = 3.0
    written = float(k.T @ torch.linalg.solve(lam * C + k @ k.T, k))   # Δk for Δ = r kᵀ(λC + kkᵀ)⁻¹, r = 1
    m = float(calibration.mahalanobis(k.T, C)[0])
    assert written == pytest.approx(m / (m + lam), rel=1e-9)


def test_threshold_keeps_at_most_the_energy_at_every_layer():
    eig = {0: np.array([1.0, 2.0, 3.0, 4.0]), 1: np.array([0.5, 0.5, 1.0, 8.0])}
    # layer 0: cumulative .1 .3 .6 1 -> two directions fit .3: threshold 3; layer 1: .05 .1 .2 1 -> 3 fit: 8
    assert calibration.threshold_for(eig, 0.3) == 3.0
    for ev in eig.values():
        assert calibration.kept_energy(ev, 3.0) <= 0.3
    # a layer whose smallest direction already holds more still keeps one direction
    assert calibration.threshold_for({0: np.array([5.0, 1.0, 1.0])}, 0.01) == 1.0


def test_the_rules_give_back_the_reference_on_its_own_measurements():
    assert calibration.step_size_for(REFERENCE.bulk_share) == pytest.approx(REFERENCE.step_size)
    assert calibration.mom2_weight_for(REFERENCE.key_mahalanobis) == pytest.approx(REFERENCE.mom2_weight)
    ref = Reference(step_size=0.1, bulk_share=0.5)
    assert calibration.step_size_for(0.05, ref) == pytest.approx(0.01)   # massive channels: smaller steps


def test_the_step_is_calibrated_to_the_reference_s_steps_per_value():
    ref = Reference(value_steps=8.0)
    assert calibration.calibrated_step(0.02, 4.0, ref) == pytest.approx(0.01)       # coarse: halve it
    assert calibration.calibrated_step(0.02, 24.0, ref) == pytest.approx(0.06)      # fine: triple it
    assert calibration.calibrated_step(0.02, 10.0, ref) is None                     # within the band: keep it
    assert calibration.calibrated_step(0.02, 8.0 / calibration.STEP_BAND, ref) is None
    assert calibration.calibrated_step(0.08, 0.1, ref) == pytest.approx(0.08 / calibration.STEP_RANGE)


@pytest.mark.parametrize("arch, template", [("llama", "model.layers.{}.mlp.down_proj"),
                                            ("gpt2", "transformer.h.{}.mlp.c_proj"),
                                            ("gemma", "model.layers.{}.mlp.down_proj")])
def test_the_mlp_output_matrix_is_found_per_family(request, arch, template):
    model, _ = load_model(resolve_model(str(request.getfixturevalue(f"tiny_{arch}_dir"))), log=lambda *a: None)
    assert mlp_output_template(model) == template


def test_suggest_traces_writes_a_policy_init_takes_unchanged(tiny_llama_dir, knowns_file, tmp_path):
    out = tmp_path / "policies" / "tiny.yaml"
    res = cli("policy", "suggest", "--model", tiny_llama_dir, "--facts", knowns_file, "--n", 3,
              "--edit-layers", 2, "--out", out)
    text = out.read_text()
    assert text.startswith("# ") and "causal tracing of 3 known facts" in text
    assert "values.step_size" in text and "update.mom2_weight" in text and "nullspace_threshold" in text
    pol = load_policy(out)
    assert len(pol.layers) == 2 and pol.layers[1] == pol.layers[0] + 1
    assert pol.module_template == "model.layers.{}.mlp.down_proj"
    assert pol.values.step_size > 0 and pol.update.mom2_weight > 0
    assert f"wrote {out}" in res.stdout
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris. Toko Yasuda plays the guitar.\n" * 40)
    store = api.init(tmp_path / "s.h5", model=str(tiny_llama_dir), policy=str(out), corpus=str(corpus),
                     log=lambda *a: pytest.fail(f"init warned: {a}") if "warning" in str(a[0]) else None)
    assert store.info["layers"].keys() == {str(x) for x in pol.layers}


def test_suggest_with_layers_json_and_the_self_check(tiny_gpt2_dir, knowns_file, tmp_path):
    facts = tmp_path / "edits.jsonl"
    write_jsonl(facts, [{"subject": "Toko Yasuda", "prompt": "{} plays the", "target": " piano"},
                        {"subject": "Apple", "prompt": "{} makes the", "target": " guitar"}])
    d = json.loads(cli("policy", "suggest", "--model", tiny_gpt2_dir, "--facts", knowns_file, "--layers", "1,2",
                       "--check", 2, "--check-facts", facts, "--json").stdout)
    assert d["layers"] == [1, 2] and d["trace"] is None and d["out"] is None
    assert d["module_template"] == "transformer.h.{}.mlp.c_proj"
    m, check = d["measured"], d["check"]
    bulk_step = calibration.step_size_for(m["bulk_share"])
    assert check["step"] == pytest.approx(bulk_step, rel=1e-2) and check["value_steps"] > 0
    expect = calibration.calibrated_step(check["step"], check["value_steps"])
    assert check["calibrated_step"] == (None if expect is None else pytest.approx(expect, rel=1e-2))
    assert d["policy"]["values"]["step_size"] == pytest.approx(check["calibrated_step"] or bulk_step, rel=1e-2)
    assert d["policy"]["update"]["mom2_weight"] == pytest.approx(calibration.mom2_weight_for(m["key_mahalanobis"]),
                                                                 rel=1e-2)
    rows = check["batches"]
    assert [r["facts"] for r in rows] == [1, 1]
    assert all(r["efficacy"] in (0.0, 1.0) and r["neighbors_unchanged"] is None for r in rows)   # no neighbors given


@pytest.mark.parametrize("args, message", [
    (["--check", "4"], "--check needs --check-facts"),
    (["--layers", "0,9"], "give increasing layers within 0-3"),
])
def test_bad_options_are_named(tiny_llama_dir, knowns_file, args, message):
    res = cli("policy", "suggest", "--model", tiny_llama_dir, "--facts", knowns_file, *args, code=2)
    assert message in res.stderr


def test_a_check_file_with_too_few_facts_is_named(tiny_llama_dir, knowns_file, tmp_path):
    facts = tmp_path / "one.jsonl"
    write_jsonl(facts, [{"subject": "Apple", "prompt": "{} makes the", "target": " guitar"}])
    with pytest.raises(BadInput, match=f"{facts}: holds 1 facts, --check asks for 4"):
        api.suggest(str(tiny_llama_dir), knowns_file, check=4, check_facts=facts)


def test_a_step_off_the_reference_s_granularity_is_calibrated_and_both_batches_rerun(
        tiny_llama_dir, knowns_file, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "STEP_BAND", 1.0)         # any difference from the reference calibrates
    facts = write_jsonl(tmp_path / "edits.jsonl",
                        [{"subject": "Toko Yasuda", "prompt": "{} plays the", "target": " piano"},
                         {"subject": "Apple", "prompt": "{} makes the", "target": " guitar"}])
    out = tmp_path / "tiny.yaml"
    res = api.suggest(str(tiny_llama_dir), knowns_file, out=out, layers=[1, 2], check=2, check_facts=facts)
    check = res["check"]
    new = check["calibrated_step"]
    assert new is not None and new != check["step"]
    assert new == pytest.approx(calibration.calibrated_step(check["step"], check["value_steps"]), rel=1e-2)
    assert load_policy(out).values.step_size == new
    assert f"Calibrated to {new:g}" in out.read_text() and "Checked on 2 of your facts" in out.read_text()
    assert [r["batch"] for r in check["batches"]] == [1, 2]   # the first batch's first push is not reported
