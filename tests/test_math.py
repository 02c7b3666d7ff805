"""The update's mathematics on small matrices."""
from __future__ import annotations

import torch

from lifelong.edit.alignment import ResidualBank
from lifelong.edit.stats import projector
from lifelong.edit.solve import memit_update, projected_update
from lifelong.deltas import fingerprint, float64_sum, materialize

D_IN, D_OUT = 24, 10


def _preserved(n=400, rank=14, seed=0):
    """Keys living mostly in a rank-`rank` subspace, like real preserved keys."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(n, rank, generator=g, dtype=torch.float64) * 3
    K0 = coef @ basis[:, :rank].t() + 1e-4 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    return K0, K0.t() @ K0 / n  # (n, d_in), E[kkᵀ]


def test_projector_spans_small_eigenvalues():
    _, mom2 = _preserved()
    proj = projector(mom2, threshold=1e-3)
    assert proj.kept == D_IN - 14
    P = proj.P.double()
    assert torch.allclose(P @ P, P, atol=1e-6)          # idempotent
    assert torch.allclose(P, P.t(), atol=1e-7)          # symmetric
    assert proj.kept_energy < 1e-6


def test_projected_update_leaves_preserved_outputs_unchanged():
    K0, mom2 = _preserved()
    P = projector(mom2, threshold=1e-3).P
    g = torch.Generator().manual_seed(1)
    K = torch.randn(D_IN, 5, generator=g)                # new keys (d_in, n)
    R = torch.randn(D_OUT, 5, generator=g)
    A, B = projected_update(R, K, P, None, alpha=1.0)
    delta = A.double() @ B.double()                       # (d_out, d_in)
    change = delta @ K0.t()                               # outputs of preserved keys
    assert change.abs().max() < 1e-3 * K0.abs().max()
    # and the edit does something for the new keys
    assert (delta @ K.double()).norm() > 0.1 * R.norm()


def test_projected_update_equals_brute_force_least_squares():
    _, mom2 = _preserved()
    proj = projector(mom2, threshold=1e-3)
    evals, evecs = torch.linalg.eigh(mom2)
    U2 = evecs[:, evals < 1e-3]                           # (d_in, kept), P = U2 U2ᵀ
    g = torch.Generator().manual_seed(2)
    K = torch.randn(D_IN, 4, generator=g, dtype=torch.float64)
    Kp = torch.randn(D_IN, 6, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, 4, generator=g, dtype=torch.float64)
    alpha = 0.7
    A, B = projected_update(R, K, U2 @ U2.t(), Kp @ Kp.t(), alpha)
    closed = A.double() @ B.double()
    # min over X (d_out, kept) of ‖X U2ᵀK − R‖² + ‖X U2ᵀKp‖² + α‖X‖², Δ = X U2ᵀ
    lhs = torch.cat([U2.t() @ K, U2.t() @ Kp, alpha**0.5 * torch.eye(U2.shape[1], dtype=torch.float64)], 1)
    rhs = torch.cat([R, torch.zeros(D_OUT, 6 + U2.shape[1], dtype=torch.float64)], 1)
    X = torch.linalg.lstsq(lhs.t(), rhs.t()).solution.t()
    brute = X @ U2.t()
    assert torch.allclose(closed, brute, atol=1e-5), (closed - brute).abs().max()
    assert proj.kept == U2.shape[1]


def test_preserve_term_equals_brute_force_and_lowers_leak():
    """λ_p·P·C₀ in the solve = C₀'s square root as extra held keys; where the "null space"
    still holds preserved energy, it shrinks the preserved keys' output change."""
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(1, -4, D_IN, dtype=torch.float64)         # no true null space
    K0 = torch.randn(2000, D_IN, generator=g, dtype=torch.float64) * spectrum.sqrt() @ basis.t()
    mom2 = K0.t() @ K0 / K0.shape[0]
    evals, evecs = torch.linalg.eigh(mom2)
    U2 = evecs[:, evals < 1e-2]                                         # kept dims still hold energy
    P = U2 @ U2.t()
    K = torch.randn(D_IN, 4, generator=g, dtype=torch.float64)
    Kp = torch.randn(D_IN, 3, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, 4, generator=g, dtype=torch.float64)
    alpha, lam = 0.3, 50.0
    A, B = projected_update(R, K, P, Kp @ Kp.t(), alpha, mom2, lam)
    closed = A.double() @ B.double()
    root = evecs * evals.clamp(min=0).sqrt()                            # root rootᵀ = C₀
    lhs = torch.cat([U2.t() @ K, U2.t() @ Kp, lam**0.5 * U2.t() @ root,
                     alpha**0.5 * torch.eye(U2.shape[1], dtype=torch.float64)], 1)
    rhs = torch.cat([R, torch.zeros(D_OUT, lhs.shape[1] - 4, dtype=torch.float64)], 1)
    brute = torch.linalg.lstsq(lhs.t(), rhs.t()).solution.t() @ U2.t()
    assert torch.allclose(closed, brute, atol=1e-5), (closed - brute).abs().max()

    A0, B0 = projected_update(R, K, P, Kp @ Kp.t(), alpha)
    Az, Bz = projected_update(R, K, P, Kp @ Kp.t(), alpha, mom2, 0.0)
    assert torch.equal(A0, Az) and torch.equal(B0, Bz)                  # λ_p = 0: AlphaEdit as it was
    leak = lambda d: float(torch.trace(d @ mom2 @ d.t()))               # E‖Δk₀‖² over preserved keys
    assert leak(closed) < 0.8 * leak(A0.double() @ B0.double())


def test_kp_term_keeps_earlier_edits():
    _, mom2 = _preserved()
    P = projector(mom2, threshold=1e-3).P
    g = torch.Generator().manual_seed(3)
    K1, R1 = torch.randn(D_IN, 3, generator=g), torch.randn(D_OUT, 3, generator=g)
    A1, B1 = projected_update(R1, K1, P, None, alpha=1e-3)
    W1 = A1 @ B1
    K2, R2 = torch.randn(D_IN, 3, generator=g), torch.randn(D_OUT, 3, generator=g)
    with_kp = projected_update(R2, K2, P, K1 @ K1.t(), alpha=1e-3)
    without = projected_update(R2, K2, P, None, alpha=1e-3)
    drift_with = ((with_kp[0] @ with_kp[1]) @ K1).norm()
    drift_without = ((without[0] @ without[1]) @ K1).norm()
    assert drift_with < 0.05 * drift_without
    assert ((W1 @ K1) - R1).norm() < 0.05 * R1.norm()   # the first edit took


def test_memit_update_solves_its_normal_equations():
    _, mom2 = _preserved()
    g = torch.Generator().manual_seed(4)
    K, R = torch.randn(D_IN, 3, generator=g), torch.randn(D_OUT, 3, generator=g)
    A, B = memit_update(R, K, mom2, weight=10.0)
    delta = A.double() @ B.double()
    lhs = delta @ (10.0 * mom2 + K.double() @ K.double().t())
    assert torch.allclose(lhs, R.double() @ K.double().t(), atol=1e-4)


def test_the_frobenius_term_adds_lambda_f_times_the_mean_eigenvalue_and_shortens_the_update():
    _, mom2 = _preserved()
    g = torch.Generator().manual_seed(5)
    K, R = torch.randn(D_IN, 3, generator=g), torch.randn(D_OUT, 3, generator=g)
    A, B = memit_update(R, K, mom2, weight=10.0, frobenius=2.0)
    delta = A.double() @ B.double()
    ridge = 2.0 * torch.trace(mom2.double()) / D_IN * torch.eye(D_IN, dtype=torch.float64)
    lhs = delta @ (10.0 * mom2.double() + ridge + K.double() @ K.double().t())
    assert torch.allclose(lhs, R.double() @ K.double().t(), atol=1e-4)
    A0, B0 = memit_update(R, K, mom2, weight=10.0)
    assert delta.norm() < (A0.double() @ B0.double()).norm()


def test_the_repair_term_solves_its_normal_equations_and_pulls_the_drift_back():
    """Δ (λC₀ + μC₀ + KKᵀ) = RKᵀ − μ D C₀: with an earlier change D in the matrix, the preserved
    keys' outputs end nearer the base model's than D left them, and the edit is still written."""
    _, mom2 = _preserved()
    C0 = mom2.double()
    g = torch.Generator().manual_seed(6)
    K, R = torch.randn(D_IN, 3, generator=g), torch.randn(D_OUT, 3, generator=g)
    D = 0.3 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    A, B = memit_update(R, K, mom2, weight=1e-3, drift=D, repair=1.0)
    assert A.shape == (D_OUT, 3 + D_OUT) and B.shape == (3 + D_OUT, D_IN)
    delta = A.double() @ B.double()
    M = (1e-3 + 1.0) * C0 + K.double() @ K.double().t()
    assert torch.allclose(delta @ M, R.double() @ K.double().t() - D @ C0, atol=1e-4)
    leak = lambda W: float(torch.trace(W @ C0 @ W.t()))       # noqa: E731
    assert leak(D + delta) < 0.5 * leak(D)
    plain = memit_update(R, K, mom2, weight=1e-3, drift=D)     # repair 0: the update without a pull
    assert plain[0].shape == (D_OUT, 3)
    assert (delta @ K.double() - R.double()).norm() < 0.5 * R.double().norm()


def test_memit_holding_earlier_keys_approaches_the_least_leak_exact_write():
    """hold_earlier: K_pK_pᵀ in MEMIT's solve. For a small λ the update writes R on K, keeps
    K_p's outputs, and among all such updates changes preserved outputs least: its limit is
    Δ* = R̃ (K̃ᵀC₀⁻¹K̃)⁻¹ K̃ᵀC₀⁻¹ with K̃ = [K, K_p], R̃ = [R, 0]."""
    g = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0]
    mom2 = basis @ torch.diag(torch.logspace(1, -3, D_IN, dtype=torch.float64)) @ basis.t()
    K, Kp = torch.randn(D_IN, 4, generator=g), torch.randn(D_IN, 5, generator=g)
    R = torch.randn(D_OUT, 4, generator=g)
    A, B = memit_update(R, K, mom2, 1e-6, Kp.double() @ Kp.double().t())
    delta = A.double() @ B.double()
    assert torch.allclose(delta @ K.double(), R.double(), atol=1e-4)                 # written
    assert (delta @ Kp.double()).norm() < 1e-4 * R.norm()                            # held
    Kt = torch.cat([K, Kp], 1).double()
    Rt = torch.cat([R.double(), torch.zeros(D_OUT, 5, dtype=torch.float64)], 1)
    Ci = torch.linalg.inv(mom2)
    least = Rt @ torch.linalg.solve(Kt.t() @ Ci @ Kt, Kt.t() @ Ci)
    assert torch.allclose(delta, least, atol=1e-4), (delta - least).abs().max()
    leak = lambda d: float(torch.trace(d @ mom2 @ d.t()))
    other = least + torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) @ (  # also writes R, holds K_p
        torch.eye(D_IN, dtype=torch.float64) - Kt @ torch.linalg.pinv(Kt)) * 0.1
    assert torch.allclose(other @ Kt, Rt, atol=1e-6) and leak(other) > leak(least)
    without = memit_update(R, K, mom2, 1e-6)
    assert ((without[0] @ without[1]).double() @ Kp.double()).norm() > 0.1 * R.norm()  # MEMIT as published moves K_p


def test_materialize_is_the_float64_sum_rounded_once():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(D_OUT, D_IN, generator=g)
    f = [(1e-3 * torch.randn(D_OUT, 2, generator=g), torch.randn(2, D_IN, generator=g)) for _ in range(20)]
    exact = base.double()
    for a, b in f:
        exact = exact + a.double() @ b.double()
    got = materialize(base, f)
    assert got.dtype == torch.float32 and torch.equal(got, exact.float())
    ulp = (torch.nextafter(got, torch.tensor(float("inf"))) - got).double()
    assert bool(((got.double() - exact).abs() <= ulp / 2).all())   # correctly rounded
    assert fingerprint(materialize(base, f)) == fingerprint(got)   # the same factors, the same bits
    assert torch.equal(materialize(base, []), base) and not torch.equal(materialize(base, f[:1]), base)
    assert torch.equal(float64_sum(float64_sum(base, f[:7]), f[7:]), float64_sum(base, f))   # extendable
    step = base.clone()
    for a, b in f:   # store format 1: rounded after each batch, which drifts from the exact sum
        step = step + a @ b
    assert not torch.equal(step, got)
    assert float((step.double() - exact).abs().max()) > float((got.double() - exact).abs().max())


def test_alignment_pulls_residual_cosines_toward_key_cosines():
    g = torch.Generator().manual_seed(6)
    bank = ResidualBank.empty(8, 6)
    keys, deltas = torch.randn(20, 8, generator=g), torch.randn(20, 6, generator=g)
    bank.extend(keys, deltas, [(1, i) for i in range(20)])
    k = keys[3] + 0.05 * torch.randn(8, generator=g)      # a key close to entry 3
    term = bank.objective(k, tau=0.07, top_m=5, lambda_kl=1.0, lambda_mse=1.0, device="cpu")
    far = (-deltas[3]).clone().requires_grad_(True)
    near = deltas[3].clone()
    assert float(term(near)) < float(term(far.detach()))
    term(far).backward()
    assert far.grad is not None and far.grad.norm() > 0
    assert ResidualBank.empty(8, 6).objective(k, 0.07, 5, 1.0, 1.0, "cpu") is None


def test_alignment_term_is_inert_at_zero_residual_and_does_not_freeze_adam():
    """Every value optimization starts at δ = 0, where cos(δ, ·) is undefined: the term must
    contribute nothing there, or its ~1/eps gradient fills Adam's second moment and δ never moves."""
    g = torch.Generator().manual_seed(7)
    bank = ResidualBank.empty(8, 6)
    bank.extend(torch.randn(10, 8, generator=g), torch.randn(10, 6, generator=g), [(1, i) for i in range(10)])
    term = bank.objective(torch.randn(8, generator=g), tau=0.07, top_m=5, lambda_kl=2.0, lambda_mse=8.0,
                          device="cpu")
    delta = torch.zeros(6, requires_grad=True)
    assert float(term(delta)) == 0.0
    target = torch.randn(6, generator=g) * 5
    opt = torch.optim.Adam([delta], lr=0.5)
    for _ in range(60):
        loss = (delta - target).pow(2).sum() + 0.01 * term(delta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float((delta.detach() - target).norm()) < 0.2 * float(target.norm())


def test_through_norm_writes_the_residual_a_post_norm_passes_on():
    """Gemma 3 norms the MLP's output before the stream: the δ found for the matrix's output
    gives the stream the residual asked for, also where some channels' gains are near zero."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from lifelong.edit.output_space import through_norm

    g = torch.Generator().manual_seed(0)
    d, n = 24, 5
    norm = Gemma3RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g) * 2)
        norm.weight[:3] = -1.0                                   # gain 1 + w = 0: unwritable channels
    y = torch.randn(n, d, generator=g) * 7
    wanted = torch.randn(n, d, generator=g) * 0.3
    with torch.no_grad():
        R = norm(y + wanted) - norm(y)                           # a residual the norm can give
        got = norm(y + through_norm(norm, y, R)) - norm(y)
        naive = norm(y + R) - norm(y)                            # writing R as it is
    assert float((got - R).norm() / R.norm()) < 1e-2
    assert float((naive - R).norm() / R.norm()) > 0.5


def test_output_norm_is_found_only_where_the_mlp_output_is_normed(tiny_gemma_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from lifelong.model.decoder import output_norm

    gemma = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert output_norm(gemma, "model.layers.1.mlp.down_proj") is gemma.model.layers[1].post_feedforward_layernorm
    assert output_norm(gemma, "model.layers.1.self_attn.o_proj") is None
    assert output_norm(llama, "model.layers.1.mlp.down_proj") is None
