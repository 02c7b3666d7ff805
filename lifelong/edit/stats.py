"""Preserved-knowledge statistics and the AlphaEdit null-space projector.

C₀ = E[k kᵀ] over every token of the preserved corpus, at the input of each edited
matrix (d_in × d_in): products over up to 4096 tokens summed in float32 (twice as fast as
float64 on a CPU, relative error ~1e-6), those sums added in float64. P = U₂U₂ᵀ spans the eigenvectors of C₀
whose eigenvalues fall below the policy threshold: an update of the form X·P leaves
the outputs of keys in C₀'s dominant directions unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.model.corpus import padded_batches
from lifelong.model.hooks import _Stop, hooks
from lifelong.model.precision import exact


@dataclass
class Projector:
    """What `init` stores per edited layer."""

    mom2: torch.Tensor      # (d_in, d_in) float64, E[k kᵀ]
    P: torch.Tensor         # (d_in, d_in) float32 projector onto the null space
    eigvals: torch.Tensor   # (d_in,) ascending
    kept: int               # dimensions spanned by P
    kept_energy: float      # fraction of trace(C₀) inside the kept directions


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """xᵀx (d, d) from its upper block bands, mirrored: 5/8 of the multiplications of x.t() @ x
    with 4 bands (30 % faster at d = 2048 on a CPU), the same sums up to rounding."""
    d = x.shape[1]
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    out = x.new_empty(d, d)
    for a, b in zip(edges, edges[1:]):
        band = x[:, a:b].t() @ x[:, a:]                                 # (b - a, d - a): from the diagonal on
        out[a:b, a:] = band
        out[b:, a:b] = band[:, b - a:].t()
    return out


FLUSH_TOKENS = 4096   # tokens whose products are summed in float32 before they join the float64 total


class Moments:
    """Running Σ k kᵀ at the input of each named module, over the tokens the current mask
    marks real: keys gathered up to FLUSH_TOKENS (one corpus batch, or some 26 sampling steps
    of 157 rows), their products summed in float32 in one Gram, those sums added in float64.
    Converting and adding a float64 (d_in × d_in) at every sampling step cost Gemma's sampled
    init a fifth of its sampling time, and one Gram of 4096 keys runs 1.8× faster than 26 of
    157. Hooks registered with `spec` read every forward pass; `feed(mask)` names the real
    tokens of the next one."""

    def __init__(self, module_names: list[str]):
        self.names = module_names
        self.sums: dict[str, torch.Tensor] = {}
        self.pending: dict[str, list[torch.Tensor]] = {}   # float32 keys not yet in a sum
        self.count = 0
        self.mask: torch.Tensor | None = None

    def feed(self, mask: torch.Tensor) -> None:
        """mask (n, T): 1 where the next forward's input token is real."""
        self.mask = mask
        self.count += int(mask.sum())

    def spec(self, stop_at_last: bool = False) -> dict:
        """hooks() spec; stop_at_last ends each pass at the last module (nothing above is read)."""
        def make(name, last):
            def pre(_module, args):
                x = args[0][self.mask.bool()].to(torch.float32)       # (tokens, d_in): the real tokens
                keys = self.pending.setdefault(name, [])
                keys.append(x)
                if sum(k.shape[0] for k in keys) >= FLUSH_TOKENS:
                    self._flush(name)
                if last:
                    raise _Stop
            return pre

        return {n: ("pre", make(n, stop_at_last and i == len(self.names) - 1)) for i, n in enumerate(self.names)}

    def reading(self, model, stop_at_last: bool = False):
        """The hooks on `model` while the block runs (`hooks` context)."""
        return hooks(model, self.spec(stop_at_last))

    def _flush(self, name: str) -> None:
        keys = self.pending.pop(name)
        with exact(keys[0].device):                                   # float32 even under bfloat16 autocast
            acc = gram(torch.cat(keys) if len(keys) > 1 else keys[0]).to(torch.float64).cpu()
        self.sums[name] = acc if name not in self.sums else self.sums[name].add_(acc)

    def means(self) -> dict[str, torch.Tensor]:
        """E[k kᵀ] per module."""
        for name in list(self.pending):
            self._flush(name)
        return {n: s / max(self.count, 1) for n, s in self.sums.items()}


@torch.no_grad()
def second_moments(model, module_names: list[str], seqs: list[list[int]], batch: int = 32,
                   progress=None) -> tuple[dict[str, torch.Tensor], int]:
    """E[k kᵀ] at the input of each module over all tokens of seqs; passes stop at the last module."""
    device = next(model.parameters()).device
    acc = Moments(module_names)
    with acc.reading(model, stop_at_last=True):
        for ids, mask in padded_batches(seqs, batch, device):
            acc.feed(mask)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            if progress is not None:
                progress(int(mask.sum()))
    return acc.means(), acc.count


def projector(mom2: torch.Tensor, threshold: float) -> Projector:
    """Null-space projector of the mean second moment: eigenvectors with eigenvalue < threshold."""
    eigvals, eigvecs = torch.linalg.eigh(mom2.to(torch.float64))  # ascending
    keep = eigvals < threshold
    u2 = eigvecs[:, keep]                                           # (d_in, kept)
    P = (u2 @ u2.t()).to(torch.float32)
    total = float(eigvals.clamp(min=0).sum())
    kept_energy = float(eigvals[keep].clamp(min=0).sum()) / total if total > 0 else 0.0
    return Projector(mom2=mom2, P=P, eigvals=eigvals, kept=int(keep.sum()), kept_energy=kept_energy)
