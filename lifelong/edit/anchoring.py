"""Value-norm anchoring (NAS): every written value as long as a typical value of the unedited model.

Over a long sequence of edits the values v* = v₀ + δ (v₀ the last edited layer's MLP output at
the subject, δ the optimized residual) grow: each batch meets weights earlier edits have
moved and pushes harder. NAS rescales each v* to the mean ‖v*‖ measured on the unedited model
(the anchor, a number the policy carries) and skips an edit whose v* would exceed twice it,
so that no edit writes more than a typical one.
"""
from __future__ import annotations

import torch

SKIP_FACTOR = 2.0       # NAS: an edit whose ‖v*‖ exceeds this × the anchor is not written


def matrix_outputs(keys: torch.Tensor, module) -> torch.Tensor:
    """(u, d_out): what an edited matrix (with its bias) gives for each key."""
    from lifelong.model.weights import read_matrix

    y = keys.float() @ read_matrix(module).t()
    bias = getattr(module, "bias", None)
    return y + bias.detach().float() if bias is not None else y


def mlp_outputs(keys: torch.Tensor, module, norm=None) -> torch.Tensor:
    """v₀ (u, d_model): what the edited matrix at the last layer gives for each unit's key,
    through the norm that follows it where there is one (Gemma 3)."""
    y = matrix_outputs(keys, module)
    if norm is not None:
        with torch.no_grad():
            y = norm(y.to(next(norm.parameters()).dtype)).float()
    return y


def anchor_values(du: torch.Tensor, v0: torch.Tensor, anchor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(δ', kept, ‖v*‖) per unit: δ' makes ‖v₀ + δ'‖ = anchor in the direction of v* = v₀ + δ;
    units whose ‖v*‖ > SKIP_FACTOR·anchor are not kept and get δ' = 0 (their outputs held)."""
    v_star = v0 + du
    norms = v_star.norm(dim=-1)
    kept = norms <= SKIP_FACTOR * anchor
    scaled = v_star * (anchor / norms.clamp(min=1e-12))[:, None] - v0
    return torch.where(kept[:, None], scaled, torch.zeros_like(du)), kept, norms
