"""Carrying a checked policy to another model: what to measure on it, and the rules that turn
those measurements into settings.

The shipped SmolLM2-135M policy was tuned by many runs on CounterFact dev facts; its numbers
do not transfer as they stand (Gemma 3 270M needs a value step eight times smaller, and
Llama's published mom2 weight of 15000 is about a thousand times too strong on SmolLM2). The
rules below keep fixed what each setting *does* on the reference model, measured the same way
on both:
- value step: a step of step_size·‖h‖ is meant to move the stream by a set share of its
  ordinary part; a stream carrying a few massive channels (Gemma: ‖h‖ ~6000, ~500 without
  them) has a far larger ‖h‖ for the same ordinary part, so the step scales with the share
  of ‖h‖ outside the massive channels (`bulk_share`);
- mom2 weight λ: in the solve (λC₀ + KKᵀ)Δ = RKᵀ a lone edit key k is written with the share
  m/(m + λ), m = kᵀC₀⁻¹k; λ is set so that the model's median edit key keeps the reference's
  λ/m (`key_mahalanobis`);
- null-space threshold: the eigenvalue of C₀ below which the kept directions hold the
  reference's share of tr(C₀) (`threshold_for`);
- value step, once more, from a push of the user's own facts (`calibrated_step`): the bulk
  share only reads the stream, not how far a value must move it to flip a fact. A δ grows
  by about one step per step, so the mean steps a batch's values take measure that
  distance in steps; the step is rescaled so that values take the reference's number of
  steps, i.e. the same granularity: a step too coarse for the distance overshoots the
  target by up to a whole step and writes more than the fact needs.
`measure` reads these quantities off a model; `Reference` holds them for SmolLM2-135M.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lifelong.edit.stats import second_moments
from lifelong.model.hooks import _Stop, hooks

MASSIVE = 10.0       # a channel whose RMS over the measured tokens is ≥ MASSIVE × the median channel's
EIG_FLOOR = 1e-9     # × the largest eigenvalue: C₀'s floor when inverting it
STEP_BAND = 1.5      # mean value steps within this factor of the reference's keep the step: batches
                     # of the same policy differ by up to 1.25× (SmolLM2, 25-fact batches: 8.2-10.3)
STEP_RANGE = 8.0     # the calibration moves a step by at most this factor


@dataclass(frozen=True)
class Reference:
    """The reference policy's settings and what `measure` reads on its model at its layers from
    the first 20k tokens of WikiText-2 validation (plain) and the first 100 facts of ROME's
    known_1000.json (2026-12-06, SmolLM2-135M-Instruct, layers 3-7: `lifelong policy suggest
    --model smollm2-135m --facts known_1000.json --layers 3,4,5,6,7 --corpus wiki.txt` gives
    back the shipped step_size, mom2_weight and nullspace_threshold)."""

    model: str = "smollm2-135m"
    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    step_size: float = 0.08
    bulk_share: float = 0.7005
    mom2_weight: float = 20.0
    key_mahalanobis: float = 6024.0
    threshold: float = 1e-2
    kept_energy: float = 0.270      # the largest over the layers (layer 3)
    value_steps: float = 8.48       # mean steps per value, first batch (25 CounterFact dev facts) on a fresh
                                    # store (bench/reports/quality_quick.md, row smollm2-shipped-25)


REFERENCE = Reference()


@dataclass
class Measured:
    """What the rules need from a model at a set of layers."""

    layers: list[int]
    bulk_share: float                  # median over facts of ‖h outside massive channels‖/‖h‖, last layer
    massive_channels: int              # how many channels count as massive there
    h_norm: float                      # median ‖h‖ at the last subject token, last layer
    key_mahalanobis: float             # median over facts and layers of kᵀC₀⁻¹k
    eigvals: dict[int, np.ndarray]     # per layer, C₀'s eigenvalues (ascending)
    d_in: int                          # width of the edited matrices' input
    tokens: int                        # text tokens C₀ was estimated from


def massive_mask(h: torch.Tensor, factor: float = MASSIVE) -> torch.Tensor:
    """(d,) bool: channels of h (n, d) whose RMS over the n rows is ≥ factor × the median channel's."""
    rms = h.double().pow(2).mean(dim=0).sqrt()     # (d,)
    return rms >= factor * rms.median()


def bulk_share(h: torch.Tensor, factor: float = MASSIVE) -> tuple[float, int]:
    """(median over rows of ‖h outside the massive channels‖ / ‖h‖, number of massive channels)
    for h (n, d)."""
    mask = massive_mask(h, factor)
    h = h.double()
    share = h[:, ~mask].norm(dim=1) / h.norm(dim=1).clamp(min=1e-30)   # (n,)
    return float(share.median()), int(mask.sum())


def mahalanobis(keys: torch.Tensor, mom2: torch.Tensor) -> torch.Tensor:
    """(n,) kᵀC₀⁻¹k for keys (n, d) under C₀ = mom2 (d, d), eigenvalues floored at EIG_FLOOR·max."""
    ev, U = torch.linalg.eigh(mom2.double())
    ev = ev.clamp(min=float(ev[-1]) * EIG_FLOOR)
    z = keys.double() @ U                                                # (n, d) in C₀'s eigenbasis
    return (z.pow(2) / ev).sum(dim=1)


def kept_energy(eigvals: np.ndarray, threshold: float) -> float:
    """Share of tr(C₀) in the eigen-directions below threshold (what the null space keeps)."""
    ev = np.clip(np.asarray(eigvals, dtype=float), 0, None)
    return float(ev[ev < threshold].sum() / ev.sum()) if ev.sum() > 0 else 0.0


def threshold_for(eigvals: dict[int, np.ndarray], energy: float) -> float:
    """The largest threshold at which no layer's kept directions hold more than `energy` of its
    tr(C₀) (at least the smallest eigenvalue's next one, so every layer keeps a direction)."""
    best = np.inf
    for ev in eigvals.values():
        ev = np.sort(np.clip(np.asarray(ev, dtype=float), 0, None))
        below = np.cumsum(ev) / ev.sum()      # below[i]: energy of the directions 0..i
        i = int(np.searchsorted(below, energy, side="right"))   # directions 0..i-1 fit
        i = min(max(i, 1), len(ev) - 1)
        best = min(best, float(ev[i]))
    return best


def step_size_for(bulk: float, ref: Reference = REFERENCE) -> float:
    """The value step that moves the stream's ordinary part as far as the reference's step."""
    return ref.step_size * bulk / ref.bulk_share


def calibrated_step(step: float, mean_steps: float, ref: Reference = REFERENCE) -> float | None:
    """The step at which values would take the reference's number of steps, given that they
    took `mean_steps` at `step`; None when that is within STEP_BAND of the reference (keep it)."""
    ratio = mean_steps / ref.value_steps
    if 1 / STEP_BAND <= ratio <= STEP_BAND:
        return None
    return step * min(max(ratio, 1 / STEP_RANGE), STEP_RANGE)


def mom2_weight_for(key_mahalanobis: float, ref: Reference = REFERENCE) -> float:
    """λ with the reference's λ/m at the model's median edit key."""
    return ref.mom2_weight * key_mahalanobis / ref.key_mahalanobis


@torch.no_grad()
def measure(model, module_names: list[str], layer_names: list[str], layers: list[int],
            prompts: list[tuple[list[int], int]], seqs: list[list[int]]) -> Measured:
    """The rules' quantities at the edited modules (module_names, in layer order) and their
    decoder layers: C₀ from the text seqs, and for each prompt (token ids, last subject
    position) the key at each edited module and the last layer's output h."""
    moments, tokens = second_moments(model, module_names, seqs)
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in module_names}
    outs: list[torch.Tensor] = []
    at = {"pos": 0}

    def pre(name):
        def hook(_module, args):
            keys[name].append(args[0][0, at["pos"]].detach().cpu())            # (d_in,)
        return hook

    def post(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        outs.append(h[0, at["pos"]].detach().cpu())                               # (d_model,)
        raise _Stop                                                               # nothing above is read

    spec = {n: ("pre", pre(n)) for n in module_names}
    spec[layer_names[-1]] = ("post", post)
    device = next(model.parameters()).device
    with hooks(model, spec):
        for ids, pos in prompts:
            at["pos"] = pos
            try:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            except _Stop:
                pass
    m = torch.cat([mahalanobis(torch.stack(keys[n]), moments[n]) for n in module_names])
    H = torch.stack(outs)                                                         # (facts, d_model)
    bulk, n_massive = bulk_share(H)
    eig = {l: torch.linalg.eigvalsh(moments[n].double()).numpy() for l, n in zip(layers, module_names)}
    return Measured(list(layers), bulk, n_massive, float(H.double().norm(dim=1).median()), float(m.median()),
                    eig, int(moments[module_names[0]].shape[0]), tokens)
