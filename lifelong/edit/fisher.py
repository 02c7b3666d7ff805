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


def residual_fisher(model, layer_names: list[str], seqs: list[list[int]], batch: int = 16,
                    progress=None) -> tuple[dict[str, torch.Tensor], int]:
    """F_l (d_model, d_model) float64 for each decoder layer of `layer_names` (forward order),
    averaged over the scored tokens of seqs; and that token count. The metric is their sum.

    The first layer's output is made a leaf, so the backward pass stops there: the layers
    below it are never differentiated. Each sequence's NLL is summed, so g_t holds what
    position t's residual does to every later token's loss. Its gradient at the LM head's
    input is written down directly (`head_gradient`) where the head is a plain linear map,
    so the (tokens × vocab) logits are never differentiated: with Gemma's 262k words that
    bookkeeping cost a third of the pass.
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
    direct = None                                      # decided on the first batch
    with _frozen(model), hooks(model, spec):
        for ids, mask in padded_batches(seqs, batch, device):
            scored = mask[:, 1:].bool()                                                    # (n, T-1)
            if direct is None:
                direct = _head_is_direct(model, ids[:1], mask[:1])
                weight = _autocast_weight(model.get_output_embeddings().weight)
            if direct:
                hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                seed = head_gradient(model, hidden.detach(), ids, scored, weight)
                grads = torch.autograd.grad(hidden, [outs[n] for n in layer_names], grad_outputs=seed)
            else:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits   # (n, T, vocab)
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


HEAD_CHUNK = 512   # positions per chunk of logits: 512 × 262k float32 is 537 MB


def _autocast_weight(w: torch.Tensor) -> torch.Tensor:
    """The head's weight in the dtype autocast would cast it to on every call, cast once
    (Gemma's is 670 MB in float32)."""
    dev = w.device.type
    return w.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else w


def head_gradient(model, hidden: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """∂(Σ scored next-token NLL)/∂hidden (n, T, d): (softmax(z) − onehot(y))·W per scored
    position, through the final soft cap z = c·tanh(a/c) where the model has one (Gemma 2/3);
    zero at the last position and at padding. Logits are made a chunk at a time; weight is
    the head's weight in the precision to multiply in (default: as stored)."""
    head = model.get_output_embeddings()
    weight = head.weight if weight is None else weight
    bias = None if head.bias is None else head.bias.to(weight.dtype)
    cap = getattr(model.config, "final_logit_softcapping", None)
    n, T, d = hidden.shape
    out = torch.zeros(n, T, d, dtype=hidden.dtype, device=hidden.device)
    rows, cols = scored.nonzero(as_tuple=True)                         # positions t whose t+1 is scored
    for start in range(0, len(rows), HEAD_CHUNK):
        r, c = rows[start:start + HEAD_CHUNK], cols[start:start + HEAD_CHUNK]
        with torch.no_grad():
            a = torch.nn.functional.linear(hidden[r, c].to(weight.dtype), weight, bias)  # (k, vocab)
            if cap:
                a = torch.tanh(a.float() / cap)
                slope = 1 - a * a                                        # dz/da with z = cap·tanh(a/cap)
                p = torch.softmax(a * cap, dim=-1)
            else:   # in the head's precision: a bfloat16 softmax is the float32 one rounded, 4x faster
                p = torch.softmax(a, dim=-1)                             # than converting 262k columns twice
            p[torch.arange(len(r)), ids[r, c + 1]] -= 1
            if cap:
                p = p * slope
            out[r, c] = (p.to(weight.dtype) @ weight).to(out.dtype)
    return out


def _head_is_direct(model, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the model's logits are its output embedding (a linear map, soft-capped where the
    config says so) of base_model's last hidden state: checked on one row, so an architecture
    that scales or reshapes its logits otherwise falls back to differentiating them."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or model.base_model is model:
        return False
    cap = getattr(model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        got = head(model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state).float()
        if cap:
            got = cap * torch.tanh(got / cap)
    return torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def preconditioner(fisher: torch.Tensor) -> torch.Tensor:
    """(F̃ + RIDGE·I)⁻¹ (d, d) float32, F̃ = F scaled to mean eigenvalue 1: the inverse metric
    a normalized step multiplies the gradient by. Scaling keeps step_size's meaning: a step
    of step_size·‖h‖ in F̃ is as long as a Euclidean one in a direction of average sensitivity."""
    F = fisher.to(torch.float64)
    F = F / F.diagonal().mean()
    return torch.linalg.inv(F + RIDGE * torch.eye(F.shape[0], dtype=F.dtype)).to(torch.float32)
