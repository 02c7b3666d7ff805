"""Matmul precision for init's statistics passes: bfloat16 where the hardware multiplies it faster.

On CPUs with AVX512-BF16 or AMX (and on GPUs) a bfloat16 matmul runs about 2.5x a float32
one; elsewhere it is emulated and slower. The passes that estimate C₀ and the residual
Fisher are almost all matmuls, and their results are averages over tens of thousands of
tokens: under bfloat16 autocast the keys carry ~0.4 % error per element, C₀ moves by
~3e-3 relative and its null space keeps the same dimensions with overlap > 0.999
(experiments/bf16_stats.py). Sums of outer products stay in float32/float64.
"""
from __future__ import annotations

import contextlib
from typing import get_args

import torch

from lifelong.policy import Precision

CHOICES = get_args(Precision)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether this device multiplies bfloat16 natively (CUDA with bf16, or a CPU with
    AVX512-BF16/AMX); False where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, p)() for p in probes if hasattr(torch.cpu, p))
    except RuntimeError:
        return False


def resolve(setting: str, device: torch.device) -> str:
    """The precision a policy's `auto`/`float32`/`bfloat16` means on this device."""
    if setting not in CHOICES:
        raise ValueError(f"precision {setting!r}: expected one of {', '.join(CHOICES)}")
    if setting == "auto":
        return "bfloat16" if bf16_is_fast(device) else "float32"
    return setting


@contextlib.contextmanager
def matmuls(precision: str, model):
    """A context in which `model`'s float32 matmuls run at `precision` (a resolved one): under
    bfloat16 autocast, with each nn.Linear's weight cast once for the whole block instead of
    on every call (autocast recasts frozen weights each time: a third of a sampling step on
    Gemma's 262k-word head). Activations between the matmuls, the residual stream among them,
    stay float32 as under plain autocast; the float32 weights are back when the block ends."""
    if precision == "float32":
        yield
        return
    device = next(model.parameters()).device
    swapped = []
    try:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
                swapped.append((module, module.weight))
                module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        for module, weight in swapped:
            module.weight = weight


def exact(device: torch.device):
    """A context that turns autocast off again: for sums that must stay in float32."""
    return torch.autocast(device.type, enabled=False)
