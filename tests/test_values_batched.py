"""Joint optimization of many groups equals optimizing them one by one."""
from __future__ import annotations

import logging

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lifelong.facts import Fact
from lifelong.policy import Policy
from lifelong.edit.values_batched import optimize_values_batched
from lifelong.edit.values_fast import optimize_value_fast

GROUPS = [
    [Fact(subject="France", prompt="The capital of {} is", target="Rome", relation="capital")],
    [Fact(subject="Apple", prompt="{} makes the", target="piano", relation="makes"),
     Fact(subject="Apple", prompt="{} was founded in", target="Tokyo", relation="founded")],
    [Fact(subject="Brazil", prompt="The official language of {} is", target="Dutch", relation="lang")],
]
CONTEXTS = ["{}", "Because the river. {}"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("early_stop", [0.0, 0.97])
def test_joint_equals_one_by_one(arch, early_stop, tiny_llama_dir, tiny_gpt2_dir, tiny_gemma_dir, caplog):
    path = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "gemma": tiny_gemma_dir}[arch]
    model = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    template = "transformer.h.{}.mlp.c_proj" if arch == "gpt2" else "model.layers.{}.mlp.down_proj"
    layer = "transformer.h.1" if arch == "gpt2" else "model.layers.1"
    policy = Policy(name="t", model="t", source="t", module_template=template, layers=[0, 1], steps=8,
                    lr=0.5, clamp_norm_factor=3.0, weight_decay=0.1, early_stop_loss=0.0, align=False)
    if early_stop:  # stop when a group's NLL falls to `early_stop` × the lowest starting NLL
        start = optimize_values_batched(model, tok, GROUPS, CONTEXTS, layer, policy.with_overrides(steps=1))
        policy = policy.with_overrides(early_stop_loss=early_stop * min(r.nll_start for r in start))
    with caplog.at_level(logging.WARNING, logger="lifelong"):
        joint = optimize_values_batched(model, tok, GROUPS, CONTEXTS, layer, policy, wave=2)
    assert not caplog.records, "the joint loop fell back"
    for i, (facts, j) in enumerate(zip(GROUPS, joint)):
        one = optimize_value_fast(model, tok, facts, CONTEXTS, layer, policy, None, seed=i)
        assert j.steps == one.steps
        rel = float((j.delta - one.delta).norm() / one.delta.norm().clamp(min=1e-12))
        assert rel <= 1e-4 or float((j.delta - one.delta).abs().max()) < 1e-6, (i, rel)
        assert j.nll == pytest.approx(one.nll, rel=1e-4, abs=1e-5)
        assert j.nll_start == pytest.approx(one.nll_start, rel=1e-4)
        assert j.h_norm == pytest.approx(one.h_norm, rel=1e-5)
    assert any(j.steps < policy.values.steps for j in joint) or early_stop == 0.0
