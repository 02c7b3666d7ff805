"""The closed-form weight update of one layer, returned as low-rank factors Δ = A·B.

AlphaEdit (seed 002): Δᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ, which equals
argmin over X = XP of ‖XK − R‖² + ‖XK_p‖² + α‖X‖²: keys in C₀'s dominant directions
(P k ≈ 0) keep their outputs, and earlier edits' keys K_p are held in place. The policy's
preserve_weight λ_p adds λ_p·P·C₀ (0: as published).
MEMIT (projection off): Δ = R Kᵀ (λC₀ + KKᵀ)⁻¹; with the policy's hold_earlier,
Δ = R Kᵀ (λC₀ + KKᵀ + K_pK_pᵀ)⁻¹, whose limit for small λ is the update that writes R
exactly, holds K_p exactly and changes the preserved keys' outputs least, tr(Δ C₀ Δᵀ).
ENCORE's Frobenius term λ_F·(tr C₀/d)·I in the same solve bounds ‖Δ‖ itself.
Both have rank ≤ n (the batch's write units, one per fact): A = R (d_out, n), B (n, d_in);
the repair term (LyapLock) adds a full-width part, n + d_out factor columns.
"""
from __future__ import annotations

import torch

from lifelong.errors import EditFailed


def projected_update(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor,
                     KpKpT: torch.Tensor | None, alpha: float,
                     mom2: torch.Tensor | None = None, preserve: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit factors. R: (d_out, n) residuals, K: (d_in, n) keys, P: (d_in, d_in).

    With preserve > 0, P(KKᵀ + K_pK_pᵀ + preserve·C₀) in the solve: the objective gains
    preserve·tr(Δ C₀ Δᵀ), the preserved keys' output change that P leaves when C₀ has
    no true null space."""
    dev = P.device  # the stored statistics' device decides where the solve runs
    K64, P64 = K.to(dev, torch.float64), P.to(torch.float64)
    d_in = K64.shape[0]
    PK = P64 @ K64                                                   # (d_in, n)
    M = PK @ K64.t() + alpha * torch.eye(d_in, dtype=torch.float64, device=dev)   # P KKᵀ: rank n
    if KpKpT is not None:
        M = M + P64 @ KpKpT.to(dev, torch.float64)
    if preserve > 0:
        M = M + preserve * (P64 @ mom2.to(dev, torch.float64))
    X = _solve(M, PK)                                                # (d_in, n)
    return R.to(torch.float32).clone(), X.t().to(torch.float32).contiguous()


def memit_update(R: torch.Tensor, K: torch.Tensor, mom2: torch.Tensor,
                 weight: float, KpKpT: torch.Tensor | None = None,
                 frobenius: float = 0.0, drift: torch.Tensor | None = None,
                 repair: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT factors against the mean second moment C₀ with ridge weight λ; with KpKpT,
    earlier edits' keys enter the solve too and are held in place. frobenius λ_F adds
    λ_F·(tr C₀/d)·I: the objective gains λ_F·(tr C₀/d)·‖Δ‖² (ENCORE).

    repair μ with drift D (d_out, d_in), the change earlier batches left in this matrix:
    the objective gains μ·tr((D + Δ) C₀ (D + Δ)ᵀ), how far the preserved keys' outputs then
    are from the base model's (LyapLock's pull back to the base), so
    Δ (λC₀ + μC₀ + KKᵀ + K_pK_pᵀ) = R Kᵀ − μ D C₀. The pull is a full-width matrix Y: the
    factors are A = [R, I] (d_out, n + d_out) and B = [Xᵀ; Y] (n + d_out, d_in)."""
    K64 = K.to(mom2.device, torch.float64)
    C0 = mom2.to(torch.float64)
    pull = repair > 0 and drift is not None
    M = (weight + (repair if pull else 0.0)) * C0 + K64 @ K64.t()    # (d_in, d_in)
    if KpKpT is not None:
        M = M + KpKpT.to(mom2.device, torch.float64)
    if frobenius > 0:
        d = C0.shape[0]
        M = M + frobenius * (torch.trace(C0) / d) * torch.eye(d, dtype=torch.float64, device=C0.device)
    if not pull:
        X = _solve(M, K64)                                           # (d_in, n)
        return R.to(torch.float32).clone(), X.t().to(torch.float32).contiguous()
    D = drift.to(mom2.device, torch.float64)                         # (d_out, d_in)
    XY = _solve(M, torch.cat([K64, -repair * (C0 @ D.t())], dim=1))  # (d_in, n + d_out); M, C₀ symmetric
    A = torch.cat([R.to(torch.float32), torch.eye(D.shape[0], dtype=torch.float32, device=R.device)], dim=1)
    return A, XY.t().to(torch.float32).contiguous()


def _solve(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    try:
        X = torch.linalg.solve(M, rhs)
    except RuntimeError as exc:  # singular: report, never apply
        raise EditFailed(f"the update's linear system is singular ({exc}); nothing was applied") from exc
    if not torch.isfinite(X).all():
        raise EditFailed("the update's solution contains NaN or inf; nothing was applied")
    return X
