"""Everything a push reads from the store, read once: `EditInputs`.

One read of base.h5 (the edited layers' base W, the statistics the update uses, the residual
Fisher when values are stepped in it) and one read per batch file that the head uses (its
Δ factors when active; its keys and residuals when it holds live groups). `edit/` gets tensors
from here and never opens a store.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from lifelong.deltas import float64_sum
from lifelong.edit.alignment import ResidualBank
from lifelong.edit.batch import LayerContext
from lifelong.edit.fisher import preconditioner
from lifelong.errors import BadInput
from lifelong.policy import Policy
from lifelong.store import history
from lifelong.store.layout import BANK_DELTAS, BANK_KEYS, FISHER, UNITS, key_rows, layer_key
from lifelong.store.store import Store


@dataclass
class EditInputs:
    policy: Policy                                  # the store's policy with this push's overrides
    base: dict[int, torch.Tensor]                   # layer -> base W (d_out, d_in) fp32
    head64: dict[int, torch.Tensor]                 # layer -> base + ΣAB of the active batches, float64
    stats: dict[str, np.ndarray]                    # 'layer{l}/P' and/or 'layer{l}/mom2' the update uses
    kp: dict[int, list[np.ndarray]]                 # layer -> keys of the live earlier groups, per batch
    bank_keys: list[np.ndarray]                     # per batch holding live groups: (g, d_in)
    bank_deltas: list[np.ndarray]                   # (g, d_model)
    refs: list[tuple[int, int]]                     # (batch id, group index) per bank row
    fisher: np.ndarray | None                       # (d_model, d_model) with value_metric fisher

    @classmethod
    def read(cls, store: Store, records, policy: Policy, live: list[tuple[int, int]]) -> "EditInputs":
        """Read what a push at the head of `records` needs, with `live` the earlier groups it protects."""
        layers = policy.layers
        stat_names = (["P"] if policy.update.project else []) + (["mom2"] if _uses_mom2(policy) else [])
        names = [layer_key(l, "W") for l in layers] + [layer_key(l, x) for l in layers for x in stat_names]
        arrays = store.base_arrays(names, optional=(FISHER,) if policy.values.metric == "fisher" else ())
        if policy.values.metric == "fisher" and FISHER not in arrays:
            raise BadInput(f"store {store.path} has no residual Fisher: its init ran with value_metric "
                           f"{json.loads(store.policy_json).get('value_metric', 'euclidean')!r}, and "
                           f"value_metric 'fisher' steps δ in it",
                           hint="push with value_metric euclidean, or init a new store with this policy")
        base = {l: torch.from_numpy(arrays.pop(layer_key(l, "W"))) for l in layers}
        fisher = arrays.pop(FISHER, None)

        by_batch: dict[int, list[int]] = {}
        for b, g in live:
            by_batch.setdefault(b, []).append(g)
        active = {r.id for r in history.active(records)}
        factors: dict[int, list] = {l: [] for l in layers}
        kp: dict[int, list[np.ndarray]] = {l: [] for l in layers}
        bank_k, bank_d, refs = [], [], []
        for b in sorted(active | set(by_batch)):                # id order: one read per batch file
            want = [layer_key(l, n) for l in layers for n in ("A", "B")] if b in active else []
            gs = by_batch.get(b)
            if gs:
                want += [layer_key(l, "K") for l in layers] + [BANK_KEYS, BANK_DELTAS]
            arr = store.batch_arrays(b, want, optional=(UNITS,) if gs else ())
            if b in active:
                for l in layers:
                    factors[l].append((torch.from_numpy(arr[layer_key(l, "A")]),
                                       torch.from_numpy(arr[layer_key(l, "B")])))
            if gs:
                rows = key_rows(arr, gs)
                for l in layers:
                    kp[l].append(arr[layer_key(l, "K")][rows])
                bank_k.append(arr[BANK_KEYS][gs])
                bank_d.append(arr[BANK_DELTAS][gs])
                refs.extend((b, g) for g in gs)
        head64 = {l: float64_sum(base[l], factors[l]) for l in layers}
        return cls(policy, base, head64, arrays, kp, bank_k, bank_d, refs, fisher)

    def protection(self, device) -> tuple[dict[int, LayerContext], ResidualBank]:
        """Per layer P, C₀ and K_pK_pᵀ over the live groups, and their residual bank."""
        policy = self.policy
        ctx = {}
        for l in policy.layers:
            KpKpT = None
            if self.kp[l] and (policy.update.project or policy.update.hold_earlier):         # the solves that use it
                Kp = torch.from_numpy(np.concatenate(self.kp[l])).to(device)     # (n_live, d_in) fp32
                KpKpT = (Kp.t() @ Kp).to(torch.float64)                          # fp32 BLAS: 2× faster
            P, mom2 = self.stats.get(layer_key(l, "P")), self.stats.get(layer_key(l, "mom2"))
            ctx[l] = LayerContext(
                P=torch.from_numpy(P).to(device) if P is not None else None,
                mom2=torch.from_numpy(mom2).to(device) if mom2 is not None else None,
                KpKpT=KpKpT,
                drift=((self.head64[l] - self.base[l].double()).to(device)
                       if policy.experiment.repair_weight > 0 and not policy.update.project else None),
            )
        d_out, d_in = self.base[policy.layers[-1]].shape
        bank = ResidualBank.empty(d_in, d_out)
        if self.bank_keys:
            bank.extend(torch.from_numpy(np.concatenate(self.bank_keys)),
                        torch.from_numpy(np.concatenate(self.bank_deltas)), self.refs)
        return ctx, bank

    def metric(self, device) -> torch.Tensor | None:
        """The inverse metric δ's normalized steps are measured in: None (Euclidean), or with
        value_metric fisher the preconditioner of the F that init stored."""
        if self.fisher is None:
            return None
        return preconditioner(torch.from_numpy(self.fisher)).to(device)


def _uses_mom2(policy: Policy) -> bool:
    """C₀ enters the MEMIT-style solve, or the projected one with preserve_weight."""
    return not policy.update.project or policy.experiment.preserve_weight > 0
