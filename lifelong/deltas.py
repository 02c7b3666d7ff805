"""The weights at a head: base + the Δ = A·B of the active batches, and their fingerprints.

The model at batch N is base + ΣAB summed in float64 and rounded to fp32 once, by
`materialize` alone, so a rollback recomputes exactly the floats a push produced; a
fingerprint is the sha256 of those fp32 bytes. The store's records hold these hashes and
its format migrations recompute them, so this rule sits below both the store and the model.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


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
