"""A loaded model bound to a store: base identity checked, head weights applied.

Weights of the edited matrices are always `weights.materialize`'s sum (float64, rounded
once) of the base copy the store keeps and the Δ factors of the active batches, checked against
the fingerprints recorded at push time: a mismatch is an error, never a warning.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import history
from .errors import FingerprintMismatch
from .models import ModelSource, load_model
from .policy import Policy, policy_from_json
from .store import Store
from .weights import fingerprint, float64_sum, get_module, module_name, read_matrix, write_matrix


def layer_key(layer: int, what: str) -> str:
    """Array name inside the store: 'layer4/W'."""
    return f"layer{layer}/{what}"


def active_factors(store: Store, records, policy: Policy) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per edited layer the (A (d_out, r), B (r, d_in)) of the active batches of `records`, in id order."""
    factors: dict[int, list] = {l: [] for l in policy.layers}
    for rec in history.active(records):
        arrays = store.batch_arrays(rec.id, [layer_key(l, n) for l in policy.layers for n in ("A", "B")])
        for l in policy.layers:
            factors[l].append((torch.from_numpy(arrays[layer_key(l, "A")]),
                               torch.from_numpy(arrays[layer_key(l, "B")])))
    return factors


def head_sums(store: Store, records, policy: Policy) -> dict[int, torch.Tensor]:
    """Per edited layer base + ΣAB of the active batches of `records` in float64: `materialize`'s
    sum before its rounding, which a push extends by its own Δ (`Session.with_edit`)."""
    base = store.base_arrays([layer_key(l, "W") for l in policy.layers])
    factors = active_factors(store, records, policy)
    return {l: float64_sum(torch.from_numpy(base[layer_key(l, "W")]), factors[l]) for l in policy.layers}


def head_weights(store: Store, records, policy: Policy) -> dict[int, torch.Tensor]:
    """Edited matrices at the head of `records`, from the store alone (no model needed):
    `materialize`'s float64 sums rounded to fp32 once."""
    return {l: w.to(torch.float32) for l, w in head_sums(store, records, policy).items()}


def expected_fingerprints(store: Store, records) -> dict[str, str]:
    """What the edited matrices must hash to at the head of `records`."""
    head = history.head(records)
    if head == 0:
        return dict(store.base_fingerprint)
    return dict(next(r for r in records if r.id == head).fingerprint_after)


def verify(weights: dict[int, torch.Tensor], expected: dict[str, str], what: str) -> None:
    for layer, w in weights.items():
        want = expected.get(str(layer))
        got = fingerprint(w)
        if want is not None and got != want:
            raise FingerprintMismatch(
                f"{what}: layer {layer} weights hash {got[:12]}…, the store recorded {want[:12]}…",
                hint="the store and the weights disagree; do not serve this model, report the store",
            )


@dataclass
class Session:
    store: Store
    policy: Policy
    model: torch.nn.Module
    tok: object
    contexts: list[str]
    head64: dict[int, torch.Tensor] | None = None  # the head's float64 sums, kept for a push

    @classmethod
    def open(cls, store: Store, log=print, records=None, keep_sums: bool = False) -> "Session":
        """Load the store's base model, check it is the same model, apply the head.
        keep_sums: keep the head's float64 sums (d_out × d_in per layer) for `with_edit`."""
        policy = policy_from_json(store.policy_json)
        source = ModelSource(**store.model["source"])
        model, tok = load_model(source, log=log)
        session = cls(store, policy, model, tok, list(store.info["contexts"]))
        base = {l: read_matrix(session.module(l)) for l in policy.layers}
        verify(base, store.base_fingerprint, f"model {source.name!r} is not the store's base model")
        sums = head_sums(store, records if records is not None else store.records, policy)
        session.apply({l: w.to(torch.float32) for l, w in sums.items()})   # = head_weights
        session.head64 = sums if keep_sums else None
        return session

    def with_edit(self, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """The head plus one more Δ = A·B per layer, rounded once: the same floats as
        `materialize` of the base with every active Δ and this one, which a later rollback
        to this edit computes, without reading the history again."""
        return {l: float64_sum(self.head64[l], [factors[l]]).to(torch.float32) for l in self.policy.layers}

    def module(self, layer: int):
        return get_module(self.model, module_name(self.policy.module_template, layer))

    def current(self) -> dict[int, torch.Tensor]:
        return {l: read_matrix(self.module(l)) for l in self.policy.layers}

    def apply(self, weights: dict[int, torch.Tensor]) -> None:
        for l, w in weights.items():
            write_matrix(self.module(l), w)

    @contextmanager
    def weights(self, weights: dict[int, torch.Tensor]):
        """Temporarily run with other edited-layer weights (e.g. the base model)."""
        saved = self.current()
        self.apply(weights)
        try:
            yield
        finally:
            self.apply(saved)

    def base(self) -> dict[int, torch.Tensor]:
        arrays = self.store.base_arrays([layer_key(l, "W") for l in self.policy.layers])
        return {l: torch.from_numpy(arrays[layer_key(l, "W")]) for l in self.policy.layers}
