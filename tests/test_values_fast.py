"""The fast value optimization gives the straightforward loop's δ with fewer token-layer passes."""
from __future__ import annotations

import logging

import pytest
import torch

from lifelong.facts import Fact
from lifelong.model.loading import load_model, resolve_model
from lifelong.policy import Policy
from lifelong.model.hooks import _hidden, hooks
from lifelong.edit.values import GroupRows, optimize_value
from lifelong.edit import values_fast
from lifelong.model.decoder import recognise
from lifelong.edit.values_fast import optimize_value_fast

CONTEXTS = ["{}", "I think the piano is loud. {}"]
ONE = [Fact("Danielle Darrieux", "The mother tongue of {} is", "English", "P103")]
SAME_SUBJECT = [
    Fact("France", "The capital of {} is", "Rome", "capital"),
    Fact("France", "The official language of {} is", "Dutch", "language"),
]
# subject at position 0 and its last token the prompt's last token; essence row too
EDGE = [Fact("Apple", "{}", "piano", "edge")]

TEMPLATES = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj",
             "gemma": "model.layers.{}.mlp.down_proj"}
LAYER = {"llama": "model.layers.1", "gpt2": "transformer.h.1", "gemma": "model.layers.1"}


def policy(arch: str, **kw) -> Policy:
    base = dict(name="t", model="t", source="t", module_template=TEMPLATES[arch], layers=[0, 1],
                steps=8, lr=0.5, clamp_norm_factor=4.0, weight_decay=0.01, kl_factor=0.0625,
                early_stop_loss=0.02)
    base.update(kw)
    return Policy(**base)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma"])
def tiny(request, tiny_llama_dir, tiny_gpt2_dir, tiny_gemma_dir):
    path = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "gemma": tiny_gemma_dir}[request.param]
    model, tok = load_model(resolve_model(str(path)), device="cpu", log=lambda m: None)
    return request.param, model, tok


def both(tiny, facts, contexts, pol, align=None):
    arch, model, tok = tiny
    slow = optimize_value(model, tok, facts, contexts, LAYER[arch], pol, align, seed=3)
    fast = optimize_value_fast(model, tok, facts, contexts, LAYER[arch], pol, align, seed=3)
    return slow, fast


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("facts", [ONE, SAME_SUBJECT, EDGE], ids=["one", "same-subject", "edge"])
def test_fast_delta_matches_straightforward(tiny, facts, caplog):
    arch = tiny[0]
    pol = policy(arch).with_overrides(early_stop_loss=0.0)
    with caplog.at_level(logging.WARNING, logger="lifelong.edit.values_fast"):
        slow, fast = both(tiny, facts, CONTEXTS, pol)
    assert not caplog.records, "the fast path fell back"
    assert slow.steps == fast.steps == 8
    assert slow.delta.norm() > 0
    assert rel(fast.delta, slow.delta) < 1e-4
    assert fast.h_norm == pytest.approx(slow.h_norm, rel=1e-6)
    assert fast.nll_start == pytest.approx(slow.nll_start, rel=1e-5)
    assert fast.nll == pytest.approx(slow.nll, rel=1e-4, abs=1e-6)
    assert fast.token_layer_passes < slow.token_layer_passes


@pytest.mark.parametrize("chunk", [1, 10**6], ids=["rows-nearly-alone", "one-chunk"])
def test_packing_leaves_delta_unchanged(tiny, monkeypatch, chunk):
    """Suffixes packed many to a chunk, or about one per chunk, give the same δ."""
    monkeypatch.setattr(values_fast, "CHUNK", chunk)
    pol = policy(tiny[0]).with_overrides(early_stop_loss=0.0)
    slow, fast = both(tiny, SAME_SUBJECT, CONTEXTS, pol)
    assert rel(fast.delta, slow.delta) < 1e-4


def test_cached_tables_equal_the_models_forward(tiny):
    """h^L over each suffix and the keys/values after L before it, built from shared stems
    and packed passes, are the model's own over each whole row."""
    arch, model, tok = tiny
    g = GroupRows.build(tok, SAME_SUBJECT, CONTEXTS + ["Because the river. {}"])
    ids, mask = values_fast.pad_rows(g.rows, tok.pad_token_id, "cpu")
    lens, subj = mask.sum(1), torch.tensor([r.subject_pos for r in g.rows])
    k, _, _ = values_fast._stems(model, ids, lens, subj, tok.pad_token_id, model.config.num_hidden_layers)
    assert int(k.max()) > 0                                   # contexts shared as stems
    fwd = values_fast._FastForward(model, recognise(model, LAYER[arch]), g, tok.pad_token_id, 1)
    for r in range(len(g.rows)):
        got = {}
        spec = {LAYER[arch]: ("post", lambda _m, _a, o: got.update(h=_hidden(o)))}
        with hooks(model, spec), torch.no_grad():
            cache = model.base_model(input_ids=ids[r : r + 1, : lens[r]], use_cache=True).past_key_values
        s = int(subj[r])
        torch.testing.assert_close(fwd.hL[r, s : lens[r]], got["h"][0, s:], rtol=1e-5, atol=1e-5)
        for i, (keys, values) in fwd.kv.items():
            torch.testing.assert_close(keys[r, :, :s], cache.layers[i].keys[0, :, :s], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[r, :, :s], cache.layers[i].values[0, :, :s], rtol=1e-5, atol=1e-5)


def test_bare_context_only_and_clamp(tiny):
    """No cached prefix at all (every s = 0), and a clamp that binds."""
    pol = policy(tiny[0], clamp_norm_factor=0.05, early_stop_loss=0.0, steps=5)
    slow, fast = both(tiny, EDGE, ["{}"], pol)
    assert slow.delta.norm() == pytest.approx(0.05 * slow.h_norm, rel=1e-4)
    assert rel(fast.delta, slow.delta) < 1e-4


def test_early_stop_and_alignment_match(tiny):
    from lifelong.edit.alignment import ResidualBank

    arch, model, _ = tiny
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    bank = ResidualBank.empty(d * 2, d)
    bank.extend(torch.randn(6, d * 2, generator=g), torch.randn(6, d, generator=g), list(range(6)))
    term = bank.objective(torch.randn(d * 2, generator=g), 0.07, 4, 1.0, 1.0, "cpu")
    pol = policy(arch, steps=40, early_stop_loss=0.5, lr=1.0)
    slow, fast = both(tiny, ONE, CONTEXTS, pol, align=term)
    assert fast.steps == slow.steps
    # 40 Adam steps at lr 1 through the alignment's cosines amplify the two paths' different
    # summation orders: 1.5e-4 with torch 2.13 / transformers 5.25 (a wrong forward is O(1))
    assert rel(fast.delta, slow.delta) < 3e-4


def test_unrecognised_structure_falls_back(tiny, caplog):
    arch, model, tok = tiny
    pol = policy(arch, steps=2)
    # a decoder layer's MLP output module is not a decoder layer: the fast path declines
    name = TEMPLATES[arch].format(1)
    with caplog.at_level(logging.WARNING, logger="lifelong.edit.values_fast"):
        res = optimize_value_fast(model, tok, ONE, CONTEXTS, name, pol, None)
    assert any("straightforward" in r.getMessage() for r in caplog.records)
    assert res.steps == 2


def test_eager_attention_and_last_layer(tiny):
    """The additive float mask of eager attention; δ at the last layer (no layer recomputed)."""
    arch, model, tok = tiny
    pol = policy(arch, steps=4, early_stop_loss=0.0)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        assert model.config._attn_implementation == "eager"
        slow, fast = both(tiny, SAME_SUBJECT, CONTEXTS, pol)
        assert rel(fast.delta, slow.delta) < 1e-4
    finally:
        model.set_attn_implementation(before)
    last = LAYER[arch][:-1] + str(model.config.num_hidden_layers - 1)
    slow = optimize_value(model, tok, ONE, CONTEXTS, last, pol, None, seed=0)
    fast = optimize_value_fast(model, tok, ONE, CONTEXTS, last, pol, None, seed=0)
    assert fast.token_layer_passes == 0
    assert rel(fast.delta, slow.delta) < 1e-4


def test_fallback_loop_scores_only_targets_and_matches(tiny):
    """The loop the fast path falls back to runs the LM head only at scored positions: same δ."""
    arch, model, tok = tiny
    pol = policy(arch, steps=6, early_stop_loss=0.0)
    full = optimize_value(model, tok, SAME_SUBJECT, CONTEXTS, LAYER[arch], pol, None, seed=1)
    lean = optimize_value(model, tok, SAME_SUBJECT, CONTEXTS, LAYER[arch], pol, None, seed=1, full_logits=False)
    assert full.steps == lean.steps == 6
    assert rel(lean.delta, full.delta) < 1e-5
    assert lean.nll == pytest.approx(full.nll, rel=1e-5, abs=1e-7)


def test_target_margin_is_positive_exactly_when_the_target_is_the_argmax():
    from lifelong.edit.values import target_logp

    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.5]]), dim=-1)
    tok, margin = target_logp(logp, torch.tensor([0, 2, 0]))
    assert torch.allclose(tok, logp[[0, 1, 2], [0, 2, 0]])
    assert torch.allclose(margin, torch.tensor([1.0, -2.0, 0.0]))


def test_margin_stop_is_the_same_in_every_loop(tiny):
    """stop_margin ends a value where every target token leads by the margin in every context:
    the straightforward loop, the fast one and the joint one stop at the same step."""
    from lifelong.edit.values_batched import optimize_values_batched

    arch, model, tok = tiny
    free = policy(arch, steps=12, lr=1.0, early_stop_loss=0.0)
    groups = [ONE, SAME_SUBJECT]
    # a margin the first group passes by its 6th forward, away from rounding's knife edge
    never = free.with_overrides(stop_margin=1e9)   # margins reported, the same trajectory as `free`
    m5, m6 = (optimize_value_fast(model, tok, ONE, CONTEXTS, LAYER[arch], never.with_overrides(steps=k), None).margin
              for k in (5, 6))
    stop = (m5 + m6) / 2 if m6 > m5 + 1e-3 else m6 - 1e-3
    pol = free.with_overrides(stop_margin=float(stop))
    slow, fast = (f(model, tok, ONE, CONTEXTS, LAYER[arch], pol, None, seed=0)
                  for f in (optimize_value, optimize_value_fast))
    assert fast.steps == slow.steps < free.values.steps
    assert fast.margin >= stop and slow.margin >= stop
    assert rel(fast.delta, slow.delta) < 1e-4
    joint = optimize_values_batched(model, tok, groups, CONTEXTS, LAYER[arch], pol)
    for i, (g, j) in enumerate(zip(groups, joint)):
        one = optimize_value_fast(model, tok, g, CONTEXTS, LAYER[arch], pol, None, seed=i)
        assert j.steps == one.steps and j.margin == pytest.approx(one.margin, abs=1e-4)
        assert rel(j.delta, one.delta) < 1e-4


def _first_stop(margins: list[float], at: float, patience: int) -> int | None:
    """The forward (= steps taken) at which `margins` (one per forward) first held ≥ at for
    `patience` consecutive forwards."""
    run = 0
    for j, m in enumerate(margins):
        run = run + 1 if m >= at else 0
        if run >= patience:
            return j
    return None


def test_stop_patience_waits_for_the_margin_to_hold_in_every_loop(tiny):
    """stop_patience k: a value stops once the margin has held for k consecutive forwards,
    in the straightforward, the fast and the joint loop alike."""
    from lifelong.edit.values_batched import optimize_values_batched

    arch, model, tok = tiny
    free = policy(arch, steps=16, lr=1.0, early_stop_loss=0.0)
    never = free.with_overrides(stop_margin=1e9)      # margins reported, the same trajectory as `free`
    # the margin at forward j is the last one a run with a budget of j + 1 steps reports
    margins = [optimize_value_fast(model, tok, ONE, CONTEXTS, LAYER[arch], never.with_overrides(steps=k), None).margin
               for k in range(1, 17)]
    # a threshold away from rounding's knife edge at which waiting for 3 forwards stops later
    cuts = sorted((a + b) / 2 for a, b in zip(sorted(margins), sorted(margins)[1:]) if b - a > 2e-3)
    at = next(c for c in cuts if (_first_stop(margins, c, 3) or 99) < 16
              and _first_stop(margins, c, 1) < _first_stop(margins, c, 3))
    pol = free.with_overrides(stop_margin=at, stop_patience=3)
    results = [f(model, tok, ONE, CONTEXTS, LAYER[arch], pol, None, seed=0) for f in (optimize_value, optimize_value_fast)]
    results.append(optimize_values_batched(model, tok, [ONE], CONTEXTS, LAYER[arch], pol)[0])
    assert [r.steps for r in results] == [_first_stop(margins, at, 3)] * 3
    once = optimize_value_fast(model, tok, ONE, CONTEXTS, LAYER[arch], pol.with_overrides(stop_patience=1), None)
    assert once.steps == _first_stop(margins, at, 1) < results[0].steps


def test_normalized_steps_move_each_row_by_its_step_along_the_gradient():
    """δ ← δ − step·g/‖g‖ per row: each row moves exactly its own step length, straight
    down its gradient; a row with no gradient (a stopped group) does not move."""
    from lifelong.edit.values import NormalizedSteps

    delta = torch.zeros(3, 4, requires_grad=True)
    opt = NormalizedSteps(delta, torch.tensor([2.0, 0.5, 1.0]))
    (delta * torch.tensor([[3.0, 4.0, 0, 0], [0, 0, -1.0, 0], [0, 0, 0, 0]])).sum().backward()
    opt.step()
    assert torch.allclose(delta.detach(), torch.tensor([[-1.2, -1.6, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 0]]))
    one = torch.zeros(2, requires_grad=True)
    (one * torch.tensor([0.0, -5.0])).sum().backward()
    NormalizedSteps(one, 3.0).step()
    assert torch.allclose(one.detach(), torch.tensor([0.0, 3.0]))


def test_normalized_optimizer_is_the_same_in_every_loop(tiny):
    """optimizer: normalized gives the same δ in the straightforward, fast and joint loops,
    and each step is step_size·‖h‖ long (no clamp binding, no weight decay: ‖δ‖ ≤ steps·step)."""
    from lifelong.edit.values_batched import optimize_values_batched

    arch, model, tok = tiny
    pol = policy(arch, optimizer="normalized", step_size=0.05, steps=6, early_stop_loss=0.0, weight_decay=0.0)
    slow, fast = both(tiny, ONE, CONTEXTS, pol)
    assert slow.steps == fast.steps == 6
    assert rel(fast.delta, slow.delta) < 1e-4
    assert 0 < float(slow.delta.norm()) <= 6 * 0.05 * slow.h_norm * (1 + 1e-5)
    groups = [ONE, SAME_SUBJECT]
    joint = optimize_values_batched(model, tok, groups, CONTEXTS, LAYER[arch], pol)
    for i, (g, j) in enumerate(zip(groups, joint)):
        one = optimize_value_fast(model, tok, g, CONTEXTS, LAYER[arch], pol, None, seed=i)
        assert j.steps == one.steps
        assert rel(j.delta, one.delta) < 1e-4


def test_steps_in_a_metric_are_the_same_in_every_loop(tiny):
    """value_metric fisher: the joint loop and the per-group loops step δ in the same metric,
    each step step_size·‖h‖ long in it, and the metric changes δ."""
    from lifelong.edit.values import optimize_value
    from lifelong.edit.values_batched import optimize_values_batched

    arch, model, tok = tiny
    d = model.config.hidden_size
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    F = q @ torch.diag(torch.logspace(-1, 1, d)) @ q.t()
    M = torch.linalg.inv(F)
    pol = policy(arch, optimizer="normalized", step_size=0.05, steps=6, early_stop_loss=0.0, weight_decay=0.0)
    slow = optimize_value(model, tok, ONE, CONTEXTS, LAYER[arch], pol, None, metric=M)
    fast = optimize_value_fast(model, tok, ONE, CONTEXTS, LAYER[arch], pol, None, metric=M)
    plain = optimize_value_fast(model, tok, ONE, CONTEXTS, LAYER[arch], pol, None)
    assert rel(fast.delta, slow.delta) < 1e-4 and rel(fast.delta, plain.delta) > 1e-2
    assert 0 < float(fast.delta @ F @ fast.delta).__pow__(0.5) <= 6 * 0.05 * fast.h_norm * (1 + 1e-4)
    groups = [ONE, SAME_SUBJECT]
    joint = optimize_values_batched(model, tok, groups, CONTEXTS, LAYER[arch], pol, metric=M)
    for i, (g, j) in enumerate(zip(groups, joint)):
        one = optimize_value_fast(model, tok, g, CONTEXTS, LAYER[arch], pol, None, seed=i, metric=M)
        assert j.steps == one.steps
        assert rel(j.delta, one.delta) < 1e-4
