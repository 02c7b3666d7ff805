"""The edited MLP output matrices: access, fingerprints and materialisation.

Every edit is expressed on W ∈ R^{d_out×d_in} (out × in), whatever the module stores:
`nn.Linear` keeps W as is, GPT-2's `Conv1D` keeps Wᵀ. Shapes come from the weights.
The model at batch N is base + the Δ = A·B of the active batches, summed in float64 and
rounded to fp32 once, by `materialize` alone, so a rollback recomputes exactly the floats
a push produced.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .errors import BadInput, EditFailed


def module_name(template: str, layer: int) -> str:
    return template.replace("{}", str(layer))


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise BadInput(
            f"the model has no module {name!r}",
            hint="check module_template in the policy against the model's architecture",
        ) from exc


def is_transposed(module: torch.nn.Module) -> bool:
    """True for GPT-2's Conv1D, whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def read_matrix(module: torch.nn.Module) -> torch.Tensor:
    """W as (d_out, d_in), a fresh fp32 copy."""
    w = module.weight.detach()
    return (w.t() if is_transposed(module) else w).to(torch.float32).clone()


def write_matrix(module: torch.nn.Module, w: torch.Tensor) -> None:
    """Set the module's weight from W (d_out, d_in), bit for bit."""
    target = module.weight
    value = w.t() if is_transposed(module) else w
    if tuple(value.shape) != tuple(target.shape):
        raise EditFailed(f"shape mismatch writing {tuple(value.shape)} into {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def fingerprint(w: torch.Tensor) -> str:
    """sha256 of W's fp32 bytes in (d_out, d_in) layout."""
    arr = np.ascontiguousarray(w.detach().to(torch.float32).cpu().numpy())
    return hashlib.sha256(arr.tobytes()).hexdigest()


def float64_sum(start: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """start + A₁B₁ + A₂B₂ + … in float64, in order: `materialize`'s sum before its rounding.

    On the CPU whatever device the model is on, so a store's fingerprints hold on every
    machine. start is the base, or such a sum, which a long history (the format migration, the
    scale bench) extends batch by batch: the same operations, so the same bits.
    """
    w = start.detach().to("cpu", torch.float64, copy=True)  # (d_out, d_in)
    for a, b in factors:  # a: (d_out, r), b: (r, d_in)
        w.addmm_(a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64))
    return w


def materialize(base: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """base + A₁B₁ + A₂B₂ + … summed in float64 and rounded to fp32 once; the one place
    weights are computed (store format 2; format 1 rounded after each term).

    One rounding keeps the merged weights as close to base(x) + ΣA(Bx) (a PEFT adapter
    of the stacked factors) as fp32 allows, however many batches are active, and makes
    them a function of the active set alone.
    """
    return float64_sum(base, factors).to(torch.float32)


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise EditFailed(f"{name} contains NaN or inf; nothing was applied or stored")
