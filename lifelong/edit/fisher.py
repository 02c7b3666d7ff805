"""How much ordinary text's loss moves when the residual stream moves: the metric δ is stepped in.

A batch writes each δ into the edited layers' outputs (MEMIT's spreading), and every token
of ordinary text whose key overlaps the edited keys gets part of it. To second order the
loss of that text grows by ½·rᵀFr per token for a residual r, where
  F = Σ_l E_t[g_t g_tᵀ],   g_t = ∂(Σ next-token NLL of the sequence)/∂h^l_t,
the empirical Fisher of the LM loss with respect to the output h^l of each edited decoder
layer, summed over those layers (d_model × d_model). F is far from isotropic (SmolLM2-135M:
eigenvalues 0.1–50× their mean), and a δ stepped straight down the target's gradient lies
in directions about 1.5× more sensitive than average. Normalized steps measured in F
(`preconditioner`) reach the same target through directions text is less sensitive to.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from lifelong.model.corpus import padded_batches
from lifelong.model.hooks import hooks

RIDGE = 0.01   # × mean eigenvalue: keeps F invertible when estimated from fewer tokens than d_model


@contextmanager
def _frozen(model):
    """Parameters without gradients while the block runs (autograd then starts at the leaves we make)."""
    was = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)
        yield
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)


def residual_fisher(model, layer_names: list[str], seqs: list[list[int]], batch: int = 8,
                    progress=None) -> tuple[dict[str, torch.Tensor], int]:
    """F_l (d_model, d_model) float64 for each decoder layer of `layer_names` (forward order),
    averaged over the scored tokens of seqs; and that token count. The metric is their sum.

    The first layer's output is made a leaf, so the backward pass stops there: the layers
    below it are never differentiated. Each sequence's NLL is summed, so g_t holds what
    position t's residual does to every later token's loss.
    """
    device = next(model.parameters()).device
    outs: dict[str, torch.Tensor] = {}

    def make(name, first):
        def post(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output       # (n, T, d_model)
            if first:
                h = h.detach().requires_grad_(True)
            outs[name] = h
            if not first:
                return None
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return post

    spec = {n: ("post", make(n, i == 0)) for i, n in enumerate(layer_names)}
    total: dict[str, torch.Tensor] = {}
    count = 0
    with _frozen(model), hooks(model, spec):
        for ids, mask in padded_batches(seqs, batch, device):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits   # (n, T, vocab)
            scored = mask[:, 1:].bool()                                                    # (n, T-1)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), ids[:, 1:][scored],
                                                    reduction="sum")
            grads = torch.autograd.grad(nll, [outs[n] for n in layer_names])
            keep = mask.bool().reshape(-1)
            for name, g in zip(layer_names, grads):
                g = g.reshape(-1, g.shape[-1])[keep].to(torch.float64)                   # (tokens, d_model)
                acc = (g.t() @ g).cpu()
                total[name] = acc if name not in total else total[name] + acc
            count += int(scored.sum())
            outs.clear()
            if progress is not None:
                progress(int(mask.sum()))
    return {n: f / max(count, 1) for n, f in total.items()}, count


def preconditioner(fisher: torch.Tensor) -> torch.Tensor:
    """(F̃ + RIDGE·I)⁻¹ (d, d) float32, F̃ = F scaled to mean eigenvalue 1: the inverse metric
    a normalized step multiplies the gradient by. Scaling keeps step_size's meaning: a step
    of step_size·‖h‖ in F̃ is as long as a Euclidean one in a direction of average sensitivity."""
    F = fisher.to(torch.float64)
    F = F / F.diagonal().mean()
    return torch.linalg.inv(F + RIDGE * torch.eye(F.shape[0], dtype=F.dtype)).to(torch.float32)
