"""Spreading's keys and outputs, kept current by partial passes, equal whole passes on full prompts."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lifelong.edit import keys
from lifelong.edit.batch import Group
from lifelong.facts import Fact
from lifelong.edit.keys import BatchKeys
from lifelong.model.prompts import make_row
from lifelong.model.hooks import hooks
from lifelong.policy import layer_name
from lifelong.model.weights import get_module, read_matrix, write_matrix
from lifelong.policy import module_name

GROUPS = [
    Group("France", [Fact("France", "The capital of {} is", "Rome", "capital"),
                     Fact("France", "The official language of {} is", "Dutch", "language")]),
    Group("Apple", [Fact("Apple", "{} makes the", "piano", "makes")]),
    Group("Toko Yasuda", [Fact("Toko Yasuda", "{} plays the", "violin", "plays")]),
]
CONTEXTS = ["{}", "Because the river. {}", "I think the piano is loud. {}"]
TEMPLATES = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj",
             "gemma": "model.layers.{}.mlp.down_proj"}
LAYERS = [0, 1, 2]


def whole_passes(model, tok, template: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key at `layer` over contexts and h^L of the bare prompt per write unit (fact),
    one full prompt at a time."""
    keys_, outs = [], []
    for g in GROUPS:
        for fact in g.facts:
            k = []
            for ci, ctx in enumerate(CONTEXTS):
                row = make_row(tok, ctx, fact.prompt, fact.subject, None)
                got = {}
                spec = {module_name(template, layer): ("pre", lambda _m, a: got.update(k=a[0][0, row.subject_pos])),
                        layer_name(template, LAYERS[-1]): ("post", lambda _m, _a, o: got.update(
                            h=(o[0] if isinstance(o, tuple) else o)[0, row.subject_pos]))}
                with hooks(model, spec), torch.no_grad():
                    model(input_ids=torch.tensor([row.ids]))
                k.append(got["k"])
                if ci == 0:
                    outs.append(got["h"])
            keys_.append(torch.stack(k).mean(0))
    return torch.stack(keys_), torch.stack(outs)


def test_a_merged_group_writes_one_unit_per_fact():
    assert keys.write_units(GROUPS).tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("recognised", [True, False], ids=["partial-passes", "whole-passes"])
def test_keys_follow_each_layer_update(arch, recognised, tiny_llama_dir, tiny_gpt2_dir, tiny_gemma_dir, monkeypatch):
    path = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "gemma": tiny_gemma_dir}[arch]
    model = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    template = TEMPLATES[arch]
    if not recognised:
        monkeypatch.setattr(keys, "recognise", lambda *_a: "not recognised in this test")
    current = BatchKeys(model, tok, GROUPS, CONTEXTS, template, LAYERS, batch=4)   # several batches of rows
    assert (current.cached == LAYERS[0]) == recognised       # the next pass starts at layer 0, not the tokens
    g = torch.Generator().manual_seed(0)
    before = None
    for i, layer in enumerate(LAYERS):
        if i:
            current.after_update(LAYERS[i - 1])
            assert not torch.allclose(current.keys[layer], before, atol=1e-3)   # the update reached it
        for later in LAYERS[i:]:
            k, out = whole_passes(model, tok, template, later)
            torch.testing.assert_close(current.keys[later], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(current.out, out, rtol=1e-5, atol=1e-5)
        if i + 1 < len(LAYERS):
            before = current.keys[LAYERS[i + 1]].clone()
        module = get_module(model, module_name(template, layer))
        w = read_matrix(module)
        a, b = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
        write_matrix(module, w + 0.3 * w.abs().mean() * a @ b)
    # after the last layer's update: h^L moved (what the realized shares read), from layer L's
    # cached input when the structure is recognised, equal to whole passes
    out_before = current.out.clone()
    L = LAYERS[-1]
    assert (current.cached == L) == recognised
    current.after_update(L)
    assert not torch.allclose(current.out, out_before, atol=1e-3)
    _, out = whole_passes(model, tok, template, L)
    torch.testing.assert_close(current.out, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_fork_keeps_the_start_and_follows_updates_of_its_own(arch, tiny_llama_dir, tiny_gpt2_dir):
    """The second spreading starts from a fork taken before the first: with the weights put
    back, it equals a fresh BatchKeys, and it follows the next updates like one."""
    path = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    model = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    template = TEMPLATES[arch]
    current = BatchKeys(model, tok, GROUPS, CONTEXTS, template, LAYERS, batch=4)
    twin = current.fork()
    start = {l: read_matrix(get_module(model, module_name(template, l))) for l in LAYERS}
    g = torch.Generator().manual_seed(1)

    def update(layer):
        module = get_module(model, module_name(template, layer))
        w = read_matrix(module)
        write_matrix(module, w + 0.3 * w.abs().mean() * torch.randn(w.shape[0], 2, generator=g)
                     @ torch.randn(2, w.shape[1], generator=g))

    for layer in LAYERS:                       # the first spreading moves `current`
        update(layer)
        current.after_update(layer)
    for l, w in start.items():
        write_matrix(get_module(model, module_name(template, l)), w)
    fresh = BatchKeys(model, tok, GROUPS, CONTEXTS, template, LAYERS, batch=4)
    assert not torch.allclose(current.out, fresh.out, atol=1e-3)
    for l in LAYERS:
        assert torch.equal(twin.keys[l], fresh.keys[l])
    assert torch.equal(twin.out, fresh.out) and twin.cached == fresh.cached
    update(LAYERS[0])                          # the second spreading moves the fork
    twin.after_update(LAYERS[0])
    for later in LAYERS[1:]:
        k, out = whole_passes(model, tok, template, later)
        torch.testing.assert_close(twin.keys[later], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(twin.out, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_one_edited_layer_caches_its_input_and_follows_its_update(arch, tiny_llama_dir, tiny_gemma_dir):
    """With a single edited layer, L is also the layer whose input the passes cache."""
    path = tiny_llama_dir if arch == "llama" else tiny_gemma_dir
    model = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    template = TEMPLATES[arch]
    current = BatchKeys(model, tok, GROUPS, CONTEXTS, template, [1])
    assert current.cached == 1
    module = get_module(model, module_name(template, 1))
    w = read_matrix(module)
    write_matrix(module, w + 0.3 * w.abs().mean() * torch.ones_like(w))
    before = current.out.clone()
    current.after_update(1)
    assert not torch.allclose(current.out, before, atol=1e-3)
    got = {}
    row = make_row(tok, CONTEXTS[0], GROUPS[0].facts[0].prompt, GROUPS[0].facts[0].subject, None)
    with hooks(model, {layer_name(template, 1): ("post", lambda _m, _a, o: got.update(
            h=(o[0] if isinstance(o, tuple) else o)[0, row.subject_pos]))}), torch.no_grad():
        model(input_ids=torch.tensor([row.ids]))
    torch.testing.assert_close(current.out[0], got["h"], rtol=1e-5, atol=1e-5)
