"""Reading and writing the edited MLP output matrices of a loaded model.

Every edit is expressed on W ∈ R^{d_out×d_in} (out × in), whatever the module stores:
`nn.Linear` keeps W as is, GPT-2's `Conv1D` keeps Wᵀ. Shapes come from the weights.
How the weights at a head are computed and hashed is `lifelong.deltas`.
"""
from __future__ import annotations

import torch

from lifelong.errors import BadInput, EditFailed


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


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise EditFailed(f"{name} contains NaN or inf; nothing was applied or stored")
