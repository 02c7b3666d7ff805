"""A loaded model bound to a store: base identity checked, head weights applied.

Weights of the edited matrices are always computed by `weights.materialize` from the
base copy the store keeps and the Δ factors of the active batches, and checked against
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
from .weights import fingerprint, get_module, materialize, module_name, read_matrix, write_matrix


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


def head_weights(store: Store, records, policy: Policy, extra=None) -> dict[int, torch.Tensor]:
    """Edited matrices at the head of `records`, from the store alone (no model needed).

    extra: per layer one more (A, B) after the active batches: a push's own edit, not yet
    stored, so that its weights are computed exactly as a later rollback to it will.
    """
    base = store.base_arrays([layer_key(l, "W") for l in policy.layers])
    factors = active_factors(store, records, policy)
    for l, ab in (extra or {}).items():
        factors[l].append(ab)
    return {l: materialize(torch.from_numpy(base[layer_key(l, "W")]), factors[l]) for l in policy.layers}


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

    @classmethod
    def open(cls, store: Store, log=print, records=None) -> "Session":
        """Load the store's base model, check it is the same model, apply the head."""
        policy = policy_from_json(store.policy_json)
        source = ModelSource(**store.model["source"])
        model, tok = load_model(source, log=log)
        session = cls(store, policy, model, tok, list(store.info["contexts"]))
        base = {l: read_matrix(session.module(l)) for l in policy.layers}
        verify(base, store.base_fingerprint, f"model {source.name!r} is not the store's base model")
        session.apply(head_weights(store, records if records is not None else store.records, policy))
        return session

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
