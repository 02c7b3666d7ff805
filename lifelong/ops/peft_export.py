"""The cumulative edit as a PEFT LoRA adapter (`lifelong export --format peft`).

The model at head is base + Σ over the active batches of A_i·B_i on each edited matrix
W (d_out × d_in). Stacking the factors gives one LoRA per edited module with

    lora_B = [A₁ A₂ …]   (d_out × R),   lora_A = [B₁; B₂; …]   (R × d_in),   R = Σ rᵢ,

and lora_alpha = r, so PEFT's scaling is 1 and its output base(x) + lora_B(lora_A(x))
equals the merged model's up to float rounding. When the stack is wider than its rank
(R > min(d_out, d_in), or redundant columns after supersessions) it is refactored
exactly: QR of each stacked factor, an SVD of the small core, and only the singular
values above 1e-7·σ_max are kept (balanced √σ split), so ΔW is unchanged up to float
error. Ranks may then differ per module: `rank_pattern` / `alpha_pattern` carry them.

The adapter applies to the store's unedited base model, whose transformers folder
(`model.loading.checkpoint_dir`, converted once from GGUF when needed) is written as
`base_model_name_or_path` and in `lifelong_export.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lifelong import __version__
from lifelong.store import history
from lifelong.store.atomic import staged_dir
from lifelong.errors import BadInput, EditFailed
from lifelong.ops import quiet
from lifelong.model.loading import ModelSource, checkpoint_dir, load_model
from lifelong.policy import policy_from_json
from lifelong.model.session import active_factors, expected_fingerprints, head_weights, verify
from lifelong.store.store import Store
from lifelong.model.weights import get_module, is_transposed, read_matrix

RANK_RTOL = 1e-7      # singular values below RANK_RTOL·σ_max are exact zeros in float terms
CHECK_RTOL = 1e-5     # the written adapter must reproduce W_head − W_base to this (× max|W|)


def stacked_factors(store: Store, records, policy) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per edited layer (A_cat (d_out × R), B_cat (R × d_in)) over the active batches, as stored (fp32)."""
    return {l: (torch.cat([a for a, _ in ab], dim=1), torch.cat([b for _, b in ab], dim=0))
            for l, ab in active_factors(store, records, policy).items() if ab}


def thin_factors(a: torch.Tensor, b: torch.Tensor, rtol: float = RANK_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact factorisation a'·b' = a·b with rank a' = numerical rank of a·b.

    a: (d_out, R), b: (R, d_in). QR of a and of bᵀ, SVD of the small core Ra·Rbᵀ, keep
    σ > rtol·σ_max; a' = Qa U √σ, b' = √σ Vᵀ Qbᵀ. Never forms the d_out × d_in product.
    """
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    qa, ra = torch.linalg.qr(a64)                 # (d_out, ka), (ka, R)
    qb, rb = torch.linalg.qr(b64.t())             # (d_in, kb), (kb, R)
    u, s, vh = torch.linalg.svd(ra @ rb.t(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return a.new_zeros(a.shape[0], 0), b.new_zeros(0, b.shape[1])
    k = int((s > rtol * s[0]).sum())
    root = s[:k].sqrt()
    a_new = (qa @ u[:, :k]) * root                # (d_out, k)
    b_new = root[:, None] * (vh[:k] @ qb.t())     # (k, d_in)
    return a_new.to(torch.float32).contiguous(), b_new.to(torch.float32).contiguous()


def lora_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(lora_B, lora_A, compressed): the stack as is when it is already thin, else `thin_factors`."""
    thin_a, thin_b = thin_factors(a, b)
    if thin_a.shape[1] < a.shape[1]:
        return thin_a, thin_b, True
    return a.contiguous(), b.contiguous(), False


def lora_adapter(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 base_name_or_path: str):
    """`model` wrapped by PEFT with one LoRA per named module holding its (lora_B, lora_A).

    lora_B: (d_out, r), lora_A: (r, d_in), any r per module (rank_pattern); alpha = r,
    so the scaling is 1 and the module computes base(x) + x·lora_Aᵀ·lora_Bᵀ. `model` is
    modified in place (PEFT injects its layers).
    """
    from peft import LoraConfig, get_peft_model

    targets = list(factors)
    ranks = {n: int(f[0].shape[1]) for n, f in factors.items()}
    if not targets or min(ranks.values()) < 1:
        raise EditFailed(f"export: every adapted module needs rank ≥ 1, got {ranks}")
    kinds = {is_transposed(get_module(model, n)) for n in targets}
    if len(kinds) != 1:
        raise EditFailed(f"export: {targets} mix Conv1D and Linear modules; one adapter cannot carry both")
    r0 = ranks[targets[0]]
    config = LoraConfig(target_modules=targets, r=r0, lora_alpha=r0, rank_pattern=dict(ranks),
                        alpha_pattern=dict(ranks), lora_dropout=0.0, bias="none",
                        fan_in_fan_out=kinds.pop(), task_type="CAUSAL_LM",
                        base_model_name_or_path=base_name_or_path)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name_or_path
    inner = peft_model.base_model.model
    for name, (lora_b, lora_a) in factors.items():
        mod = inner.get_submodule(name)
        wa, wb = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        if tuple(wa.shape) != tuple(lora_a.shape) or tuple(wb.shape) != tuple(lora_b.shape):
            raise EditFailed(f"export: PEFT made {name} lora_A {tuple(wa.shape)}, lora_B {tuple(wb.shape)}; "
                             f"expected {tuple(lora_a.shape)}, {tuple(lora_b.shape)}",
                             hint="report this as a bug (peft version?); nothing was written")
        if float(mod.scaling["default"]) != 1.0:
            raise EditFailed(f"export: PEFT scaling for {name} is {mod.scaling['default']}, not 1",
                             hint="report this as a bug (peft version?); nothing was written")
        with torch.no_grad():
            wa.copy_(lora_a.to(wa.dtype))
            wb.copy_(lora_b.to(wb.dtype))
    return peft_model


def export_peft(path, out, at: int | None = None, log=quiet) -> dict:
    """Write the cumulative edit at head (or after batch `at`) as a PEFT LoRA adapter in `out`."""
    store = Store.open(path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} exists and is not empty", hint="export into a new directory")
    records = store.records if at is None else history.rolled_back(store.records, at)
    head = history.head(records)
    if not history.active(records):
        raise BadInput(f"nothing to export: no batch is active at head {head}, so the adapter would be empty",
                       hint="serve the base model as it is, or push a batch first")
    policy = policy_from_json(store.policy_json)
    expected = expected_fingerprints(store, records)
    weights = head_weights(store, records, policy)   # the exact floats of the merged model
    verify(weights, expected, "export")

    source = ModelSource(**store.model["source"])
    base_dir = checkpoint_dir(source, log=log)
    model, _tok = load_model(source, device="cpu", log=log)
    names = {l: policy.module_name(l) for l in policy.layers}
    base = {l: read_matrix(get_module(model, n)) for l, n in names.items()}
    verify(base, store.base_fingerprint, f"{base_dir} is not the store's base model")

    factors, layers = {}, {}
    for l, (a, b) in stacked_factors(store, records, policy).items():
        lora_b, lora_a, compressed = lora_factors(a, b)
        layers[str(l)] = {"module": names[l], "rank": int(lora_b.shape[1]), "stacked_rank": int(a.shape[1]),
                          "compressed": compressed}
        if lora_b.shape[1] > 0:
            factors[l] = (lora_b, lora_a)
        log(f"layer {l}: rank {lora_b.shape[1]}" + (f" (from {a.shape[1]} stacked)" if compressed else ""))
    if not factors:
        raise BadInput(f"nothing to export: the active batches at head {head} sum to a zero edit",
                       hint="serve the base model as it is")

    for l, (lora_b, lora_a) in factors.items():   # the adapter must be the merged model's edit
        want = weights[l].to(torch.float64) - base[l].to(torch.float64)
        err = float((lora_b.to(torch.float64) @ lora_a.to(torch.float64) - want).abs().max())
        scale = max(float(base[l].abs().max()), float(weights[l].abs().max()), 1.0)
        if err > CHECK_RTOL * scale:
            raise EditFailed(f"export: layer {l} adapter differs from the merged edit by {err:.3g}",
                             hint="report this as a bug; nothing was written")

    peft_model = lora_adapter(model, {names[l]: f for l, f in factors.items()}, str(base_dir))

    with staged_dir(out) as tmp:
        peft_model.save_pretrained(tmp)
        meta = {"format": "peft", "lifelong_version": __version__, "store": str(Path(store.path).resolve()), "head": head,
                "active_batches": [r.id for r in history.active(records)],
                "base_model": str(base_dir), "base_source": source.to_dict(),
                "fingerprints": expected, "layers": layers}
        (tmp / "lifelong_export.json").write_text(json.dumps(meta, indent=2))
    return {"out": str(out), **meta}
