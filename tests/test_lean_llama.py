"""The fused per-step layers (lean_llama) against the transformers modules they replace."""
from __future__ import annotations

import pytest
import torch

from lifelong.edit import values_fast
from lifelong.model.lean_llama import lean_layers, run_lean
from lifelong.edit.values_fast import _PrefixKV
from lifelong.model.decoder import recognise


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
        Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_()
        return model
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=12)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lean_layers_equal_the_modules(kind):
    """Packed rows with a cached prefix each, a mask like the value loop's: same output, same gradient."""
    model = _tiny(kind)
    arch = recognise(model, "model.layers.0")
    lean = lean_layers(model, arch.layers, 1, 3)
    assert lean is not None and set(lean) == {1, 2}
    c, C, P, d, kv, hd = 2, 5, 3, 48, 2, 12
    g = torch.Generator().manual_seed(1)
    h = torch.randn(c, C, d, generator=g)
    prefix = {i: (torch.randn(c, kv, P, hd, generator=g), torch.randn(c, kv, P, hd, generator=g)) for i in (1, 2)}
    position_ids = torch.arange(P, P + C).expand(c, C)
    pe = arch.rotary(h, position_ids)
    allowed = torch.cat([torch.rand(c, 1, C, P, generator=g) < 0.7,
                         torch.ones(C, C, dtype=torch.bool).tril().expand(c, 1, C, C)], dim=-1)
    allowed[..., 0] = True
    delta = torch.zeros(d, requires_grad=True)
    ref = arch.run(h + delta, 1, 3, allowed, position_ids, pe, _PrefixKV(prefix))
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), delta)
    got = run_lean(lean, h + delta, 1, 3, allowed, pe, prefix)
    (g_got,) = torch.autograd.grad(got.pow(2).sum(), delta)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5)


def test_other_layers_keep_the_modules():
    """Qwen3 has q/k norms, which the lean forward does not do."""
    model = _tiny("qwen3")
    assert lean_layers(model, model.model.layers, 1, 3) is None


def test_value_loop_uses_lean_and_matches_modules(tiny_llama_dir, monkeypatch):
    from lifelong.facts import Fact
    from lifelong.model.loading import load_model, resolve_model
    from lifelong.policy import Policy
    from lifelong.edit.values import GroupRows

    model, tok = load_model(resolve_model(str(tiny_llama_dir)), device="cpu", log=lambda m: None)
    facts = [Fact("Danielle Darrieux", "The mother tongue of {} is", "English", "P103")]
    contexts = ["{}", "I think the piano is loud. {}"]
    pol = Policy(name="t", model="t", source="t", module_template="model.layers.{}.mlp.down_proj", layers=[0, 1],
                 steps=6, lr=0.5, clamp_norm_factor=4.0, weight_decay=0.01, kl_factor=0.0625, early_stop_loss=0.0)
    fwd = values_fast._FastForward(model, recognise(model, "model.layers.1"), GroupRows.build(tok, facts, contexts),
                                   tok.pad_token_id, 1)
    assert fwd.lean is not None
    lean = values_fast.optimize_value_fast(model, tok, facts, contexts, "model.layers.1", pol, None, seed=2)
    monkeypatch.setattr(values_fast, "LEAN", False)
    modules = values_fast.optimize_value_fast(model, tok, facts, contexts, "model.layers.1", pol, None, seed=2)
    assert float((lean.delta - modules.delta).norm() / modules.delta.norm()) < 1e-5


def test_fused_weights_are_reused_until_a_weight_changes():
    from lifelong.model.weights import read_matrix, write_matrix

    model = _tiny("llama")
    layers = model.model.layers
    first = lean_layers(model, layers, 1, 3)
    again = lean_layers(model, layers, 1, 3)
    assert again[1] is first[1] and again[2] is first[2]            # not concatenated again
    w = read_matrix(layers[2].mlp.up_proj)
    write_matrix(layers[2].mlp.up_proj, w + 1.0)
    after = lean_layers(model, layers, 1, 3)
    assert after[1] is first[1] and after[2] is not first[2]
    ff = layers[2].mlp.up_proj.out_features
    torch.testing.assert_close(after[2].gate_up[ff:], w + 1.0)
