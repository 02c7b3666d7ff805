"""A loaded model bound to a store: base identity checked, head weights applied.

Weights of the edited matrices are always `deltas.materialize`'s sum (float64, rounded
once) of the base copy the store keeps and the Δ factors of the active batches, checked against
the fingerprints recorded at push time: a mismatch is an error, never a warning.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lifelong.store import history
from lifelong.errors import FingerprintMismatch
from lifelong.model.loading import ModelSource, load_model
from lifelong.policy import Policy, policy_from_json
from lifelong.store.store import Store
from lifelong.deltas import fingerprint, float64_sum
from lifelong.model.weights import get_module, read_matrix, write_matrix
from lifelong.store.layout import layer_key


def active_factors(store: Store, records, policy: Policy) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per edited layer the (A (d_out, r), B (r, d_in)) of the active batches of `records`, in id order."""
    factors: dict[int, list] = {l: [] for l in policy.layers}
    for rec in history.active(records):
        arrays = store.batch_arrays(rec.id, [layer_key(l, n) for l in policy.layers for n in ("A", "B")])
        for l in policy.layers:
            factors[l].append((torch.from_numpy(arrays[layer_key(l, "A")]),
                               torch.from_numpy(arrays[layer_key(l, "B")])))
    return factors


def base_weights(store: Store, policy: Policy) -> dict[int, torch.Tensor]:
    """Per edited layer the base W (d_out, d_in) fp32 that init stored."""
    arrays = store.base_arrays([layer_key(l, "W") for l in policy.layers])
    return {l: torch.from_numpy(arrays[layer_key(l, "W")]) for l in policy.layers}


def head_sums(store: Store, records, policy: Policy) -> dict[int, torch.Tensor]:
    """Per edited layer base + ΣAB of the active batches of `records` in float64: `materialize`'s
    sum before its rounding, which a push extends by its own Δ (`Session.with_edit`)."""
    base = base_weights(store, policy)
    factors = active_factors(store, records, policy)
    return {l: float64_sum(base[l], factors[l]) for l in policy.layers}


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
    def open(cls, store: Store, log=print, records=None, keep_sums: bool = False,
             sums: dict[int, torch.Tensor] | None = None) -> "Session":
        """Load the store's base model, check it is the same model, apply the head.
        keep_sums: keep the head's float64 sums (d_out × d_in per layer) for `with_edit`;
        sums: those sums when the caller has already read them (`ops.inputs`)."""
        policy = policy_from_json(store.policy_json)
        source = ModelSource(**store.model["source"])
        model, tok = load_model(source, log=log)
        session = cls(store, policy, model, tok, list(store.info["contexts"]))
        base = {l: read_matrix(session.module(l)) for l in policy.layers}
        verify(base, store.base_fingerprint, f"model {source.name!r} is not the store's base model")
        if sums is None:
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
        return get_module(self.model, self.policy.module_name(layer))

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
        return base_weights(self.store, self.policy)
