"""The residual Fisher and steps measured in it (value_metric fisher)."""
from __future__ import annotations

import pytest
import torch

from lifelong import api
from lifelong.store.layout import FISHER
from lifelong.errors import BadInput
from lifelong.model.loading import load_model, resolve_model
from lifelong.edit.fisher import preconditioner, residual_fisher
from lifelong.store.store import Store
from lifelong.edit.values import NormalizedSteps
from helpers import sha, write_jsonl

FACTS = [{"subject": "France", "prompt": "The capital of {} is", "target": "Rome"},
         {"subject": "Brazil", "prompt": "The official language of {} is", "target": "Dutch"}]


def _ill_conditioned(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(-1, 2, d, dtype=torch.float64)) @ q.t()   # eigenvalues 0.1 … 100


def test_a_step_has_its_length_in_the_metric_and_the_identity_gives_plain_steps():
    F = _ill_conditioned(6)
    M = torch.linalg.inv(F)
    g = torch.randn(3, 6, dtype=torch.float64)
    moves = []
    for metric in (M, torch.eye(6, dtype=torch.float64), None):
        delta = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
        opt = NormalizedSteps(delta, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), metric)
        delta.grad = g.clone()
        opt.step()
        moves.append(-delta.detach())
    lengths = ((moves[0] @ F) * moves[0]).sum(-1).sqrt()
    assert torch.allclose(lengths, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    assert torch.allclose(moves[1], moves[2], rtol=1e-12, atol=0)
    assert not torch.allclose(moves[0], moves[2], rtol=0.1)


def test_steps_in_the_metric_reach_a_target_with_the_least_cost_in_it():
    """One linear target aᵀδ = c: the δ that reaches it with the least δᵀFδ is c·F⁻¹a/(aᵀF⁻¹a),
    costing c²/(aᵀF⁻¹a). Steps measured in F walk straight to it; plain steps do not."""
    d, c = 8, 3.0
    F = _ill_conditioned(d, seed=1)
    a = torch.linalg.eigh(F).eigenvectors[:, -3:].sum(1) + 0.3 * torch.ones(d, dtype=torch.float64)
    least = c ** 2 / float(a @ torch.linalg.solve(F, a))

    def walk(metric):
        delta = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        opt = NormalizedSteps(delta, 1e-3, metric)
        for _ in range(20000):
            loss = (a @ delta - c) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        x = delta.detach()
        return float(x @ F @ x), float(a @ x)

    cost, reached = walk(torch.linalg.inv(F))
    plain, plain_reached = walk(None)
    assert reached == pytest.approx(c, abs=0.05) and plain_reached == pytest.approx(c, abs=0.05)
    assert cost == pytest.approx(least, rel=0.05)
    assert plain > 3 * least


def test_preconditioner_scales_to_mean_eigenvalue_one():
    F = 1e-4 * _ill_conditioned(5)
    P = preconditioner(F).double()
    Fs = F / F.diagonal().mean()
    assert torch.allclose(P, torch.linalg.inv(Fs + 0.01 * torch.eye(5, dtype=torch.float64)), rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma-capped"])
@pytest.mark.parametrize("direct", [True, False])
def test_residual_fisher_is_the_mean_outer_product_of_each_tokens_gradient(arch, direct, tiny_llama_dir, tiny_gpt2_dir,
                                                                           tiny_gemma_dir, monkeypatch):
    """Batched with padding and a backward cut at the first layer, against one sequence at a time
    through the whole model with a zero perturbation added at each layer's output: with the
    head's gradient written down (softmax − onehot through Gemma's soft cap) and through autograd."""
    from lifelong.edit import fisher

    folder = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "gemma-capped": tiny_gemma_dir}[arch]
    model, tok = load_model(resolve_model(str(folder)), device="cpu", log=lambda m: None)
    if arch == "gemma-capped":
        model.config.final_logit_softcapping = 0.5          # small enough to bend the tiny model's logits
    seen = []
    real = fisher._head_is_direct
    monkeypatch.setattr(fisher, "_head_is_direct", lambda *a: seen.append(real(*a)) or (seen[-1] and direct))
    names = {"llama": ["model.layers.1", "model.layers.2"], "gpt2": ["transformer.h.1", "transformer.h.2"],
             "gemma-capped": ["model.layers.1", "model.layers.2"]}[arch]
    seqs = [tok(t)["input_ids"] for t in ("The capital of France is Paris and the river is long",
                                           "A quiet text about hills",
                                           "Rivers run to the sea, and the hills stand over them all day")]
    per_layer, n = residual_fisher(model, names, seqs, batch=2)

    want = {nm: torch.zeros_like(per_layer[nm]) for nm in names}
    for s in seqs:
        ids = torch.tensor([s])
        eps = {nm: torch.zeros(1, len(s), model.config.hidden_size, requires_grad=True) for nm in names}

        def make(nm):
            def post(_m, _a, out):
                return (out[0] + eps[nm], *out[1:]) if isinstance(out, tuple) else out + eps[nm]
            return post

        hs = [model.get_submodule(nm).register_forward_hook(make(nm)) for nm in names]
        try:
            logits = model(input_ids=ids).logits
        finally:
            for h in hs:
                h.remove()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        for nm, g in zip(names, torch.autograd.grad(nll, [eps[nm] for nm in names])):
            g = g[0].double()
            want[nm] += g.t() @ g
    assert n == sum(len(s) - 1 for s in seqs)
    for nm in names:
        ref = want[nm] / n
        assert torch.allclose(per_layer[nm], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert not torch.allclose(per_layer[names[0]], per_layer[names[1]], rtol=0.1)
    assert all(not p.requires_grad for p in model.parameters())     # left as it was
    assert seen == [True]                                           # these heads are plain linear maps


def test_init_stores_the_fisher_a_fisher_policy_steps_in(tmp_path, tiny_llama_dir, tiny_policy_factory):
    pol = tiny_policy_factory("llama", threshold=0.05)
    pol.write_text(pol.read_text().replace("values:\n", "values:\n  optimizer: normalized\n  step_size: 0.1\n  metric: fisher\n")
                   .replace("preserved:\n", "preserved:\n  fisher_tokens: 512\n"))
    path = tmp_path / "s.h5"
    api.init(path, model=str(tiny_llama_dir), policy=str(pol))
    store = Store.open(path)
    F = store.base_arrays([FISHER])[FISHER]
    assert F.shape == (48, 48) and 4 * 127 <= store.info["fisher_tokens"] < 4 * 150   # 4 sampled sequences
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS)
    plain = api.push(path, facts, dry_run=True, policy_overrides={"value_metric": "euclidean"})
    fisher = api.push(path, facts, dry_run=True)
    # a 4-layer model trained for seconds reaches few targets (test_pipeline); both paths move towards them
    assert all(g["nll"] < g["nll_start"] for g in plain.groups + fisher.groups)
    assert [g["delta_norm"] for g in fisher.groups] != [g["delta_norm"] for g in plain.groups]


def test_a_fisher_push_on_a_store_without_one_is_refused_and_changes_nothing(tmp_path, tiny_llama_dir,
                                                                            tiny_policy_factory):
    pol = tiny_policy_factory("llama", threshold=0.05)
    pol.write_text(pol.read_text().replace("values:\n", "values:\n  optimizer: normalized\n  step_size: 0.1\n"))
    path = tmp_path / "s.h5"
    api.init(path, model=str(tiny_llama_dir), policy=str(pol))
    assert FISHER not in Store.open(path).base_arrays([], optional=(FISHER,))
    before = sha(path)
    with pytest.raises(BadInput, match="no residual Fisher"):
        api.push(path, write_jsonl(tmp_path / "f.jsonl", FACTS), policy_overrides={"value_metric": "fisher"})
    assert sha(path) == before and Store.open(path).records == []


def test_fisher_needs_normalized_steps(tiny_policy_factory):
    from lifelong.errors import PolicyError
    from lifelong.policy import load_policy

    with pytest.raises(PolicyError, match="values.metric"):
        load_policy(tiny_policy_factory("llama")).with_overrides(value_metric="fisher")


def test_init_in_bfloat16_records_it_and_keeps_the_float32_model(tmp_path, tiny_llama_dir, tiny_policy_factory):
    """A policy asking for bfloat16 passes: the store says so, holds float64 statistics close
    to a float32 init's, and its base weights are the model's own float32 ones."""
    import numpy as np

    from lifelong.store.layout import layer_key

    pol = tiny_policy_factory("llama", threshold=0.05)
    text = pol.read_text().replace("values:\n", "values:\n  optimizer: normalized\n  step_size: 0.1\n  metric: fisher\n")
    corpus = tmp_path / "corpus.txt"                         # the same tokens for both
    corpus.write_text("".join(f"Line {i} of a quiet text about rivers, hills and {i % 7} towns.\n" for i in range(600)))
    stores = {}
    for prec in ("float32", "bfloat16"):
        pol.write_text(text.replace("preserved:\n", f"preserved:\n  fisher_tokens: 512\n  precision: {prec}\n"))
        api.init(tmp_path / f"{prec}.h5", model=str(tiny_llama_dir), policy=str(pol), corpus=str(corpus))
        stores[prec] = Store.open(tmp_path / f"{prec}.h5")
    half, full = stores["bfloat16"], stores["float32"]
    assert half.info["stats_precision"] == "bfloat16" and full.info["stats_precision"] == "float32"
    for l in (0, 1):
        w, c = layer_key(l, "W"), layer_key(l, "mom2")
        a, b = half.base_arrays([w, c]), full.base_arrays([w, c])
        assert np.array_equal(a[w], b[w]) and a[w].dtype == np.float32          # the base itself
        assert a[c].dtype == np.float64 and 0 < np.linalg.norm(a[c] - b[c]) / np.linalg.norm(b[c]) < 0.05
